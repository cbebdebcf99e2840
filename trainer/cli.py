"""``edge-train``: fit a model into a promoted bundle, or evaluate a bundle on a dataset.

  edge-train fit --data DIR [--model NAME] [--out engines/] [--config config/train.yaml] [--epochs N]
                 [--batch-size B] [--device auto|cpu|cuda] [--seed S] [--resume]
                 [--promote auto|always|never] [--state-dir DIR [--station ID]]
  edge-train eval BUNDLE --data DIR [--out DIR] [--cases N] [--json]
  edge-train rerun BUNDLE --data DIR [--stages evaluate,report] [--out DIR] [--json]
  edge-train check-engine BUNDLE [--max-batch N] [--data DIR] [--json]
  edge-train build-engine BUNDLE [--precision fp16|fp32] [--max-batch N] [--opt-batch N] [--workspace-mb M]
                          [--dla-core K] [--force]
  edge-train retrain --station-data DIR --current BUNDLE [--holdout DIR] [--out engines/] [--config FILE]
                     [--state-dir DIR [--station ID]] [--json]
  edge-train promote BUNDLE
  edge-train rollback MODEL [--out engines/]
  edge-train config --dump | --check [--file config/train.yaml]
  edge-train --version

Each command's ``--help`` shows its options' defaults and worked examples (``EXAMPLES`` below; a test parses each).

``edge-train fit --help`` also lists the registered models by family, each with what it catches (surface defects
or wrong and foreign objects) and its settings keys and their defaults. ``edge-train config --dump`` prints a train
config with its model sections generated from the registry (``> config/train.yaml`` refreshes the shipped one);
``--check`` exits 1 when the file's model sections differ from what the registry generates.

``fit`` promotes the first bundle of a model; after that a new bundle replaces the current one only when it is at
least as good on DIR/test by the rule ``retrain`` follows (trainer/champion.py), the current one judged at a
station's on-site threshold with ``--state-dir``; a refusal is one line with both measures, and
``--promote always`` skips the rule.

Progress goes to stderr; ``fit`` prints the bundle path as the last line of stdout. Any problem the user can
fix is one line ``edge-train: error: ...`` on stderr and exit status 2, without a traceback. The arguments,
the --model name and the data folder are checked before torch is imported, so a typo answers in a second
(the config's model sections come from the model files, so the config itself is read after them). Ctrl-C
during training stops after the current step and keeps the last checkpoint (exit status 130); ``--resume``
continues from it. Under torchrun (``torchrun --nproc_per_node N -m trainer.cli fit ...``) rank 0 does all of
the above and the other ranks exit 0 silently once their share is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from core.cli import OneLineArgumentParser, positive_int
from core.errors import UserError
from trainer.config import DEFAULT_MODEL

# Each sub-command's worked examples, shown at the end of its --help: after `make demo` (demo-out/data holds the
# generated parts, engines/<the default model> its bundle), with the shipped configs. Every line must parse with its
# parser (tests/test_cli_help.py). A note says what a placeholder or a path stands for.
_BUNDLE = f"engines/{DEFAULT_MODEL}"
EXAMPLES: dict[str, list[str]] = {
    "fit": [f"edge-train fit --data demo-out/data --model {DEFAULT_MODEL}",
            "edge-train fit --data demo-out/data --seed 1 --promote never"],
    "eval": [f"edge-train eval {_BUNDLE} --data demo-out/data",
             f"edge-train eval {_BUNDLE} --data demo-out/data --json --cases 0"],
    "rerun": [f"edge-train rerun {_BUNDLE} --data demo-out/data --stages calibrate,evaluate,report"],
    "check-engine": [f"edge-train check-engine {_BUNDLE} --data demo-out/data"],
    "build-engine": [f"edge-train build-engine {_BUNDLE} --max-batch 8"],
    "retrain": [f"edge-train retrain --station-data state/collect/station1 --current {_BUNDLE}"],
    "promote": [f"edge-train promote {_BUNDLE}/VERSION"],
    "rollback": [f"edge-train rollback {DEFAULT_MODEL}"],
    "config": ["edge-train config --check", "edge-train config --dump --file config/train.yaml"],
}
EXAMPLE_NOTES = {
    "build-engine": "on the station, with TensorRT and its GPU",
    "retrain": "state/collect/station1: the collect.dir of a station run with the shipped config and "
               "collect.enabled: true",
    "promote": f"VERSION: one of the version folders `ls {_BUNDLE}` lists",
}


def examples_epilog(lines: Sequence[str], note: str = "") -> str:
    """An epilog of worked examples; the help formatter keeps the indented lines as written."""
    header = "example" if len(lines) == 1 else "examples"
    return f"{header}{f' ({note})' if note else ''}:\n" + "\n".join(f"  {line}" for line in lines)


def _examples(command: str) -> str:
    return examples_epilog(EXAMPLES[command], EXAMPLE_NOTES.get(command, ""))


class _FitHelp(argparse.Action):
    """``fit --help``: the usual help, then the registered models grouped by family, what each catches, its keys.

    Only this help imports the models (and torch), so every other argument check stays fast.
    """

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: Optional[str] = None) -> None:  # noqa: A002 - argparse's name
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: Optional[str] = None) -> None:
        parser.epilog = f"{parser.epilog}\n\n{model_help()}" if parser.epilog else model_help()
        parser.print_help()
        parser.exit()


def model_help() -> str:
    """The registered models by family (FAMILIES' order), each with what it catches and its config section's keys
    and defaults."""
    from trainer.config import yaml_value
    from trainer.models import FAMILIES, field_docs, get_model_class, list_models, section_key, settings_class

    families: dict[str, list[str]] = {}
    for name in list_models():
        model = get_model_class(name)
        shown = f"{name} ({model.display_name})" if model.display_name != name else name
        entry = f"    {shown}: {model.catches or 'what it catches is not stated'}"
        settings = settings_class(name)
        if settings is not None:
            keys = ", ".join(f"{key}={yaml_value(default)}" for key, default, _doc in field_docs(settings))
            entry += "\n" + textwrap.fill(f"{section_key(name)}: {keys}", width=110, initial_indent=" " * 6,
                                          subsequent_indent=" " * 8, break_long_words=False)
        families.setdefault(model.family or "family not stated", []).append(entry)
    order = [family for family in FAMILIES if family in families] + sorted(set(families) - set(FAMILIES))
    return ("models (--model), by family, each with what it catches and its config section's keys and defaults "
            "(config/train.yaml documents each key):\n"
            + "\n".join(f"  {family}:\n" + "\n".join(families[family]) for family in order))


def _station_options(parser: argparse.ArgumentParser) -> None:
    """--state-dir / --station: judge the current bundle at the threshold a station calibrated it to on site."""
    parser.add_argument("--state-dir", type=Path, help="a station's state_dir: the current bundle is judged at that "
                        "station's on-site threshold (edge-run --calibrate) when it calibrated that version")
    parser.add_argument("--station", help="which station's calibration in --state-dir (default: the only one there)")


def _calibration_file(args: argparse.Namespace) -> Optional[Path]:
    """The on-site calibration file --state-dir / --station point at (None without --state-dir)."""
    from trainer.champion import station_calibration_file

    if args.state_dir is None:
        if args.station:
            raise UserError(f"--station {args.station}: needs --state-dir, the folder where that station keeps its "
                            "on-site calibration")
        return None
    return station_calibration_file(args.state_dir, args.station)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="edge-train", description="Train and evaluate anomaly-detection bundles.",
                                   epilog=examples_epilog([*EXAMPLES["fit"][:1], *EXAMPLES["eval"][:1]])
                                   + "\n\nEach command's --help shows its options, their defaults and examples.")
    parser.add_version()
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train on DIR/train/good, calibrate, export, write and promote a bundle",
                         add_help=False, epilog=_examples("fit"))
    fit.add_argument("-h", "--help", action=_FitHelp,
                     help="show this help and the models by family, with what each catches")
    fit.add_argument("--data", required=True, type=Path, help="dataset folder (MVTec AD layout)")
    fit.add_argument("--model", help="registered model name (default: the config's 'model'); the models, by "
                     "family, with what each catches, are listed below")
    fit.add_argument("--out", type=Path, default=Path("engines"), help="engines root (default: engines/)")
    fit.add_argument("--config", type=Path, help="train config YAML (default: config/train.yaml)")
    fit.add_argument("--epochs", type=int, help="epochs, for models trained by epochs (the others ignore it) "
                     "(default: the config's epochs, else the model's)")
    fit.add_argument("--batch-size", type=int, help="images per training step (default: the model's)")
    fit.add_argument("--device", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N "
                     "(default: the config's device, else auto)")
    fit.add_argument("--seed", type=int, help="random seed (overrides the config) (default: the config's seed, "
                     "else 0)")
    fit.add_argument("--resume", action="store_true",
                     help="continue the interrupted training run in OUT/<model>/checkpoints/ (models trained by "
                     "epochs)")
    fit.add_argument("--promote", choices=("auto", "always", "never"), default="auto",
                     help="auto (default): the first bundle of a model becomes current, a later one only when it is "
                     "at least as good as the current on DIR/test (the retrain rule); always: current regardless; "
                     "never: written only")
    _station_options(fit)
    ev = sub.add_parser("eval", help="score DIR/test through a bundle's ONNX graph",
                        epilog=_examples("eval"))
    ev.add_argument("bundle", help="bundle folder, or a model folder (its current version)")
    ev.add_argument("--data", required=True, type=Path, help="dataset folder with test/ (and ground_truth/)")
    ev.add_argument("--out", type=Path, help="folder for report.json and the plots (default: a new "
                    "<model folder>/evals/<version>-<UTC time>/; never inside the bundle)")
    ev.add_argument("--cases", type=int, default=6, help="hardest cases per side in hardest_cases.png (default 6)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    rr = sub.add_parser("rerun", help="rerun stages of a fit on an existing bundle through its ONNX graph "
                        "(calibrate, evaluate, report), without refitting; the bundle is not changed",
                        epilog=_examples("rerun"))
    rr.add_argument("bundle", help="bundle folder, or a model folder (its current version)")
    rr.add_argument("--data", required=True, type=Path, help="dataset folder: train/good (calibrate), test/ "
                    "(evaluate, report)")
    rr.add_argument("--stages", default="evaluate,report", help="comma-separated, of calibrate, evaluate, report "
                    "(default evaluate,report; report needs evaluate)")
    rr.add_argument("--out", type=Path, help="folder for report.json and the plots (default: a new "
                    "<model folder>/evals/<version>-<UTC time>/; never inside the bundle)")
    rr.add_argument("--json", action="store_true", help="print one JSON object")
    ce = sub.add_parser("check-engine", help="TensorRT readiness of a bundle's ONNX graphs (no TensorRT needed)",
                        epilog=_examples("check-engine"))
    ce.add_argument("bundle", help="bundle folder, or a model folder (its current version)")
    ce.add_argument("--max-batch", type=positive_int, help="batch to check at (default: the bundle's max_batch)")
    ce.add_argument("--data", type=Path, help="dataset folder with test/: compare FP16 and FP32 scores and AUROC")
    ce.add_argument("--json", action="store_true", help="print one JSON object")
    be = sub.add_parser("build-engine", help="build this device's TensorRT plan into the bundle's plans/",
                        epilog=_examples("build-engine"))
    be.add_argument("bundle", help="bundle folder, or a model folder (its current version)")
    be.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="engine precision (default fp16)")
    be.add_argument("--max-batch", type=positive_int, help="largest batch of the profile (default: the bundle's)")
    be.add_argument("--opt-batch", type=positive_int, help="batch TensorRT tunes for (default: --max-batch)")
    be.add_argument("--workspace-mb", type=int, default=0, help="builder workspace limit in MB (0 = TensorRT's)")
    be.add_argument("--dla-core", type=int, help="Jetson Orin: build for this DLA core (GPU fallback allowed)")
    be.add_argument("--force", action="store_true", help="rebuild even when a matching plan is cached")
    rt = sub.add_parser("retrain", help="fit a challenger on a station's collected frames; promote it only when it "
                        "is at least as good as the current bundle on the same hold-out",
                        epilog=_examples("retrain"))
    rt.add_argument("--station-data", required=True, type=Path, help="a station's collection folder (collect.dir)")
    rt.add_argument("--current", required=True, help="the champion: a bundle folder or a model folder (its current)")
    rt.add_argument("--holdout", type=Path, help="MVTec-style folder with test/good and test/<defect> to compare on "
                    "(default: the newest collected normals, labelled events, planted defects)")
    rt.add_argument("--out", type=Path, help="engines root for the challenger (default: the champion's)")
    rt.add_argument("--config", type=Path, help="train config whose 'retrain' rule applies "
                    "(default: config/train.yaml)")
    _station_options(rt)
    rt.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    pr = sub.add_parser("promote", help="make a bundle its model's current version (stations pick it up)",
                        epilog=_examples("promote"))
    pr.add_argument("bundle", type=Path, help="bundle folder engines/<model>/<version>")
    rb = sub.add_parser("rollback", help="make the version promoted before the current one current again",
                        epilog=_examples("rollback"))
    rb.add_argument("model", help="model folder engines/<model>, or a model name under --out")
    rb.add_argument("--out", type=Path, default=Path("engines"), help="engines root (default: engines/)")
    cf = sub.add_parser("config", help="print or check a train config's model sections, generated from the "
                        "registered models' settings", epilog=_examples("config"))
    action = cf.add_mutually_exclusive_group(required=True)
    action.add_argument("--dump", action="store_true", help="print the file with its model sections regenerated")
    action.add_argument("--check", action="store_true", help="exit 1 when the file's model sections differ from "
                        "the generated ones")
    cf.add_argument("--file", type=Path, help="train config with the generated-section markers "
                    "(default: the shipped config/train.yaml)")
    return parser


def _fit(args: argparse.Namespace) -> int:
    # Everything a user can get wrong on the command line is checked here, before the imports that load torch
    # (the config's model sections come from the model files, so loading the config imports torch).
    from trainer.config import check_device, load_train_config
    from trainer.data import train_paths
    from trainer.models import check_model_name

    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if args.device is not None:
        try:
            check_device(args.device)
        except ValueError as exc:
            raise UserError(f"--device {args.device}: {exc}") from None
    if args.model:
        check_model_name(args.model)
    if args.config is not None and not args.config.is_file():
        raise UserError(f"{args.config}: config file not found; pass an existing file with --config")
    train_paths(args.data)
    site_calibration = _calibration_file(args)

    cfg = load_train_config(args.config)
    if args.model:
        cfg.model = args.model
    if args.seed is not None:
        cfg.seed = args.seed
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.device is not None:
        cfg.device = args.device
    check_model_name(cfg.model)

    from trainer.pipeline import fit_bundle

    bundle_dir = fit_bundle(cfg, args.data, args.out, resume=args.resume, promote_bundle=args.promote != "never",
                            promote_over_current=args.promote == "always", site_calibration=site_calibration)
    print(bundle_dir, flush=True)
    return 0


def _config(args: argparse.Namespace) -> int:
    from trainer.config import DEFAULT_CONFIG, render_train_yaml

    path = args.file or DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config file ({exc}); pass an existing file with --file") from None
    rendered = render_train_yaml(text, str(path))
    if args.dump:
        sys.stdout.write(rendered)
        sys.stdout.flush()
        return 0
    if rendered != text:
        print(f"edge-train: {path}: its model sections differ from the registry's; regenerate them with "
              f"`edge-train config --dump --file {path}`", file=sys.stderr, flush=True)
        return 1
    print(f"{path}: model sections match the registry", flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.cases < 0:
        raise UserError(f"--cases {args.cases}: must be >= 0 (0: no hardest-cases grid)")
    from core.bundle import load_bundle
    from trainer.report import report_dir

    _require_bundle(args.bundle)
    out = report_dir(load_bundle(args.bundle), args.out)  # a wrong --out answers before torch loads

    from trainer.evaluate import evaluate_bundle, write_eval_report

    evaluation = evaluate_bundle(args.bundle, args.data)
    report = write_eval_report(evaluation, args.data, out, args.cases)
    if args.json:
        print(json.dumps({**evaluation.metrics, "report": str(report)}), flush=True)
    else:
        for key, value in evaluation.metrics.items():
            print(f"{key:17s} {value:.4f}" if isinstance(value, float) else f"{key:17s} {value}")
        print(f"{'report':17s} {report}", flush=True)
    return 0


def _rerun(args: argparse.Namespace) -> int:
    from core.bundle import load_bundle
    from trainer.report import report_dir

    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    _require_bundle(args.bundle)
    if "report" in stages:
        report_dir(load_bundle(args.bundle), args.out)  # a wrong --out answers before torch loads

    from trainer.pipeline import rerun_stages

    run = rerun_stages(args.bundle, args.data, stages, args.out)
    report = None if run.report_path is None else str(run.report_path)
    if args.json:
        print(json.dumps({"calibration": run.calibration, "metrics": run.metrics, "report": report}), flush=True)
    else:
        for key, value in {"threshold": run.calibration["threshold"], **run.metrics}.items():
            print(f"{key:17s} {value:.4f}" if isinstance(value, float) else f"{key:17s} {value}")
        print(f"{'report':17s} {report or '-'}", flush=True)
    return 0


def _require_bundle(ref: str | Path, flag: str = "") -> None:
    """One line, naming this command's own argument (``flag``), when nothing is at ``ref``: core's own message
    suggests edge-run's --engine, a flag the trainer does not have."""
    if not Path(ref).exists():
        raise UserError(f"{flag + ' ' if flag else ''}{ref}: no bundle or model folder here; pass a bundle folder "
                        "engines/<model>/<version> or a model folder engines/<model> (edge-train fit writes them)")


def _retrain(args: argparse.Namespace) -> int:
    from trainer.config import load_train_config

    rule = load_train_config(args.config).retrain
    if not args.station_data.is_dir():
        raise UserError(f"--station-data {args.station_data}: no such folder; it is a station's collection folder "
                        "(collect.dir in station.yaml, default <state_dir>/collect/<station>), which edge-run fills "
                        "while collect.enabled is true: run the station with collection on, or pass the folder it "
                        "collects into")
    if args.holdout is not None and not args.holdout.is_dir():
        raise UserError(f"--holdout {args.holdout}: no such folder; pass an MVTec-style folder with test/good and "
                        "test/<defect>, or leave --holdout out")
    _require_bundle(args.current, "--current")
    site_calibration = _calibration_file(args)
    from trainer.retrain import retrain

    report = retrain(args.station_data, args.current, args.out, args.holdout, rule,
                     lambda m: print(f"edge-train: {m}", file=sys.stderr, flush=True), site_calibration)
    print(json.dumps({k: v for k, v in report.items() if k not in ("scores", "labels")}) if args.json
          else report["said"] if report.get("skipped") else report["decision"], flush=True)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from core.bundle import load_bundle, promote

    _require_bundle(args.bundle)
    bundle = load_bundle(args.bundle)
    if bundle.path.resolve() != args.bundle.resolve():
        raise UserError(f"{args.bundle}: promote takes a version folder engines/<model>/<version>, not a model folder")
    promote(bundle.path, reason="promoted by hand (edge-train promote)")
    print(f"{bundle.model_name}: {bundle.version} is current", flush=True)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from core.bundle import CURRENT, rollback

    model_dir = Path(args.model)
    if not (model_dir / CURRENT).is_file() and (args.out / args.model / CURRENT).is_file():
        model_dir = args.out / args.model
    if not (model_dir / CURRENT).is_file():
        raise UserError(f"{args.model}: not a model folder with a '{CURRENT}' file (here or under {args.out})")
    target = rollback(model_dir)
    print(f"{model_dir.name}: rolled back to {target.name}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command in ("check-engine", "build-engine"):
            _require_bundle(args.bundle)
        if args.command == "check-engine":
            from trainer.engine_commands import check_engine

            return check_engine(args.bundle, args.max_batch, args.data, args.json)
        if args.command == "build-engine":
            from trainer.engine_commands import build_engine

            return build_engine(args.bundle, args.precision, args.max_batch, args.opt_batch, args.workspace_mb,
                                args.dla_core, args.force)
        commands = {"fit": _fit, "eval": _eval, "rerun": _rerun, "retrain": _retrain, "promote": _promote,
                    "rollback": _rollback, "config": _config}
        return commands[args.command](args)
    except UserError as exc:
        if exc.exit_code == 0:  # a torchrun helper rank whose share of the fit is done: rank 0 writes the bundle
            return 0
        kind = "interrupted" if exc.exit_code == 130 else "error"  # Ctrl-C in training: not the user's error
        print(f"edge-train: {kind}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
