"""Compare the speed of several bundles' ONNX graphs on this machine, interleaved, in one process.

    python benchmarks/graph_ab.py BUNDLE_OR_ONNX [BUNDLE_OR_ONNX ...] [--batches 1,8] [--rounds 12] [--threads 2]

Machines here are noisy: measuring A then B lets a background job land on one of them. Each round runs
every graph at every batch size (8 frames' worth per graph and batch), and the table shows medians over
rounds in ms per frame.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    sessions = []
    for g in args.graphs:
        path = g / "model.onnx" if g.is_dir() else g
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        h, w = s.get_inputs()[0].shape[1:3]
        sessions.append((g, s, (int(h), int(w))))
    frames = {}
    for _, s, hw in sessions:
        for b in batches:
            frames[(hw, b)] = np.random.default_rng(0).integers(0, 255, (b, *hw, 3), dtype=np.uint8)
            s.run(None, {"frames": frames[(hw, b)]})  # warm-up
    times: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(sessions)) for b in batches}
    for _ in range(args.rounds):
        for i, (_, s, hw) in enumerate(sessions):
            for b in batches:
                calls = max(1, 8 // b)
                t0 = time.perf_counter()
                for _ in range(calls):
                    s.run(None, {"frames": frames[(hw, b)]})
                times[(i, b)].append((time.perf_counter() - t0) / (calls * b) * 1000.0)
    print("graph".ljust(60) + "".join(f"b{b} ms/frame".rjust(15) for b in batches))
    for i, (g, _, _) in enumerate(sessions):
        print(str(g)[-60:].ljust(60) + "".join(f"{statistics.median(times[(i, b)]):15.2f}" for b in batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
