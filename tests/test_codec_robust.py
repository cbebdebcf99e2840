"""Codec-robust training: a bundle fitted on lossless PNG stills meets an MJPEG stream of the same parts.

The station sees what the camera's codec made of the parts. Fitted on the stills alone, the threshold sits
below the lossy good parts' scores and the station opens events in clean stretches; with the stills also
used as degraded copies (trainer/degrade.py, on by default for stills) it opens one event in each defect
stretch and none elsewhere. Both halves run here, so the test shows that the augmentation is what fixes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_helpers import check_events, stream_clip

from trainer.degrade import DRAWN, Degradation, codec_plan, expand, is_station_frame
from trainer.frames import TrainingData, set_epoch
from trainer.synthetic import make_dataset, write_clip

SIZE = (240, 320)
DEFECTS = [(30, 55), (95, 120)]
N_FRAMES = 150


def _fit(root: Path, data: Path, name: str, config_text: str) -> Path:
    cfg = root / f"train-{name}.yaml"
    cfg.write_text(config_text)
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--config", str(cfg),
                           "--out", str(root / f"engines-{name}")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stills_and_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("codec")
    data = make_dataset(root / "data", n_train=40, n_test_good=4, n_test_defect=4, size=SIZE, seed=11)
    clip = write_clip(root / "line.avi", SIZE, N_FRAMES, DEFECTS, fps=10.0, seed=5, codec="MJPG")
    return root, data, clip


def test_stills_alone_flag_a_lossy_stream_and_codec_robust_training_does_not(
        stills_and_clip: tuple[Path, Path, Path], mosquitto: str, tmp_path: Path) -> None:
    root, data, clip = stills_and_clip
    (tmp_path / "plain").mkdir()
    (tmp_path / "robust").mkdir()
    plain_bundle = _fit(root, data, "plain", "codec_augment:\n  enabled: false\n")
    plain = stream_clip(tmp_path / "plain", mosquitto, plain_bundle, clip, "plain")
    starts = [e for e in plain["event"] if e["type"] == "start"]
    in_clean = [e["frame"] for e in starts if not any(a <= e["frame"] < b for a, b in DEFECTS)]
    assert in_clean, "the stills-only bundle was expected to fire on the lossy good parts; it did not"
    robust_bundle = _fit(root, data, "robust", "seed: 0\n")  # the default: on, for stills
    report = json.loads((robust_bundle / "report.json").read_text())
    assert report["codec_augment"]["on"] and report["codec_augment"]["copies"] == 1
    robust = stream_clip(tmp_path / "robust", mosquitto, robust_bundle, clip, "robust")
    check_events(robust["event"], DEFECTS, "cam0")  # one event in each defect stretch, none in clean ones


def test_degraded_copies_are_seeded_jpeg_round_trips_of_the_stills_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    deg = Degradation(jpeg_quality=(40, 40), brightness=0.0, contrast=0.0)
    a = deg.apply(image, np.random.default_rng(1))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, deg.apply(image, np.random.default_rng(1)))  # seeded: resumable, reproducible
    assert 2.0 < np.abs(a.astype(int) - image).mean() < 60.0  # JPEG q40 of noise: visibly lossy, same picture
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 40])
    assert np.array_equal(a, cv2.imdecode(buf, cv2.IMREAD_COLOR))  # exactly the codec's round trip
    bright = Degradation(jpeg_quality=(100, 100), brightness=0.1, contrast=0.0)
    shift = bright.apply(np.full((16, 16, 3), 128, np.uint8), np.random.default_rng(3)).astype(int) - 128
    assert np.abs(shift).max() <= 26 and len(np.unique(shift)) <= 3  # one offset over the image (JPEG rounding)

    still, frame = tmp_path / "still.png", tmp_path / "frame.png"
    for p in (still, frame):
        cv2.imwrite(str(p), image)
    frame.with_suffix(".json").write_text(json.dumps({"station": "line1", "score": 1.0}))
    (tmp_path / "other.json").write_text("not json")
    assert not is_station_frame(still) and is_station_frame(frame)
    assert expand([still, frame], 2) == [(still, 0), (frame, 0), (still, 1), (still, 2)]
    assert expand([still, frame], 1, per_epoch=True) == [(still, DRAWN), (frame, 0)]  # epochs: no extra items
    data = TrainingData(fit_paths=[still] * 40, holdout_paths=[], hw=(48, 64), degradation=deg, degraded_copies=1)
    loader = data.loader(data.fit_paths, 40, per_epoch=True)
    degraded = []
    for epoch in range(5):
        set_epoch(loader, epoch)
        batch = next(iter(loader)).numpy()
        assert len(batch) == 40  # the epoch's size is the stills', not doubled
        degraded.append(int((np.abs(batch.astype(int) - image).reshape(40, -1).max(1) > 0).sum()))
    assert 60 <= sum(degraded) <= 140 and len(set(degraded)) > 1  # about half of 200, drawn anew each epoch
    assert codec_plan(None, 1, deg, [frame])[0] is None  # auto: station frames already carry the codec
    assert codec_plan(None, 1, deg, [still, frame])[:2] == (deg, 1)
    assert codec_plan(False, 1, deg, [still])[0] is None
