"""Throughput and latency of a bundle's engine on this machine, as a table.

    python benchmarks/throughput.py [BUNDLE] [--batches 1,2,4,8] [--seconds 3]
    python benchmarks/throughput.py --models draem,cutpaste,patch-svdd [--batches 1,8] [--threads 1]

Without BUNDLE it uses engines/patchcore's promoted version, training one on generated data first if
there is none. Rows: ONNX Runtime on model.onnx (FP32) and model.fp16.onnx at each batch size. Speed is
reported as a ratio against FP32 at batch 1 measured in the same run, because this machine is noisy.

``--models``: what each model costs a station, so a user can choose: every named model is fitted for one epoch
(``--set`` keys on top: its speed does not depend on how well it learnt) on generated parts at its shipped input
size, and one row per model gives that input, the graph's parameters and size, and FP32 frames/s at each batch
size on ``--threads`` ONNX Runtime threads; the models are measured in turn in the same run.
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

# Keys that make a model's fit one short pass whatever its recipe: the epochs of its pre-training or first stage too.
ONE_PASS = {"deep_svdd.pretrain_epochs": 1, "deep_sad.pretrain_epochs": 1, "cutpaste.freeze_epochs": 0,
            "efficient_ad.teacher_epochs": 1}


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


def graph_facts(path: Path) -> tuple[int, float]:
    """(parameters, size in MB) of an ONNX graph: the element count of its initializers and the file's size."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return params, path.stat().st_size / 1e6


def fit_for_speed(model: str, workdir: Path, overrides: list[tuple[str, object]], images: int) -> Bundle:
    """``model`` fitted for one epoch at its shipped input size on ``images`` generated parts (the speed of its graph
    does not depend on how well it learnt; a memory bank's size, and so its search, can depend on the images)."""
    import yaml

    from trainer.config import parse_train_config, with_overrides
    from trainer.models import get_model_class, section_key
    from trainer.pipeline import fit_bundle
    from trainer.synthetic import make_dataset

    size = get_model_class(model).defaults.input_size
    keys = {"model": model, "epochs": 1, "training.workers": 0, "report.overlays": 0,
            **{k: v for k, v in ONE_PASS.items() if k.split(".")[0] == section_key(model)}}
    cfg = with_overrides({}, [*keys.items(), *overrides])
    data = make_dataset(workdir / f"data-{model}", n_train=images, n_test_good=0, n_test_defect=0, size=size, seed=0)
    return load_bundle(fit_bundle(parse_train_config(yaml.safe_dump(cfg)), data, workdir / "engines",
                                  log=lambda _m: None))


def model_rows(models: list[str], batches: list[int], seconds: float, threads: int,
               overrides: list[tuple[str, object]], images: int) -> list[str]:
    """One row per model: input, parameters, graph MB, FP32 frames/s at each batch size. A model whose short fit
    is refused (a setting it needs: HTD wants an epoch a scale, ``--set epochs=2``) gets its one-line reason as its
    row and the others go on; returns the models not measured."""
    import torch

    from core.errors import UserError
    from trainer.models import get_model_class

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    heads = "".join(f"{f'img/s b{b}':>10}" for b in batches)
    print(f"FP32 graphs, onnxruntime CPU, {threads} thread(s), {seconds:g} s a batch size\n")
    print(f"{'model':<22} {'input':>9} {'params (M)':>10} {'graph MB':>9}{heads}")
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        refused = []
        for model in models:
            station_form = get_model_class(model).station_form
            if station_form:  # no graph to time (AnoGAN: a search per image)
                print(f"{model:<22} no station export: its station form is {station_form}", flush=True)
                continue
            try:
                bundle = fit_for_speed(model, Path(tmp), overrides, images)
            except UserError as err:
                print(f"{model:<22} not measured: {err}", flush=True)
                refused.append(model)
                continue
            h, w = bundle.input_hw
            params, mb = graph_facts(bundle.onnx_path)
            backend = OrtBackend(bundle.onnx_path, max_batch=max(batches), intra_op_threads=threads,
                                 providers=["CPUExecutionProvider"])
            speeds = []
            for b in batches:
                frames = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
                speeds.append(b * 1000.0 / statistics.median(measure(backend, frames, seconds)))
            backend.close()
            cells = "".join(f"{v:>10.1f}" for v in speeds)
            print(f"{model:<22} {f'{h}x{w}':>9} {params / 1e6:>10.2f} {mb:>9.1f}{cells}", flush=True)
    return refused


def main() -> int:
    from trainer.config import parse_override

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per row")
    ap.add_argument("--models", help="comma-separated model names: fit each for one epoch and print its cost row")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch threads with --models")
    ap.add_argument("--images", type=int, default=24, help="generated parts each --models fit learns from "
                    "(default 24; raise it to fill a model's memory bank)")
    ap.add_argument("--set", type=parse_override, action="append", default=[], dest="overrides",
                    metavar="KEY=VALUE", help="a trainer config key for --models' fits (repeatable)")
    args = ap.parse_args()
    if args.models:
        refused = model_rows(args.models.split(","), [int(b) for b in args.batches.split(",")], args.seconds,
                             args.threads, args.overrides, args.images)
        if refused:
            print(f"throughput: not measured: {', '.join(refused)} (the reason is on each one's row)", file=sys.stderr)
        return 1 if refused else 0
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
