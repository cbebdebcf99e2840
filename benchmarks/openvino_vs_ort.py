"""OpenVINO's CPU runtime against ONNX Runtime on the same bundle graph, interleaved, in one process.

    pip install openvino        # not a dependency of the project: this script decides whether it should be
    python benchmarks/openvino_vs_ort.py BUNDLE [--rounds 10] [--threads 2]

Prints the score parity of OpenVINO against ONNX Runtime FP32 and ms per frame at batch 1 and 8 for ONNX
Runtime (the station's own backend and session options) and OpenVINO with its LATENCY and THROUGHPUT hints
(medians over interleaved rounds). A bundle folder is measured on the graph a station without snapshots runs
(model.score.onnx, else model.onnx).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.bundle import ONNX_FP32, ONNX_SCORE  # noqa: E402
from edge.backends.onnxruntime import OrtBackend  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import openvino as ov
    except ImportError:
        print("openvino_vs_ort: error: openvino is not installed (pip install openvino)", file=sys.stderr)
        return 2
    if args.bundle.is_dir():  # the graph a station without snapshots runs, else the full one
        score_only = args.bundle / ONNX_SCORE
        path = str(score_only if score_only.exists() else args.bundle / ONNX_FP32)
    else:
        path = str(args.bundle)
    print(f"graph: {path}")
    backend = OrtBackend(path, max_batch=8, intra_op_threads=args.threads)  # the station's own session options
    sess = backend.session
    h, w = (int(v) for v in sess.get_inputs()[0].shape[1:3])
    core = ov.Core()
    model = core.read_model(path)
    requests = {hint: core.compile_model(model, "CPU", {"PERFORMANCE_HINT": hint,
                                                        "INFERENCE_NUM_THREADS": args.threads}).create_infer_request()
                for hint in ("LATENCY", "THROUGHPUT")}
    frames = {b: np.random.default_rng(0).integers(0, 255, (b, h, w, 3), dtype=np.uint8) for b in (1, 8)}
    runners: dict[str, Callable[[int], object]] = {
        "onnxruntime": lambda b: sess.run(None, {"frames": frames[b]}),
        "openvino LATENCY": lambda b: requests["LATENCY"].infer({0: frames[b]}),
        "openvino THROUGHPUT": lambda b: requests["THROUGHPUT"].infer({0: frames[b]}),
    }
    reference = sess.run(["score"], {"frames": frames[8]})[0]
    ov_score = next(v for v in requests["LATENCY"].infer({0: frames[8]}).values() if v.shape == reference.shape)
    print(f"score parity, OpenVINO vs ONNX Runtime FP32: max rel diff "
          f"{float(np.max(np.abs(ov_score - reference) / np.abs(reference))):.2e}")
    for run in runners.values():
        for b in (1, 8):
            run(b)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, run in runners.items():
            for b in (1, 8):
                t0 = time.perf_counter()
                for _ in range(8 // b):
                    run(b)
                times.setdefault((name, b), []).append((time.perf_counter() - t0) / 8 * 1000.0)
    print(f"{'runtime':<22}{'b1 ms/frame':>14}{'b8 ms/frame':>14}")
    for name in runners:
        print(f"{name:<22}" + "".join(f"{statistics.median(times[(name, b)]):14.2f}" for b in (1, 8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
