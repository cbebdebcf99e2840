"""What codec-robust training costs on clean test parts and gains on lossy ones.

    python benchmarks/codec_robust.py [--model patchcore] [--seeds 3] [--train 60] [--test 30]
        [--qualities 60,80] [--copies 1]

Per seed: ``trainer.synthetic.make_dataset`` writes ``--train`` good parts (lossless PNG stills, 320x240) and
``--test`` good plus ``--test`` defective test parts; ``fit_bundle`` (what ``edge-train fit`` runs) fits the
model with ``codec_augment`` off and on (``--copies``). Both bundles are then scored by ``edge-train eval`` on
the clean test set and on the same test set JPEG re-encoded at each of ``--qualities`` (what an MJPEG camera
sends): image AUROC, and the false-alarm rate, the share of good test parts at or above the bundle's own
threshold. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.bundle import load_bundle  # noqa: E402
from trainer.config import parse_train_config  # noqa: E402
from trainer.data import IMAGE_EXTENSIONS, read_original  # noqa: E402
from trainer.evaluate import evaluate_bundle  # noqa: E402
from trainer.pipeline import fit_bundle  # noqa: E402
from trainer.synthetic import make_dataset  # noqa: E402

SIZE = (240, 320)


def reencode(src: Path, dst: Path, quality: int) -> Path:
    """A copy of ``src``'s test split (and its masks) with every test image JPEG re-encoded at ``quality``."""
    for image in sorted((src / "test").rglob("*")):
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        out = dst / image.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), read_original(image), [cv2.IMWRITE_JPEG_QUALITY, quality])
    for mask in sorted((src / "ground_truth").rglob("*_mask.png")):
        out = dst / mask.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(mask.read_bytes())
    (dst / "train" / "good").mkdir(parents=True, exist_ok=True)
    return dst


def measure(bundle: Path, data: Path) -> tuple[float, float]:
    """(image AUROC, share of good parts at or above the bundle's threshold) on ``data``/test."""
    ev = evaluate_bundle(bundle, data)
    good = ev.scores[ev.test.labels == 0]
    return float(ev.metrics["image_auroc"]), float((good >= load_bundle(bundle).threshold).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="patchcore")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--qualities", default="60,80")
    ap.add_argument("--copies", type=int, default=1)
    args = ap.parse_args()
    qualities = [int(q) for q in args.qualities.split(",")]
    sets = ["clean"] + [f"JPEG q{q}" for q in qualities]
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            root = Path(tmp) / f"seed{seed}"
            data = make_dataset(root / "data", n_train=args.train, n_test_good=args.test,
                                n_test_defect=args.test, size=SIZE, seed=100 + seed)
            lossy = {f"JPEG q{q}": reencode(data, root / f"q{q}", q) for q in qualities}
            for mode in ("off", "on"):
                cfg = parse_train_config(f"model: {args.model}\nseed: {seed}\ncodec_augment:\n  enabled: "
                                         f"{'true' if mode == 'on' else 'false'}\n  copies: {args.copies}\n")
                bundle = fit_bundle(cfg, data, root / f"engines-{mode}", log=lambda _m: None)
                for name in sets:
                    rows.setdefault((mode, name), []).append(measure(bundle, data if name == "clean" else lossy[name]))
            print(f"seed {seed} done", file=sys.stderr, flush=True)

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    print(f"\n{args.model}, {args.train} training stills (320x240 PNG), {args.test} good + {args.test} defective "
          f"test parts, {args.seeds} seeds, codec_augment copies {args.copies}\n")
    print("| codec_augment | test set | image AUROC | good parts over threshold |")
    print("|---|---|---|---|")
    for mode in ("off", "on"):
        for name in sets:
            got = rows[(mode, name)]
            print(f"| {mode} | {name} | {fmt([a for a, _ in got])} | {fmt([f for _, f in got])} |")


if __name__ == "__main__":
    main()
