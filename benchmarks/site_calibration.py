"""Why a station calibrates on site: one bundle's scores on its stills against its scores on the station's
MJPEG stream, with the bundle's threshold and the one on-site calibration sets; writes the plot docs/station.md shows.

    python benchmarks/site_calibration.py [--train 40] [--frames 200] [--seed 11] [--png docs/img/site_calibration.png]

``trainer.synthetic`` writes ``--train`` good parts as PNG stills (320x240), as many other good parts as PNG
stills to score, and an MJPEG clip of ``--frames``
other good parts and as many with defects; ``fit_bundle`` fits PatchCore on the stills with codec augmentation
off (a bundle that never saw the codec). The first half of the clip's good frames plays the operator's
``edge-run --calibrate``: their scores set the on-site threshold with the station's own rule
(``edge.calibration.site_calibration``, the policy ``edge-run --calibrate`` applies); the other half and the
defective frames are scored against both thresholds. Frames are decoded and fitted as the station does (OpenCV,
the bundle's resize).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.bundle import load_bundle  # noqa: E402
from core.preprocess import resize_frame  # noqa: E402
from edge.backends.onnxruntime import OrtBackend  # noqa: E402
from edge.calibration import site_calibration, station_policy  # noqa: E402
from trainer.config import parse_train_config  # noqa: E402
from trainer.data import list_images, read_image  # noqa: E402
from trainer.pipeline import fit_bundle  # noqa: E402
from trainer.report import ScoreSet, plot_histogram  # noqa: E402
from trainer.synthetic import make_dataset, write_clip  # noqa: E402

SIZE = (240, 320)


def clip_frames(path: Path, hw: tuple[int, int], resize: str) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(resize_frame(frame, hw, resize))
    cap.release()
    return np.stack(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "site_calibration.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "data", n_train=args.train, n_test_good=args.train, n_test_defect=0, size=SIZE,
                            seed=args.seed)
        cfg = parse_train_config(f"seed: {args.seed}\ncodec_augment:\n  enabled: false\n")
        bundle = load_bundle(fit_bundle(cfg, data, root / "engines", log=lambda _m: None))
        n = args.frames
        clip = write_clip(root / "line.avi", SIZE, 2 * n, [(n, 2 * n)], seed=args.seed + 1, codec="MJPG")
        backend = OrtBackend(bundle, max_batch=16, need_map=False)
        hw, resize = bundle.input_hw, bundle.input_resize

        def score(frames: np.ndarray) -> np.ndarray:
            step = backend.max_batch or 16
            return np.concatenate([backend.infer(frames[i:i + step])["score"] for i in range(0, len(frames), step)])

        stills = score(np.stack([read_image(p, hw, resize) for p in list_images(data / "test" / "good")]))
        stream = score(clip_frames(clip, hw, resize))
        good, bad = stream[:n], stream[n:]
        declared, later = good[: n // 2], good[n // 2:]
        policy, _ = station_policy(bundle)  # what `edge-run --calibrate` applies to this bundle
        site = site_calibration(declared, bundle, policy=policy).threshold
        thr = bundle.threshold

    print(f"\nPatchCore fitted on {args.train} PNG stills (codec augmentation off); MJPEG clip of {n} good and "
          f"{n} defective parts; {n // 2} good frames declared for the on-site calibration\n")
    print("| scores | median | std | above bundle threshold | above on-site threshold |")
    print("|---|---|---|---|---|")
    for name, s in (("PNG stills of other good parts", stills), ("MJPEG good, not declared", later),
                    ("MJPEG defective", bad)):
        print(f"| {name} | {np.median(s):.2f} | {s.std():.2f} | {(s >= thr).mean():.1%} | {(s >= site).mean():.1%} |")
    print(f"\nbundle threshold {thr:.2f}, on-site threshold {site:.2f}")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot_histogram(args.png, [
        ScoreSet("bundle, PNG stills (good)", stills, None, thr),
        ScoreSet("on site: MJPEG stream", stream, np.r_[np.zeros(n, int), np.ones(n, int)], site)],
        title="Scores on the stills vs the station's MJPEG stream, and each threshold")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
