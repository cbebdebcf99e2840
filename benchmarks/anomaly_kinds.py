"""Which model catches which kind of anomaly: each model fitted on generated good parts, scored on surface
defects and on a foreign object, through the exported ONNX graph; with the graph's speed at batch 1 and 8.

    python benchmarks/anomaly_kinds.py [--models patchcore,padim,spade,mahalanobis] [--train 120] [--test 30]
        [--size 128] [--seed 7] [--threads 1] [--rounds 6]

Per model and kind: ``trainer.synthetic.make_dataset`` writes ``--train`` good parts and ``--test`` good plus
``--test`` anomalous test parts (surface: scratch, spot, crack, missing chunk; foreign: a stray nut), and
``trainer.pipeline.fit_bundle`` (what ``edge-train fit`` runs) fits, calibrates and exports the model with the
trainer's defaults at ``--size`` (a fifth of the training parts held out for the threshold). The AUROCs are
``edge-train eval``'s. ms/frame: ONNX Runtime on CPU, the FP32 graph of the surface bundle, ``--threads``
intra-op threads, medians of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.bundle import load_bundle  # noqa: E402
from edge.backends.onnxruntime import OrtBackend  # noqa: E402
from trainer.config import parse_train_config  # noqa: E402
from trainer.evaluate import evaluate_bundle  # noqa: E402
from trainer.pipeline import fit_bundle  # noqa: E402
from trainer.synthetic import DEFECT_KINDS, OBJECT_KINDS, make_dataset  # noqa: E402

KINDS = {"surface": DEFECT_KINDS, "foreign": OBJECT_KINDS}


def ms_per_frame(bundles: list[Path], threads: int, rounds: int,
                 batches: tuple[int, ...] = (1, 8)) -> list[list[float]]:
    """Median ms per frame of each bundle's FP32 graph at each batch size, interleaved rounds."""
    backends = [OrtBackend(load_bundle(b), max_batch=max(batches), intra_op_threads=threads,
                           providers=["CPUExecutionProvider"], warmup=False) for b in bundles]
    rng = np.random.default_rng(0)
    times: list[list[list[float]]] = [[[] for _ in batches] for _ in bundles]
    for r in range(rounds + 1):
        for i, backend in enumerate(backends):
            assert backend.input_hw is not None
            h, w = backend.input_hw
            for j, n in enumerate(batches):
                frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
                t0 = time.perf_counter()
                for _ in range(max(1, 8 // n)):
                    backend.infer(frames)
                if r:  # round 0 warms up
                    times[i][j].append((time.perf_counter() - t0) * 1000.0 / (n * max(1, 8 // n)))
    return [[statistics.median(t) for t in per] for per in times]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default="patchcore,padim,spade,mahalanobis")
    ap.add_argument("--train", type=int, default=120)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    t0 = time.monotonic()
    rows: dict[tuple[str, str], dict[str, float]] = {}
    speed_bundles: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="kinds-") as tmp:
        data = {kind: make_dataset(Path(tmp) / kind, n_train=args.train, n_test_good=args.test,
                                   n_test_defect=args.test, size=args.size, seed=args.seed, kinds=kinds)
                for kind, kinds in KINDS.items()}
        for model in models:
            for kind, root in data.items():
                cfg = parse_train_config(f"model: {model}\ninput: {{height: {args.size}, width: {args.size}}}\n"
                                         f"seed: {args.seed}\nreport: {{overlays: 0}}\n")
                t1 = time.monotonic()
                bundle = fit_bundle(cfg, root, Path(tmp) / "engines" / kind, log=lambda _m: None)
                fit_s = time.monotonic() - t1
                m = evaluate_bundle(bundle, root).metrics
                rows[(model, kind)] = {"image": m["image_auroc"], "pixel": m["pixel_auroc"] or float("nan"),
                                       "fit": fit_s}
                print(f"{model} {kind}: image AUROC {m['image_auroc']:.3f}, pixel {m['pixel_auroc']:.3f} "
                      f"(fit {fit_s:.1f} s)", file=sys.stderr, flush=True)
                if kind == "surface":
                    speed_bundles.append(bundle)
        speeds = ms_per_frame(speed_bundles, args.threads, args.rounds)
    print(f"generated parts, {args.size} px, {args.train} good training parts ({int(args.train * 0.8)} fitted), "
          f"{args.test} good + {args.test} anomalous test parts, seed {args.seed}; trainer defaults; through the "
          f"exported ONNX graph (FP32); ms/frame: {args.threads} ORT thread(s); {time.monotonic() - t0:.0f} s")
    print(f"{'model':<12} {'surface image/pixel':>20} {'foreign image/pixel':>20} {'ms/frame b1':>12} "
          f"{'ms/frame b8':>12} {'frames/s b1/b8':>15}")
    for model, (b1, b8) in zip(models, speeds, strict=True):
        s, f = rows[(model, "surface")], rows[(model, "foreign")]
        print(f"{model:<12} {s['image']:>11.3f} / {s['pixel']:.3f} {f['image']:>11.3f} / {f['pixel']:.3f} "
              f"{b1:>12.2f} {b8:>12.2f} {1000 / b1:>8.0f} / {1000 / b8:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
