"""Everything that needs a GPU, as one table: TensorRT where it imports, else torch's GPU ceiling for the same graph.

    python benchmarks/gpu_check.py [--size 160] [--train 40] [--batches 1,8,32,128] [--seconds 2] [--no-compile]

It trains PatchCore on generated parts (the default model, Lite0 features, memory bank), exports the bundle's
two ONNX graphs and measures, on this machine:
- always: the FP16 graph's scores and AUROC against the FP32 graph's (ONNX Runtime, CPU: the readiness
  check's numerics) and ONNX Runtime's throughput (its best provider here);
- with a CUDA GPU and TensorRT: FP32 and FP16 plan build times, FP16 vs FP32 engine scores and AUROC, and
  frames/s by batch size of the TensorRT engines;
- with a CUDA GPU: the same export module in torch on the GPU, eager FP32, FP16 autocast and torch.compile
  (FP16), frames/s by batch and FP16-vs-FP32 scores, so a user sees the GPU's ceiling before TensorRT.
Without a GPU it says so and prints the CPU rows; it never fails for want of one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.bundle import Bundle, load_bundle, new_version_dir, write_manifest  # noqa: E402
from edge.backends import tensorrt_unavailable_reason  # noqa: E402
from edge.backends.onnxruntime import OrtBackend  # noqa: E402
from trainer.tensorrt_readiness import scores_auroc  # noqa: E402


@dataclass
class Row:
    what: str
    precision: str
    batch: Optional[int] = None
    fps: Optional[float] = None
    build_s: Optional[float] = None
    score_diff: Optional[float] = None  # max |s - s_fp32| / max |s_fp32|
    auroc: Optional[float] = None
    note: str = ""


def frames_per_second(run: Callable[[np.ndarray], Any], frames: np.ndarray, seconds: float,
                      sync: Callable[[], None] = lambda: None) -> float:
    """Images/s of repeated calls on one batch after two warm-up calls (at least 3 timed calls)."""
    for _ in range(2):
        run(frames)
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        run(frames)
        calls += 1
    sync()
    return calls * len(frames) / (time.perf_counter() - t0)


def rel_diff(s: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(s.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def build_bundle(size: int, n_train: int, workdir: Path) -> tuple[Bundle, Any, np.ndarray, np.ndarray]:
    """PatchCore fitted on generated parts; (bundle with both ONNX graphs, torch export module, test frames, labels)."""
    from trainer import export as ex
    from trainer.config import TrainConfig
    from trainer.data import load_test, train_paths
    from trainer.frames import TrainingData
    from trainer.models import create_model
    from trainer.synthetic import make_dataset

    data = make_dataset(workdir / "data", n_train=n_train, n_test_good=32, n_test_defect=32, size=size, seed=0)
    cfg = TrainConfig()
    cfg.input.height = cfg.input.width = size
    cfg.export.max_batch = 128
    model = create_model("patchcore", cfg)
    model.fit(TrainingData(fit_paths=train_paths(data), holdout_paths=[], hw=(size, size), workers=0))
    module = model.export_module()
    bundle_dir = new_version_dir(workdir / "engines", "patchcore")
    ex.export_onnx(module, bundle_dir / "model.onnx", (size, size), cfg.export.opset)
    info = ex.convert_fp16(bundle_dir / "model.onnx", bundle_dir / "model.fp16.onnx", model.fp32_scopes)
    write_manifest(bundle_dir, model_name="patchcore", input_spec={"height": size, "width": size, "max_batch": 128},
                   outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]},
                            {"name": "anomaly_map", "dtype": "float32", "shape": ["N", size, size]}],
                   calibration={"threshold": 1.0}, training_data={"count": n_train, "hash": "generated"},
                   metrics={}, extra={"fp16": {"file": "model.fp16.onnx", "fp32_scopes": info["fp32_scopes"],
                                               "fp32_ops": info["fp32_ops"], "fp32_nodes": info["fp32_nodes"]}})
    test = load_test(data, (size, size))
    assert test is not None
    return load_bundle(bundle_dir), module, test.images, test.labels


def onnx_rows(bundle: Bundle, frames: np.ndarray, labels: np.ndarray, batches: list[int],
              seconds: float) -> tuple[list[Row], np.ndarray]:
    rows, ref = [], np.zeros(0)
    fp16 = bundle.onnx_fp16_path
    for precision, path in (("fp32", bundle.onnx_path), ("fp16 graph", fp16)):
        if path is None:
            continue
        cpu = OrtBackend(path, max_batch=max(batches), providers=["CPUExecutionProvider"], warmup=False)
        scores = cpu.infer(frames)["score"]
        ref = scores if precision == "fp32" else ref
        rows.append(Row("ONNX Runtime CPU: scores", precision, score_diff=rel_diff(scores, ref) if len(ref) else 0.0,
                        auroc=scores_auroc(scores, labels)))
        best = OrtBackend(path, max_batch=max(batches), warmup=False)  # its best provider here (CUDA EP if built)
        for b in batches:
            provider = best.providers[0].replace("ExecutionProvider", "")
            rows.append(Row(f"ONNX Runtime {provider}", precision, b,
                            frames_per_second(best.infer, _tile(frames, b), seconds)))
    return rows, ref


def _tile(frames: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([frames] * (n // len(frames) + 1))[:n]


def tensorrt_rows(bundle: Bundle, frames: np.ndarray, labels: np.ndarray, ref: np.ndarray, batches: list[int],
                  seconds: float) -> list[Row]:
    from edge.backends.tensorrt import TensorRTBackend

    rows = []
    for precision in ("fp32", "fp16"):
        t0 = time.monotonic()
        backend = TensorRTBackend(bundle, max_batch=max(batches), precision=precision, rebuild=True)
        built = time.monotonic() - t0
        scores = backend.infer(frames)["score"]
        rows.append(Row("TensorRT engine: build, scores", precision, build_s=built, score_diff=rel_diff(scores, ref),
                        auroc=scores_auroc(scores, labels), note=backend.plan_path.name))
        for b in batches:
            fps = frames_per_second(backend.infer, _tile(frames, b), seconds)
            rows.append(Row("TensorRT engine", precision, b, fps))
        backend.close()
    return rows


def torch_rows(module: Any, frames: np.ndarray, labels: np.ndarray, ref: np.ndarray, batches: list[int],
               seconds: float, compile_too: bool) -> list[Row]:
    import torch

    dev = torch.device("cuda")
    module = module.to(dev).eval()
    sync = torch.cuda.synchronize

    def runner(fn: Callable[[torch.Tensor], Any], autocast: bool) -> Callable[[np.ndarray], np.ndarray]:
        def run(batch: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(batch).to(dev, non_blocking=True)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
                return fn(x)[0].float().cpu().numpy()  # type: ignore[no-any-return]
        return run

    variants: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
        ("torch CUDA eager", "fp32", runner(module, False)),
        ("torch CUDA eager", "fp16 autocast", runner(module, True))]
    if compile_too:
        variants.append(("torch CUDA torch.compile", "fp16 autocast", runner(torch.compile(module), True)))
    rows = []
    for what, precision, run in variants:
        t0 = time.monotonic()
        scores = np.concatenate([run(frames[i:i + 32]) for i in range(0, len(frames), 32)])
        rows.append(Row(f"{what}: scores", precision, build_s=time.monotonic() - t0, score_diff=rel_diff(scores, ref),
                        auroc=scores_auroc(scores, labels), note="first call includes compilation" if "compile" in what
                        else ""))
        for b in batches:
            rows.append(Row(what, precision, b, frames_per_second(run, _tile(frames, b), seconds, sync)))
    return rows


def fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    print("| what | precision | batch | frames/s | build / first call s | score diff vs ONNX FP32 | AUROC | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.what} | {r.precision} | {fmt(r.batch, 'd')} | {fmt(r.fps, ',.0f')} | {fmt(r.build_s, '.1f')} | "
              f"{fmt(r.score_diff, '.2e')} | {fmt(r.auroc, '.4f')} | {r.note} |")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160, help="input size in pixels (PatchCore's default 160)")
    ap.add_argument("--train", type=int, default=40, help="generated training parts")
    ap.add_argument("--batches", help="batch sizes (default 1,8,32,128 with a GPU, 1,8 without)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time spent per throughput row")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for a minute or more)")
    args = ap.parse_args(argv)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    trt_reason = tensorrt_unavailable_reason()
    batches = [int(b) for b in (args.batches or ("1,8,32,128" if gpu else "1,8")).split(",")]
    print(f"GPU: {gpu or 'none: torch.cuda.is_available() is False; only the CPU rows below'}")
    print(f"TensorRT: {'imports, GPU visible' if trt_reason is None else trt_reason}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        t0 = time.monotonic()
        bundle, module, frames, labels = build_bundle(args.size, args.train, Path(tmp))
        print(f"PatchCore at {args.size} px fitted on {args.train} generated parts in {time.monotonic() - t0:.0f}s; "
              f"{len(frames)} test images ({int(labels.sum())} with planted defects)", flush=True)
        rows, ref = onnx_rows(bundle, frames, labels, batches, args.seconds)
        if gpu and trt_reason is None:
            rows += tensorrt_rows(bundle, frames, labels, ref, batches, args.seconds)
        if gpu:
            rows += torch_rows(module, frames, labels, ref, batches, args.seconds, not args.no_compile)
        print_table(rows)
    if not gpu:
        print("no GPU here: the TensorRT and torch-on-CUDA rows need one (run this script on the GPU machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
