"""Throughput and latency of a bundle's engine on this machine, as a table.

    python benchmarks/throughput.py [BUNDLE] [--batches 1,2,4,8] [--seconds 3]

Without BUNDLE it uses engines/patchcore's promoted version, training one on generated data first if
there is none. Rows: ONNX Runtime on model.onnx (FP32) and model.fp16.onnx at each batch size. Speed is
reported as a ratio against FP32 at batch 1 measured in the same run, because this machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.bundle import Bundle, load_bundle  # noqa: E402
from core.errors import UserError  # noqa: E402
from edge.backends.onnxruntime import OrtBackend  # noqa: E402


def default_bundle() -> Bundle:
    try:
        return load_bundle("patchcore", ROOT / "engines")
    except UserError:
        pass
    from trainer.synthetic import make_dataset

    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    make_dataset(data, n_train=40, n_test_good=0, n_test_defect=0, size=160, seed=0)
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--out",
                          str(ROOT / "engines")], stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT)
    return load_bundle(out.stdout.strip().splitlines()[-1])


def measure(backend: OrtBackend, frames: np.ndarray, seconds: float) -> list[float]:
    """Wall times (ms) of repeated infer calls on the same batch, after one warm-up call."""
    backend.infer(frames)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        backend.infer(frames)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per row")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle) if args.bundle else default_bundle()
    h, w = bundle.input_hw
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    graphs = [("fp32", bundle.onnx_path)]
    if bundle.onnx_fp16_path is not None:
        graphs.append(("fp16", bundle.onnx_fp16_path))
    print(f"bundle {bundle.model_name} {bundle.version}, input {h}x{w}, onnxruntime CPU\n")
    print(f"{'graph':<6} {'batch':>5} {'ms/batch p50':>13} {'ms/batch p99':>13} {'frames/s':>9} {'vs fp32 b1':>10}")
    baseline = None
    for label, path in graphs:
        backend = OrtBackend(path, max_batch=max(batches), providers=["CPUExecutionProvider"])
        for b in batches:
            frames = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
            times = measure(backend, frames, args.seconds)
            p50 = statistics.median(times)
            p99 = float(np.percentile(times, 99))
            fps = b * 1000.0 / p50
            baseline = baseline or fps
            print(f"{label:<6} {b:>5} {p50:>13.2f} {p99:>13.2f} {fps:>9.1f} {fps / baseline:>9.2f}x")
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
