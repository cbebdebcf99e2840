"""The whole spine with nothing stood in: generated parts → edge-train fit → bundle → a video with planted
defect stretches → edge-run → a real Mosquitto → a real subscriber.

This is the job a station does; the edge tests cover the runtime with a toy graph, this one with the
model the trainer really builds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from edge_helpers import Collector, assert_seq_monotonic, check_events, check_payloads, run_cli, wait_stopped

from core.bundle import load_bundle
from core.preprocess import resize_frame
from edge.backends import create_backend
from trainer.synthetic import make_dataset, write_clip

SIZE = (240, 320)  # camera-like frames, resized on the host to the model input, as in training
FPS = 10.0
DEFECTS = [(40, 70), (110, 140)]
N_FRAMES = 170


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    data = make_dataset(root / "data", n_train=40, n_test_good=8, n_test_defect=8, size=SIZE, seed=11)
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(data),
                           "--out", str(root / "engines")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def write_line_clip(path: Path) -> Path:
    return write_clip(path, SIZE, N_FRAMES, DEFECTS, fps=FPS, seed=5)


def test_trained_model_streams_events_for_each_defect_stretch_only(
        tmp_path: Path, mosquitto: str, trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    clip = write_line_clip(tmp_path / "line.avi")
    config = tmp_path / "station.yaml"
    config.write_text(f"station: e2e\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  stats_interval_s: 0.5\n")
    with Collector(mosquitto, ["anomaly/e2e/#"]) as col:
        proc = run_cli("edge-run", ["--config", config, "--camera", clip, "--engine", trained_bundle,
                                    "--mqtt", mosquitto], timeout=180)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        wait_stopped(col)
        got = check_payloads(col)  # every event, stats and status payload against the shipped schemas
    events = got["event"]
    check_events(events, DEFECTS, "cam0")  # one event opened inside each stretch, none in clean ones
    assert_seq_monotonic(events)
    assert {(e["model"], e["model_version"], e["threshold"]) for e in events} == \
        {("patchcore", bundle.version, bundle.threshold)}
    assert got["stats"][-1]["cameras"]["cam0"]["frames_processed"] == N_FRAMES


def test_threshold_override_in_station_yaml_changes_what_fires(
        tmp_path: Path, mosquitto: str, trained_bundle: Path) -> None:
    """Users move the threshold at run time without re-exporting: far above every score, nothing fires.

    The same run asks for bigger batches than the bundle was bounded for: the station caps them and says so.
    """
    clip = write_line_clip(tmp_path / "line.avi")
    config = tmp_path / "station.yaml"
    config.write_text(f"station: e2e-high\nstate_dir: {tmp_path / 'state'}\nengine:\n  threshold: 1.0e9\n"
                      "  max_batch: 64\n")
    with Collector(mosquitto, ["anomaly/e2e-high/#"]) as col:
        proc = run_cli("edge-run", ["--config", config, "--camera", clip, "--engine", trained_bundle,
                                    "--mqtt", mosquitto, "--max-frames", "80"], timeout=180)
        assert proc.returncode == 0, proc.stderr
        assert "engine.max_batch 64 is above the 16 frames this bundle was exported for" in proc.stderr
        wait_stopped(col)
        assert col.on("/event") == []


def test_a_station_without_snapshots_runs_the_score_only_graph(tmp_path: Path, trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    assert bundle.onnx_score_path is not None and bundle.onnx_score_path.is_file()
    full = onnx.load(str(bundle.onnx_path))
    pruned = onnx.load(str(bundle.onnx_score_path))
    assert [o.name for o in pruned.graph.output] == ["score"]
    assert len(pruned.graph.node) < len(full.graph.node)  # the map's upsampling and blur are gone
    cap = cv2.VideoCapture(str(write_line_clip(tmp_path / "line.avi")))
    frames = []
    while len(frames) < 60:
        ok, image = cap.read()
        assert ok
        frames.append(resize_frame(image, bundle.input_hw, bundle.input_resize))
    cap.release()
    batch = np.stack(frames[30:60])  # good frames and the first defect stretch
    with_map = create_backend("onnxruntime", bundle)
    score_only = create_backend("onnxruntime", bundle, need_map=False)
    assert with_map.output_names == ["score", "anomaly_map"] and score_only.output_names == ["score"]
    a, b = with_map.infer(batch)["score"], score_only.infer(batch)["score"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()  # the same score, without computing the map
    parity = bundle.manifest["parity"]["onnx_score_only"]
    assert parity["score_max_rel_diff"] < 1e-4 and "map_max_rel_diff" not in parity
