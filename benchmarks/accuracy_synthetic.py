"""A model's accuracy on generated parts over several seeds, measured through the exported ONNX graph.

    python benchmarks/accuracy_synthetic.py [--seeds 5] [--train 60] [--test-good 40] [--test-defect 80]
        [--val-defects 0] [--size 160] [--config config/train.yaml] [--model NAME] [--set KEY=VALUE ...] [-v]

The model is the config's (PatchCore as shipped) unless ``--model`` names another; ``--set`` changes one trainer
key (``--set epochs=12 --set input.height=64``).

Why: the trainer's own test checks one seed against a floor; this prints how far above it we are and how
much the numbers move between seeds (a single-seed number says little: see REFERENCES.md). Each seed
generates its own dataset (``trainer.synthetic.make_dataset``: brushed-metal flanges, four planted defect
kinds with pixel masks) and runs the trainer's public pipeline (``fit_bundle``: fit, calibrate, export,
evaluate, bundle) into a temporary engines root, never the repo's ``engines/``. The bundle is then scored
with ``evaluate_bundle``, what ``edge-train eval`` runs: image AUROC, pixel AUROC, and F1 / recall /
false alarms at the bundle's calibrated threshold. By default the threshold comes from held-out good parts
only (what a station has); ``--val-defects N`` adds labelled validation parts, so it is F1-optimal.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from core.bundle import load_bundle  # noqa: E402
from core.errors import UserError  # noqa: E402
from trainer.config import (  # noqa: E402
    DEFAULT_CONFIG,
    TrainConfig,
    parse_override,
    parse_train_config,
    with_overrides,
)
from trainer.evaluate import evaluate_bundle  # noqa: E402
from trainer.models import get_model_class  # noqa: E402
from trainer.pipeline import fit_bundle  # noqa: E402
from trainer.synthetic import DEFECT_KINDS, make_dataset  # noqa: E402


@dataclass
class SeedResult:
    """Metrics of one seed's bundle on its own generated test set."""

    seed: int
    image_auroc: float
    pixel_auroc: Optional[float]
    f1: float
    recall: float
    false_alarm_rate: float
    threshold: float
    method: str
    seconds: float
    kind_auroc: dict[str, float] = field(default_factory=dict)


def benchmark_config(path: Optional[Path], model: Optional[str], overrides: Sequence[tuple[str, Any]]) -> TrainConfig:
    """The config file (default config/train.yaml), ``--model`` and each ``--set`` key, checked by the schema."""
    source = path or DEFAULT_CONFIG
    try:
        cfg = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--config {source}: cannot read it ({exc})") from None
    if model is not None:
        cfg["model"] = model
    where = f"{source} with --set" if overrides or model else str(source)  # the merged text's lines are not the file's
    return parse_train_config(yaml.safe_dump(with_overrides(cfg, overrides)), source=where)


def run_seed(seed: int, workdir: Path, n_train: int, n_test_good: int, n_test_defect: int, n_val_defect: int,
             size: int, config: TrainConfig, log: Callable[[str], None]) -> SeedResult:
    """Generate seed's dataset, fit a bundle with the trainer's pipeline, evaluate it through ONNX."""
    from sklearn.metrics import roc_auc_score

    t0 = time.monotonic()
    data = make_dataset(workdir / f"data-{seed}", n_train=n_train, n_test_good=n_test_good,
                        n_test_defect=n_test_defect, size=size, seed=seed, n_val_defect=n_val_defect)
    cfg = copy.deepcopy(config)
    cfg.seed = seed
    bundle_dir = fit_bundle(cfg, data, workdir / "engines", log)
    evaluation = evaluate_bundle(bundle_dir, data)
    bundle = load_bundle(bundle_dir)
    m = evaluation.metrics
    labels = evaluation.test.labels.astype(int)
    flagged = evaluation.scores >= m["threshold"]
    kinds = np.asarray(evaluation.test.kinds)
    kind_auroc = {}
    for kind in DEFECT_KINDS:
        sel = (kinds == kind) | (labels == 0)
        if (kinds == kind).any() and (labels == 0).any():
            kind_auroc[kind] = float(roc_auc_score(labels[sel], evaluation.scores[sel]))
    return SeedResult(
        seed=seed, image_auroc=float(m["image_auroc"]), pixel_auroc=m["pixel_auroc"], f1=float(m["f1"]),
        recall=float(flagged[labels == 1].mean()), false_alarm_rate=float(flagged[labels == 0].mean()),
        threshold=float(m["threshold"]), method=str(bundle.manifest["calibration"]["method"]),
        seconds=time.monotonic() - t0, kind_auroc=kind_auroc)


def _ms(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    vals = [v * scale for v in values]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {std:.{digits}f}"


def format_table(results: Sequence[SeedResult], header: str) -> str:
    """Per-seed rows, the mean ± sample std over seeds, and image AUROC by defect kind."""
    lines = [header, "",
             f"{'seed':>4} {'image AUROC':>11} {'pixel AUROC':>11} {'F1':>6} {'recall':>6} {'false alarms':>12} "
             f"{'threshold':>9} {'method':>8} {'seconds':>7}"]
    for r in results:
        pix = f"{r.pixel_auroc:.4f}" if r.pixel_auroc is not None else "-"
        lines.append(f"{r.seed:>4} {r.image_auroc:>11.4f} {pix:>11} {r.f1:>6.3f} {r.recall:>6.3f} "
                     f"{100 * r.false_alarm_rate:>11.1f}% {r.threshold:>9.3f} {r.method:>8} {r.seconds:>7.1f}")
    pixels = [r.pixel_auroc for r in results if r.pixel_auroc is not None]
    lines += ["", "mean ± std over seeds (sample std):",
              f"  image AUROC  {_ms([r.image_auroc for r in results], digits=4)}",
              f"  pixel AUROC  {_ms(pixels, digits=4) if pixels else '-'}",
              f"  F1           {_ms([r.f1 for r in results])}",
              f"  recall       {_ms([r.recall for r in results])}",
              f"  false alarms {_ms([r.false_alarm_rate for r in results], 100, 1)} % of good test parts",
              "", "image AUROC by defect kind (that kind vs the good test parts), mean ± std over seeds:"]
    for kind in DEFECT_KINDS:
        vals = [r.kind_auroc[kind] for r in results if kind in r.kind_auroc]
        if vals:
            lines.append(f"  {kind:<8} {_ms(vals, digits=4)}")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, Any]:
    try:
        return parse_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    ap.add_argument("--train", type=int, default=60, help="good training parts per seed (default 60)")
    ap.add_argument("--test-good", type=int, default=40, help="good test parts per seed (default 40)")
    ap.add_argument("--test-defect", type=int, default=80, help="defective test parts per seed (default 80)")
    ap.add_argument("--val-defects", type=int, default=0,
                    help="labelled validation parts (good + defect each) for an F1-optimal threshold; "
                         "0 = threshold from good parts only (default)")
    ap.add_argument("--size", type=int, default=160, help="generated image size in px (default 160)")
    ap.add_argument("--config", type=Path, help="train config YAML (default config/train.yaml)")
    ap.add_argument("--model", help="registered model name (default: the config's)")
    ap.add_argument("--set", type=_override, action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="a trainer config key, e.g. epochs=12 or stpm.lr=0.4 (repeatable)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the trainer's progress to stderr")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")

    def log(msg: str) -> None:
        if args.verbose:
            print(f"  {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    results: list[SeedResult] = []
    try:
        config = benchmark_config(args.config, args.model, args.overrides)
        cls = get_model_class(config.model)
        cfg = config.resolve(cls.defaults)
        with tempfile.TemporaryDirectory(prefix="bench-synthetic-") as tmp:
            for seed in range(args.seeds):
                r = run_seed(seed, Path(tmp), args.train, args.test_good, args.test_defect, args.val_defects,
                             args.size, config, log)
                results.append(r)
                print(f"seed {seed}: image AUROC {r.image_auroc:.4f} ({r.seconds:.1f}s)", file=sys.stderr,
                      flush=True)
    except UserError as exc:
        print(f"accuracy_synthetic: error: {exc}", file=sys.stderr)
        return 2
    changed = ", ".join(f"{k}={v}" for k, v in args.overrides) or "none"
    header = (f"{cls.display_name} ({cfg.model}: backbone {cfg.backbone.name}, input {cfg.input.height}x"
              f"{cfg.input.width}, epochs {cfg.epochs}, batch {cfg.batch_size}; --set: {changed}) on generated parts, "
              "through the exported ONNX graph (FP32)\n"
              f"per seed: {args.train} good training parts ({cfg.calibration.holdout_fraction:g} held out for the "
              f"threshold), {args.test_good} good + {args.test_defect} defective test parts "
              f"({', '.join(DEFECT_KINDS)}), {args.size} px, "
              + (f"{args.val_defects} labelled validation pairs" if args.val_defects else
                 "threshold from good parts only")
              + f"; {args.seeds} seeds, {(time.monotonic() - t0) / 60:.1f} min")
    print(format_table(results, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
