"""Training throughput of the shared loop (images/s) and where one training step spends its time.

    python benchmarks/train_throughput.py [--models ganomaly,skip-ganomaly] [--size 32] [--width 64]
        [--batch 64] [--images 512] [--epochs 2] [--device auto] [--threads 0]

Per model: generated parts are written to a temporary folder and trained through the real loop
(trainer/loop.py: DataLoader from disk, every update, validation) for ``--epochs``; images/s is the loop's own
per-epoch figure (median over epochs after the first, which pays for warm-up). Then one more epoch runs under
torch.profiler and the time of the phases the loop labels (data, each update's forward, backward and
optimiser step) is printed as a share of the step. The networks are the papers' (width 64 = ngf = ndf).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(model_name: str, size: int, width: int, batch: int, images: int, epochs: int, device: str,
        workdir: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    from trainer.config import parse_train_config
    from trainer.data import train_paths
    from trainer.frames import TrainingData
    from trainer.loop import EpochTrainer
    from trainer.models import RunOptions, create_model
    from trainer.synthetic import make_dataset

    data_dir = make_dataset(workdir / f"parts-{size}", n_train=images, n_test_good=0, n_test_defect=0, size=size)
    paths = train_paths(data_dir)
    key = model_name.replace("-", "_")
    cfg = parse_train_config(f"model: {model_name}\ninput: {{height: {size}, width: {size}}}\nbatch_size: {batch}\n"
                             f"epochs: {epochs}\ntraining: {{workers: 0}}\n{key}: {{ngf: {width}, ndf: {width}}}\n")
    model = create_model(model_name, cfg)
    data = TrainingData(fit_paths=paths[: images - batch], holdout_paths=paths[images - batch:], hw=(size, size))
    run_opts = RunOptions(device=device, progress=False)
    info = model.fit(data, lambda _m: None, run_opts)
    rates = [row["images_per_second"] for row in info["history"][1:]] or [info["history"][0]["images_per_second"]]
    rate = sorted(rates)[len(rates) // 2]

    cfg.epochs = 1
    trainer = EpochTrainer(model, data, run_opts, lambda _m: None)  # type: ignore[arg-type]
    loader = data.loader(data.fit_paths, batch, shuffle=True, drop_last=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    t0 = time.monotonic()
    with profile(activities=activities) as prof:
        trainer._train_epoch(1, loader)
    wall = time.monotonic() - t0
    phases = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("step.")}
    total = sum(phases.values()) or 1.0
    lines = [f"{model_name}: {size}x{size}, width {width}, batch {batch}, {trainer.device}; "
             f"{rate:.1f} images/s (loop's per-epoch median); profiled epoch {wall:.1f}s",
             f"  {'phase':<32}{'share of step':>14}"]
    for name, t in sorted(phases.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<32}{100 * t / total:>13.1f}%")
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    lines.append("  top operators by self CPU time:")
    lines += ["  " + line for line in top.splitlines()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default="ganomaly,skip-ganomaly")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for name in args.models.split(","):
            print(run(name, args.size, args.width, args.batch, args.images, args.epochs, args.device, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
