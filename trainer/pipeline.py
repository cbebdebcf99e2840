"""A fit as its stages in order (``fit_bundle``, what ``edge-train fit`` runs), and stages rerun on a bundle.

The stages themselves are in trainer/stages.py. A failed fit removes its half-written version folder; nothing is
promoted. ``rerun_stages`` runs the stages that need no torch model (calibrate, evaluate, report) again on an
existing bundle, through its ONNX graph and a data folder, and writes what they find outside the bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from torch import nn

from core.bundle import Bundle, load_bundle
from core.errors import UserError
from trainer import report as rep
from trainer.config import TrainConfig
from trainer.stages import CHECKPOINTS, STAGES, FitRun, log_to_stderr

__all__ = ["CHECKPOINTS", "fit_bundle", "rerun_stages"]


def fit_bundle(cfg: TrainConfig, data_dir: Path, engines_root: Path,
               log: Callable[[str], None] = log_to_stderr, resume: bool = False,
               stop_after_epoch: Optional[int] = None,
               on_export: Optional[Callable[[nn.Module], None]] = None, promote_bundle: bool = True,
               promote_over_current: bool = False, site_calibration: Optional[Path] = None) -> Path:
    """Train ``cfg.model`` on DIR/train/good, write and promote a bundle under ``engines_root``; returns its path.

    ``promote_bundle`` False: the bundle is written and verified but not made current (a retrain's challenger).
    When the model has a current bundle already, the new one replaces it only when it is at least as good on
    DIR/test (trainer/champion.py; the current judged at the station's threshold in ``site_calibration``, a
    station's on-site calibration file, when it holds one for it), unless ``promote_over_current``.
    Checkpoints of models trained by epochs go to ``engines_root/<model>/checkpoints/``; ``resume`` continues
    the run found there. A model with no station export (``station_form``: a score searched per image) writes no
    bundle: its fit is calibrated, evaluated and reported in torch, and the folder returned is its report's
    (engines/<model>/evals/). ``on_export`` receives the torch module the ONNX graph was exported from (benchmarks
    compare the two on the same weights).
    """
    run = FitRun(cfg, Path(data_dir), Path(engines_root), log, resume=resume, stop_after_epoch=stop_after_epoch,
                 on_export=on_export, promote_bundle=promote_bundle, promote_over_current=promote_over_current,
                 site_calibration=site_calibration)
    try:
        for stage in STAGES:
            stage.run(run)
    except BaseException:
        if run.bundle_dir is not None:
            shutil.rmtree(run.bundle_dir, ignore_errors=True)
        raise
    if run.bundle_dir is None:  # a model with no station export: its report is what the fit made
        assert run.report_dir is not None  # the export stage chose it
        return run.report_dir
    return run.bundle_dir


def rerun_stages(bundle_ref: str | Path, data_dir: str | Path, stages: Iterable[str] = ("evaluate", "report"),
                 out_dir: Optional[Path] = None, log: Callable[[str], None] = log_to_stderr) -> FitRun:
    """Run ``stages`` again on an existing bundle (a version folder, or a model folder: its current version).

    The data check always runs first (calibrate and evaluate read DIR); the other stages run in pipeline order.
    Only calibrate, evaluate and report can rerun (the fitted torch model is not kept after export); report needs
    evaluate (its plots are drawn from evaluate's scores) and writes report.json and the plots into ``out_dir``,
    default a new ``<model folder>/evals/<version>-<UTC time>/``, never into the bundle, whose files are
    checksummed. The bundle itself is left as it is: a new threshold found here reaches a station through a new
    fit or the station's own calibration. Returns the run (``calibration``, ``metrics``, ``report_path``).
    """
    wanted = _rerun_plan(stages)
    bundle = load_bundle(bundle_ref)  # verified: what is measured is what a station would load
    run = _restored_run(bundle, Path(data_dir), log, [s.name for s in STAGES if s.name in wanted])
    if "report" in wanted:
        run.report_dir = rep.report_dir(bundle, out_dir)  # refuses a folder inside the bundle; created by report
    for stage in STAGES:
        if stage.name in wanted:
            stage.run(run)
        if stage.name == "data check":
            _check_rerun_data(run, bundle, wanted)
    return run


def _check_rerun_data(run: FitRun, bundle: Bundle, wanted: set[str]) -> None:
    """A UserError when evaluate has no DIR/test; a note when DIR/train/good is not what the bundle was fitted on
    (a recalibration's hold-out may then hold images the model learnt)."""
    if "evaluate" in wanted and run.test is None:
        raise UserError(f"{run.data_dir / 'test'}: no test folder to evaluate on; add DIR/test/good and "
                        "DIR/test/<defect> images")
    if run.training_data != bundle.manifest.get("training_data"):
        run.note(f"{run.data_dir / 'train' / 'good'} is not the set {bundle.path} was fitted on (another "
                 "fingerprint): a recalibration's hold-out may hold images the model learnt")


def _rerun_plan(stages: Iterable[str]) -> set[str]:
    """The names of the stages to rerun, data check included; a one-line UserError for one that cannot."""
    by_name = {s.name: s for s in STAGES}
    wanted = {"data check"}
    for name in stages:
        stage = by_name.get(name)
        if stage is None:
            raise UserError(f"unknown stage '{name}'; the stages are {', '.join(by_name)}")
        if not stage.reruns:
            raise UserError(f"stage '{name}' cannot rerun on an existing bundle: {stage.why_not}")
        wanted.add(name)
    if "report" in wanted and "evaluate" not in wanted:
        raise UserError("stage 'report' reruns only with 'evaluate' (its plots are drawn from evaluate's scores); "
                        "ask for evaluate and report")
    return wanted


def _restored_run(bundle: Bundle, data_dir: Path, log: Callable[[str], None], stages: list[str]) -> FitRun:
    """A FitRun holding what a fit left in ``bundle``: the graphs, the manifest's calibration and metrics, and
    report.json's config and the parts of the stages that cannot rerun (fit, export, parity)."""
    fitted = _fit_report(bundle)
    cfg = _config_from_record(fitted.get("config", {}), bundle)
    run = FitRun(cfg, data_dir, bundle.path.parent.parent, log, promote_bundle=False)
    run.rerun = {"bundle": str(bundle.path), "stages": stages,
                 "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    run.bundle_dir = bundle.path
    run.fp32, run.fp16, run.score_only = bundle.onnx_path, bundle.onnx_fp16_path, bundle.onnx_score_path
    run.calibration = dict(bundle.manifest["calibration"])
    run.metrics = dict(bundle.manifest.get("metrics", {}))
    run.fit_seconds = float(run.metrics.get("fit_seconds", 0.0))
    run.fit_info = fitted.get("fit", {})
    run.codec = fitted.get("codec_augment", {})
    run.scaling = fitted.get("score_scaling") or {}
    run.export_info = fitted.get("export", {})
    run.parity = fitted.get("parity", {})
    return run


def _fit_report(bundle: Bundle) -> dict[str, Any]:
    """The bundle's report.json as its fit wrote it; empty when the bundle has none."""
    path = bundle.path / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _config_from_record(record: dict[str, Any], bundle: Bundle) -> TrainConfig:
    """The fit's TrainConfig from report.json's ``config`` (``asdict`` of it), the input from the manifest.

    Sections are restored field by field into today's defaults (every registered model's section included);
    keys today's config no longer has are skipped, so an older bundle still reruns.
    """
    cfg = TrainConfig()
    for f in fields(cfg):
        value, current = record.get(f.name), getattr(cfg, f.name)
        if is_dataclass(current) and not isinstance(current, type) and isinstance(value, dict):
            known = {g.name for g in fields(current)}
            setattr(cfg, f.name, replace(current, **{k: v for k, v in value.items() if k in known}))
        elif f.name in record and not is_dataclass(current) and not isinstance(value, (dict, list)):
            setattr(cfg, f.name, value)
    cfg.model = bundle.model_name
    # the manifest's input is the whole frame; a tiled graph cuts it into the tiles the manifest records
    tiling = bundle.manifest["input"].get("tiles")
    cfg.input.tiles = list(tiling["grid"]) if tiling else None
    cfg.input.height, cfg.input.width = tiling["tile"] if tiling else bundle.input_hw
    cfg.input.resize = bundle.input_resize
    cfg.export.max_batch = bundle.max_batch or cfg.export.max_batch
    return cfg

