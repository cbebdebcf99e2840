"""INT8 post-training quantisation of PatchCore's feature extractor against FP32: speed and AUROC, one run.

    python benchmarks/int8.py [--seeds 3] [--rounds 6] [--format qdq|qoperator]

Per seed: generated parts with planted defects (trainer.synthetic), PatchCore fitted with config/train.yaml's
defaults (what `edge-train fit` runs), then ONNX Runtime's static quantiser on the bundle's score graph: the
backbone's convolutions in INT8 (per-channel weights, activations calibrated on the training normals), the
nearest-neighbour distance and the in-graph pre-processing left in FP32. Both graphs score the same test parts
(image AUROC) and are timed in alternating rounds on the station's backend settings (ms/frame, batch 1 and 8).
The issue's rule: ship INT8 as an option only if image AUROC drops by less than 0.005.
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
from trainer.config import load_train_config  # noqa: E402
from trainer.data import load_test, read_image, train_paths  # noqa: E402
from trainer.evaluate import metrics_from_scores  # noqa: E402
from trainer.pipeline import fit_bundle  # noqa: E402
from trainer.synthetic import make_dataset  # noqa: E402


def quantize(src: Path, dst: Path, calibration: np.ndarray, fmt: str) -> None:
    """Convolutions to INT8, calibrated on ``calibration`` frames; everything else as it was."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.frames = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            f = next(self.frames, None)
            return None if f is None else {"frames": f[None]}

    quantize_static(str(src), str(dst), Frames(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=["Conv"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def ms_per_frame(graphs: dict[str, Path], hw: tuple[int, int], rounds: int) -> dict[tuple[str, int], float]:
    """Median ms/frame at batch 1 and 8, graphs alternating within each round (machines here are noisy)."""
    sessions = {name: {b: OrtBackend(path, max_batch=b) for b in (1, 8)} for name, path in graphs.items()}
    frames = {b: np.random.default_rng(0).integers(0, 256, (b, *hw, 3), dtype=np.uint8) for b in (1, 8)}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in graphs for b in (1, 8)}
    for _ in range(rounds):
        for name in graphs:
            for b in (1, 8):
                backend = sessions[name][b]
                calls = 0
                t0 = time.perf_counter()
                while calls < 16 // b or time.perf_counter() - t0 < 0.5:
                    backend.infer(frames[b])
                    calls += 1
                times[(name, b)].append((time.perf_counter() - t0) / (calls * b) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6, help="alternating timing rounds (default 6)")
    ap.add_argument("--format", choices=("qdq", "qoperator"), default="qdq", help="ONNX Runtime quantisation format")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-int8-"))
    rows = []
    for seed in range(args.seeds):
        data = make_dataset(work / f"data{seed}", n_train=60, n_test_good=40, n_test_defect=80, size=160, seed=seed)
        cfg = load_train_config(None)
        cfg.seed = seed
        bundle = load_bundle(fit_bundle(cfg, data, work / f"engines{seed}", log=lambda _m: None))
        fp32 = bundle.onnx_score_path or bundle.onnx_path
        calib = np.stack([read_image(p, bundle.input_hw, bundle.input_resize) for p in train_paths(data)[:32]])
        int8 = work / f"int8-{seed}.onnx"
        quantize(fp32, int8, calib, args.format)
        test = load_test(data, bundle.input_hw, bundle.input_resize)
        assert test is not None
        row: dict[str, float] = {"seed": seed}
        for name, path in (("fp32", fp32), ("int8", int8)):
            scores = OrtBackend(path, max_batch=16).infer(test.images)["score"]
            row[f"{name}_auroc"] = metrics_from_scores(scores, test.labels, bundle.threshold)["image_auroc"]
        speed = ms_per_frame({"fp32": fp32, "int8": int8}, bundle.input_hw, args.rounds)
        row.update({f"{n}_b{b}_ms": v for (n, b), v in speed.items()})
        rows.append(row)
    print(f"PatchCore 160 px (config/train.yaml defaults), score graph; INT8 = ONNX Runtime static quantisation "
          f"({args.format}) of the backbone convolutions, calibrated on 32 training normals")
    print("seed  AUROC fp32  AUROC int8  drop     fp32 b1 / b8 ms   int8 b1 / b8 ms")
    for r in rows:
        print(f"{r['seed']:<6}{r['fp32_auroc']:<12.4f}{r['int8_auroc']:<12.4f}{r['fp32_auroc'] - r['int8_auroc']:<9.4f}"
              f"{r['fp32_b1_ms']:.2f} / {r['fp32_b8_ms']:.2f}       {r['int8_b1_ms']:.2f} / {r['int8_b8_ms']:.2f}")
    drop = statistics.mean(r["fp32_auroc"] - r["int8_auroc"] for r in rows)
    faster = statistics.mean(r["fp32_b8_ms"] / r["int8_b8_ms"] for r in rows)
    print(f"mean AUROC drop {drop:.4f}; INT8 speed {faster:.2f}x FP32 at batch 8")
    reasons = ([] if drop < 0.005 else [f"image AUROC drops by {drop:.3f} (>= 0.005)"]) + \
        ([] if faster > 1.0 else ["it is not faster"])
    print("decision: " + ("INT8 qualifies as an option (AUROC drop < 0.005 and faster)" if not reasons else
                          "no INT8 option: " + " and ".join(reasons)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
