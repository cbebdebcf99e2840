"""The stages of a fit: data check → fit → export → calibrate → parity → evaluate → report → manifest → promote.

Each stage is a function of one ``FitRun``: it reads what earlier stages left there and adds its own part, so a
stage can run, and be tested, on its own given a run that holds what it needs (a stage run too early says which
stage must come first). ``trainer/pipeline.py`` runs them in the order of ``STAGES``.

The threshold and the test metrics are computed through the exported ONNX graph with the station's own ONNX
Runtime backend, so they describe the file the station runs. The fitted torch model lives in memory only and is
not kept after export: fit, export, parity (torch against ONNX) and manifest (the map's shape, a fresh bundle's
checksums) need it, so they run inside a fit only. Data check, calibrate, evaluate and report need only the
bundle's graph and the data folder, so they can run again on an existing bundle (``pipeline.rerun_stages``).

A model with no station export (``AnomalyModel.station_form``: one whose score is a search per image) fits,
calibrates, evaluates and reports all the same, scored by its own ``score`` in torch: the export stage says in one
line that it has none and names the model a station runs instead; parity, manifest and promote have no bundle to
work on, and the report goes to engines/<model>/evals/.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
from torch import nn

from core.bundle import (
    CURRENT,
    ONNX_FP16,
    ONNX_FP32,
    ONNX_SCORE,
    Bundle,
    load_bundle,
    new_version_dir,
    promote,
    write_manifest,
)
from core.errors import BundleError, UserError
from core.thresholds import MOST_MISSED, QUANTILE, Policy
from trainer import calibrate as cal
from trainer import distributed
from trainer import export as ex
from trainer import report as rep
from trainer.champion import BUNDLE_THRESHOLD, JudgingThreshold, champion_threshold, compare, score_on, scores_at
from trainer.config import TrainConfig
from trainer.data import ImageSet, fingerprint, known_defect_paths, load_test, load_val, train_paths
from trainer.datacheck import (
    MIN_HOLDOUT,
    grayscale_warning,
    holdout_warning,
    scan_images,
    size_warnings,
    undecodable_error,
    undecodable_images,
)
from trainer.degrade import Degradation, codec_plan
from trainer.evaluate import Evaluation, evaluate_onnx, metrics_from_scores
from trainer.frames import TrainingData
from trainer.loop import run_fingerprint
from trainer.models import AnomalyModel, RunOptions, get_model_class, known_model_names
from trainer.tiling import stitched_map_shape, tiled_module, tiled_scopes, tiles_per_frame

CHECKPOINTS = "checkpoints"  # engines/<model>/checkpoints/: the training run of models trained by epochs
T = TypeVar("T")


def log_to_stderr(msg: str) -> None:
    """The fit's progress log: one ``edge-train:`` line on stderr."""
    print(f"edge-train: {msg}", file=sys.stderr, flush=True)


def _quiet(_msg: str) -> None:
    """The log of the ranks other than 0 of a distributed fit: rank 0 speaks for all."""


@dataclass
class FitRun:
    """Everything one fit hands from stage to stage; each stage fills its own part (listed by stage below).

    ``rerun`` is None in a fit; in a rerun on an existing bundle it says which bundle and stages, and the parts of
    the stages that do not rerun are read back from the bundle's manifest.json and report.json.
    """

    cfg: TrainConfig
    data_dir: Path
    engines_root: Path
    log: Callable[[str], None] = log_to_stderr
    resume: bool = False  # continue the training run in engines_root/<model>/checkpoints/
    stop_after_epoch: Optional[int] = None  # tests: behave as if Ctrl-C came at the end of this epoch
    on_export: Optional[Callable[[nn.Module], None]] = None  # hears the torch module the ONNX graph came from
    promote_bundle: bool = True  # False: written and verified, not made current (a retrain's challenger)
    promote_over_current: bool = False  # True: made current even when the current bundle does better
    site_calibration: Optional[Path] = None  # a station's on-site calibration: judges the current bundle
    started: float = field(default_factory=time.monotonic)
    notes: list[str] = field(default_factory=list)  # report.json's notes: what a reader should know
    rerun: Optional[dict[str, Any]] = None
    # data check
    model_cls: Optional[type[AnomalyModel]] = None
    shard: distributed.Shard = field(default_factory=distributed.Shard)
    data: Optional[TrainingData] = None
    test: Optional[ImageSet] = None
    training_data: dict[str, Any] = field(default_factory=dict)  # the manifest's fingerprint of DIR/train/good
    codec: dict[str, Any] = field(default_factory=dict)  # report.json's codec_augment
    # fit
    model: Optional[AnomalyModel] = None
    fit_info: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = 0.0
    scaling: dict[str, Any] = field(default_factory=dict)  # the score's [0, 1] range, for models that scale it
    # export
    bundle_dir: Optional[Path] = None
    module: Optional[nn.Module] = None
    fp32: Optional[Path] = None
    fp16: Optional[Path] = None
    score_only: Optional[Path] = None
    fp16_info: dict[str, Any] = field(default_factory=dict)
    export_info: dict[str, Any] = field(default_factory=dict)  # report.json's export
    # calibrate, parity, evaluate
    calibration: dict[str, Any] = field(default_factory=dict)
    calibration_scores: dict[str, np.ndarray] = field(default_factory=dict)  # "normal", "defects": the curve's
    parity: dict[str, Any] = field(default_factory=dict)
    evaluation: Optional[Evaluation] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # report
    report_dir: Optional[Path] = None  # None: the bundle folder (a fit); a rerun, or a fit without export, elsewhere
    report_path: Optional[Path] = None

    def note(self, message: str, warning: bool = True) -> None:
        """Keep ``message`` for report.json's notes and log it (as a warning unless ``warning`` is False)."""
        self.notes.append(message)
        self.log(f"warning: {message}" if warning else message)


def _scored_in_torch(run: FitRun) -> Optional[AnomalyModel]:
    """The fitted model when it has no station export (``station_form``): calibrate and evaluate score with it."""
    return run.model if run.model is not None and run.model.station_form and run.fp32 is None else None


def _need(value: Optional[T], what: str, stage: str, earlier: str) -> T:
    """``value``, or an error saying which earlier stage provides it (a stage run out of order)."""
    if value is None:
        raise RuntimeError(f"stage '{stage}' needs {what}: run stage '{earlier}' first")
    return value


def check_data(run: FitRun) -> None:
    """Read and check DIR before anything is fitted, so a bad folder fails in seconds, not after the fit.

    Takes ``cfg``, ``data_dir``. Gives ``model_cls``, ``shard`` (which rank of a torchrun fit this is), the input
    size resolved into ``cfg``, ``data`` (fit/hold-out split, DIR/val, codec-robust plan), ``test`` (DIR/test;
    None when absent or on ranks other than 0), ``training_data`` (the fingerprint) and ``codec``; warnings go to
    ``notes``. Reruns: the same folder gives the same split (it follows from the seed and the hold-out fraction).
    """
    cfg = run.cfg
    run.model_cls = get_model_class(cfg.model)  # unknown name: fail before reading any data
    if run.resume and not run.model_cls.trains_with_epochs:
        raise UserError(f"--resume: {cfg.model} is not trained by epochs, so no interrupted training run of it can "
                        "be continued; fit again without --resume")
    run.shard = distributed.check_launch(cfg.model, run.model_cls.trains_distributed)  # torchrun: rank 0 writes
    if not run.shard.writer:
        run.log = _quiet
    paths = train_paths(run.data_dir)
    _check_training_images(run, paths)
    fit_idx, hold_idx = cal.split_holdout(len(paths), cfg.calibration.holdout_fraction, cfg.seed)
    small = _holdout_warning(cfg.calibration.rule(), len(hold_idx))
    if small:
        run.note(small)
    legacy = cfg.calibration.legacy_note()
    if legacy:
        run.note(legacy, warning=False)
    frame_hw, resize = cfg.input.frame_hw, cfg.input.resize  # the station's frames (tiled or not)
    val = load_val(run.data_dir, frame_hw, resize)
    run.test = load_test(run.data_dir, frame_hw, resize, warn=run.note) if run.shard.writer else None
    degradation, copies = _plan_codec(run, paths)
    known = _known_defects(run)
    run.data = TrainingData(fit_paths=[paths[i] for i in fit_idx], holdout_paths=[paths[i] for i in hold_idx],
                            hw=cfg.input.hw, resize=resize, val=val, workers=cfg.training.workers, seed=cfg.seed,
                            degradation=degradation, degraded_copies=copies, tiles=cfg.input.tile_grid,
                            tile_stride=cfg.input.tile_stride, known_defects=known)
    run.training_data = fingerprint(paths + known, run.data_dir)


def _known_defects(run: FitRun) -> list[Path]:
    """DIR/train/<kind>/'s labelled defects for a model that learns from them; for the others a note that they
    are left out (and which models would use them)."""
    model_cls = _need(run.model_cls, "the model class", "data check", "data check")
    found = known_defect_paths(run.data_dir)
    if not found:
        return []
    counts = ", ".join(f"train/{kind} {len(paths)}" for kind, paths in found.items())
    if model_cls.learns_from_defects:
        run.log(f"labelled defects to learn from: {counts}")
        return [p for paths in found.values() for p in paths]
    users = [n for n in known_model_names() if get_model_class(n).learns_from_defects]
    run.note(f"labelled defects in DIR/train ({counts}) are not used by {run.cfg.model}, which learns from normal "
             f"images only; models that learn from them: {', '.join(users) or 'none'}", warning=False)
    return []


def _check_training_images(run: FitRun, paths: list[Path]) -> None:
    """Scan DIR/train/good, resolve the input size and channels, warn about sizes and grey images."""
    cfg, model_cls = run.cfg, _need(run.model_cls, "the model class", "data check", "data check")
    scan = scan_images(paths)
    bad = undecodable_images(paths)
    if bad:
        raise undecodable_error(bad, str(run.data_dir / "train" / "good"))
    cfg.resolve(model_cls.defaults, all_gray=len(scan.grayscale) == scan.count)
    hw, resize, tiles = cfg.input.frame_hw, cfg.input.resize, cfg.input.tile_grid
    for message in size_warnings(scan, "train/good", hw, resize):
        run.note(message)
    gray = grayscale_warning(scan, "train/good")
    if gray:
        run.note(gray)
    cut = "" if tiles is None else f", cut into {tiles[0]}x{tiles[1]} tiles of {cfg.input.width}x{cfg.input.height}"
    run.log(f"{len(paths)} training images in {run.data_dir / 'train' / 'good'}, fitted to {hw[1]}x{hw[0]} "
            f"({resize}){cut}")
    if cfg.epochs is not None and not model_cls.trains_with_epochs:
        run.note(f"{cfg.model} does not train by epochs; epochs={cfg.epochs} ignored", warning=False)


def _plan_codec(run: FitRun, paths: list[Path]) -> tuple[Optional[Degradation], int]:
    """The codec-robust training plan of ``paths`` (degradation or None, copies), logged and kept for the report."""
    ca = run.cfg.codec_augment
    degradation, copies, line = codec_plan(
        ca.enabled, ca.copies, Degradation((ca.jpeg_quality[0], ca.jpeg_quality[1]), ca.brightness, ca.contrast),
        paths)
    run.log(line)
    run.codec = {"on": degradation is not None, "copies": copies, "plan": line}
    return degradation, copies


def fit_model(run: FitRun) -> None:
    """Fit ``cfg.model`` on the fit part of DIR/train/good (the hold-out never enters the model).

    Takes ``data``, ``model_cls``, ``training_data``. Gives ``model`` (in memory only: it is not kept after the
    fit, so a stage needing it cannot rerun later), ``fit_info``, ``fit_seconds`` and, for models that scale their
    score to [0, 1], ``scaling``. Checkpoints of models trained by epochs go to engines_root/<model>/checkpoints/.
    On a torchrun rank other than 0 it ends the run here (HelperRankFinished): rank 0 writes the bundle.
    """
    cfg = run.cfg
    data = _need(run.data, "the training data", "fit", "data check")
    model_cls = _need(run.model_cls, "the model class", "fit", "data check")
    run.log(f"fitting {cfg.model} on {len(data.fit_paths)} images; {len(data.holdout_paths)} held out for "
            "calibration")
    model = model_cls(cfg)
    model.preflight(fitted_frames(data), cfg.export.max_batch * tiles_per_frame(cfg.input.tile_grid),
                    cfg.export.max_distance_elements)  # bounds, at once
    options = RunOptions(device=cfg.device, amp=cfg.training.amp, select=cfg.training.select,
                         checkpoint_dir=run.engines_root / cfg.model / CHECKPOINTS, resume=run.resume,
                         fingerprint=run_fingerprint(asdict(cfg), str(run.training_data["sha256"])),
                         log_every=cfg.training.log_every, stop_after_epoch=run.stop_after_epoch)
    t0 = time.monotonic()
    run.fit_info = model.fit(data, run.log, options)
    run.fit_seconds = time.monotonic() - t0
    if not run.shard.writer:
        raise distributed.HelperRankFinished(f"rank {run.shard.rank}: its share of the fit is done; rank 0 writes "
                                             "the bundle")
    run.model = model
    if model.scales_scores:
        _scale_scores(run, model, data)


def fitted_frames(data: TrainingData) -> int:
    """How many frames the model is fitted on: the fit images, their codec copies, and each one's tiles."""
    copies = data.degraded_copies if data.degradation is not None else 0
    tiles = data.tiles[0] * data.tiles[1] if data.tiles else 1
    return len(data.fit_paths) * (1 + copies) * tiles


def _scale_scores(run: FitRun, model: AnomalyModel, data: TrainingData) -> None:
    """Fix the exported score's [0, 1] range on the held-out normals (and DIR/val) before the graph is exported."""
    batch = run.cfg.export.max_batch
    raw = stream_scores(lambda f: model.score(f, batch)[0], data, data.holdout_paths, batch)
    if data.val is not None:
        raw = np.concatenate([raw, model.score(data.model_inputs(data.val.images), batch)[0]])
    run.scaling = {"low": float(raw.min()), "high": float(raw.max()),
                   "from": "held-out training normals" + (" and DIR/val" if data.val is not None else "")}
    model.set_score_range(run.scaling["low"], run.scaling["high"])
    run.log(f"score scaled to [0, 1] over the {run.scaling['from']}: raw {run.scaling['low']:.4g}.."
            f"{run.scaling['high']:.4g}")


def export_graphs(run: FitRun) -> None:
    """Write the graphs the station runs into a new version folder: model.onnx, model.fp16.onnx, model.score.onnx.

    Takes ``model``. Gives ``bundle_dir`` (created here: whoever runs the stages removes it if a later one fails),
    ``module`` (the torch module exported; ``on_export`` hears it), ``fp32``, ``fp16`` and ``score_only`` (None
    when switched off in ``cfg.export``), ``fp16_info`` and ``export_info``. Cannot rerun: it needs the fitted
    model, which is not kept; fit again.
    """
    cfg, model = run.cfg, _need(run.model, "the fitted model", "export", "fit")
    if model.station_form:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run.report_dir = run.report_dir or run.engines_root / cfg.model / rep.EVALS / f"fit-{stamp}"
        run.note(f"export: {cfg.model} has no station export ({model.no_export_reason}); its station form is "
                 f"{model.station_form} (edge-train fit --model {model.station_form}); no bundle is written, the "
                 f"test is scored in torch and the report written to {run.report_dir}")
        return
    per_frame = tiles_per_frame(cfg.input.tile_grid)  # the model scores this many inputs a frame
    limit = model.export_batch_limit(cfg.export.max_distance_elements)
    limit = None if limit is None else max(1, limit // per_frame)
    if limit is not None and 1 <= limit < cfg.export.max_batch:
        run.note(f"export.max_batch lowered from {cfg.export.max_batch} to {limit}: at a larger batch the graph's "
                 f"largest intermediate would exceed export.max_distance_elements {cfg.export.max_distance_elements}; "
                 "the station scores in batches of at most this size")
        cfg.export.max_batch = limit
    bounds = model.export_checks(cfg.export.max_batch * per_frame, cfg.export.max_distance_elements)
    run.bundle_dir = bundle_dir = new_version_dir(run.engines_root, cfg.model)
    tiles = cfg.input.tile_grid  # with tiling, the graph cuts the frame into tiles of the model's input
    run.module = module = tiled_module(model.export_module(), tiles, cfg.input.hw, model.map_shape(),
                                       cfg.input.tile_stride)
    run.fp32 = bundle_dir / ONNX_FP32
    ex.export_onnx(module, run.fp32, cfg.input.frame_hw, cfg.export.opset)
    if run.on_export is not None:
        run.on_export(module)
    if cfg.export.fp16:
        run.fp16 = bundle_dir / ONNX_FP16
        run.fp16_info = ex.convert_fp16(run.fp32, run.fp16, tiled_scopes(model.fp32_scopes, tiles))
    if cfg.export.score_only:
        run.score_only = bundle_dir / ONNX_SCORE
        ex.export_onnx(ex.ScoreOnly(module), run.score_only, cfg.input.frame_hw, cfg.export.opset,
                       outputs=("score",))
    graphs = [p for p in (run.fp32, run.fp16, run.score_only) if p is not None]
    run.export_info = {**bounds, "opset": cfg.export.opset, "file_bytes": {p.name: p.stat().st_size for p in graphs},
                       "fp16": run.fp16_info}
    run.log(f"exported {run.fp32.name} ({run.fp32.stat().st_size / 1e6:.1f} MB)"
            + "".join(f", {p.name}" for p in graphs[1:]))


def calibrate_threshold(run: FitRun) -> None:
    """Choose the score threshold by ``calibration.policy`` from the held-out normals (and DIR/val), scored through
    model.onnx, and say what it is expected to do: the false-alarm rate always, the recall on labelled defects when
    DIR/val has some, with a WARNING (and ``most_defects_missed`` in the calibration) when most fall below it.

    Takes ``data`` and ``fp32``. Gives ``calibration`` (threshold, policy, expected rates, normalisation constants:
    the manifest's calibration) and ``calibration_scores`` (the report's operating curve). Reruns on an existing
    bundle: the graph is the bundle's, the hold-out the one the seed picks from DIR/train/good (the fit's, when the
    folder is the one fitted on).
    """
    hold_scores, val_scores = _calibration_set_scores(run, "calibrate")
    val = _need(run.data, "the training data", "calibrate", "data check").val
    policy = run.cfg.calibration.rule()
    run.calibration = cal.calibrate(hold_scores, policy, val_scores, None if val is None else val.labels)
    run.log(f"threshold {run.calibration['threshold']:.4g} (policy {policy.describe()}; held-out normal scores "
            f"{run.calibration['normal_min']:.4g}..{run.calibration['normal_max']:.4g})")
    lines, warning = cal.expectation_lines(run.calibration)
    for line in lines:
        run.log(line)
    if warning:
        run.notes.append(warning)
        run.log(warning)


def _calibration_set_scores(run: FitRun, stage: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scores through model.onnx of the held-out normals and of DIR/val (None without one); kept in
    ``calibration_scores`` (normals: the hold-out and DIR/val/good; defects: DIR/val's) for the report."""
    batch = run.cfg.export.max_batch
    data = _need(run.data, "the training data", stage, "data check")
    val = data.val
    model = _scored_in_torch(run)
    if model is not None:
        hold_scores = stream_scores(lambda f: model.score(f, batch)[0], data, data.holdout_paths, batch)
        val_scores = model.score(data.model_inputs(val.images), batch)[0] if val is not None else None
    else:
        scorer = ex.onnx_scorer(_need(run.fp32, "model.onnx", stage, "export"), batch)
        hold_scores = stream_scores(lambda f: ex.run_onnx(scorer, f)[0], data, data.holdout_paths, batch, whole=True)
        val_scores = ex.run_onnx(scorer, val.images)[0] if val is not None else None
    normal, defects = np.asarray(hold_scores, np.float64), np.zeros(0)
    if val is not None and val_scores is not None:
        normal = np.concatenate([normal, np.asarray(val_scores, np.float64)[val.labels == 0]])
        defects = np.asarray(val_scores, np.float64)[val.labels == 1]
    run.calibration_scores = {"normal": normal, "defects": defects}
    return hold_scores, val_scores


def _holdout_warning(policy: Policy, n_holdout: int) -> Optional[str]:
    """The calibration hold-out too small for ``policy``: the quantile rule's own check, else the spread's."""
    if policy.name == QUANTILE:
        return holdout_warning(n_holdout, policy.quantile, policy.sigmas)
    if n_holdout >= MIN_HOLDOUT:
        return None
    return (f"calibration hold-out has {n_holdout} images; the threshold's false-alarm-rate estimate (a Gaussian "
            f"tail of their scores) needs at least {MIN_HOLDOUT} to be stable: add normal images to train/good or "
            "raise calibration.holdout_fraction")


def check_parity(run: FitRun) -> None:
    """Score the same frames with torch and each exported graph: the graphs must compute what the model did.

    Takes ``module``, ``fp32`` (``fp16``, ``score_only`` when exported), ``data`` and ``test`` (the frames:
    held-out normals, then the test set's defects first). Gives ``parity``. Cannot rerun: torch's side needs the
    fitted model, which is not kept.
    """
    cfg, batch = run.cfg, run.cfg.export.max_batch
    if _scored_in_torch(run) is not None:
        return  # no exported graph to compare (the export stage said why)
    data = _need(run.data, "the training data", "parity", "data check")
    module = _need(run.module, "the exported torch module", "parity", "export")
    frames = data.read(data.holdout_paths[: cfg.report.parity_frames])
    if run.test is not None:
        extra = max(0, cfg.report.parity_frames - len(frames))
        frames = np.concatenate([frames, run.test.images[np.argsort(-run.test.labels)][:extra]])
    run.parity = ex.parity(module, _need(run.fp32, "model.onnx", "parity", "export"), run.fp16, frames, batch,
                           score_path=run.score_only)
    run.log("parity vs torch: max rel diff of scores " + ", ".join(
        f"{k} {v['score_max_rel_diff']:.2e}" for k, v in run.parity.items() if isinstance(v, dict)))


def evaluate_test(run: FitRun) -> None:
    """Measure DIR/test through model.onnx at the calibrated threshold: what the station will do on it.

    Takes ``test``, ``fp32``, ``calibration`` and ``fit_seconds``. Gives ``metrics`` (fit_seconds, then image and
    pixel AUROC, average precision, F1, counts) and ``evaluation`` (the scores and maps the report draws); without
    a DIR/test a note says so. Reruns on an existing bundle (its graph and its manifest's threshold, unless
    calibrate reran first).
    """
    model = _scored_in_torch(run)
    fp32 = None if model is not None else _need(run.fp32, "model.onnx", "evaluate", "export")
    threshold = _need(run.calibration.get("threshold"), "a threshold", "evaluate", "calibrate")
    run.metrics = {"fit_seconds": round(run.fit_seconds, 3)}
    run.evaluation = None
    if run.test is None:
        run.note(f"no {run.data_dir / 'test'} folder: no test metrics", warning=False)
        return
    if model is not None:  # no exported graph: the model's own scoring in torch
        t0 = time.monotonic()
        scores, maps = model.score(run.test.images, run.cfg.export.max_batch)
        run.metrics["torch_ms_per_image"] = round(1000 * (time.monotonic() - t0) / max(len(scores), 1), 3)
        run.evaluation = Evaluation(metrics_from_scores(scores, run.test.labels, threshold, maps, run.test.masks),
                                    scores, maps, run.test)
    else:
        assert fp32 is not None
        run.evaluation = evaluate_onnx(fp32, run.test, threshold, run.cfg.export.max_batch)
    run.metrics.update({k: round(v, 6) if isinstance(v, float) else v for k, v in run.evaluation.metrics.items()})
    run.log("test: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in run.evaluation.metrics.items()))
    _test_operating_point(run, threshold)


def _test_operating_point(run: FitRun, threshold: float) -> None:
    """Log what the threshold does on DIR/test (false alarms, recall), into ``metrics``; WARNING when most of its
    defects fall below it."""
    assert run.evaluation is not None
    y = np.asarray(run.evaluation.test.labels).astype(int)
    s = np.asarray(run.evaluation.scores, np.float64)
    good, bad = s[y == 0], s[y == 1]
    parts = []
    if good.size:
        run.metrics["false_alarm_rate"] = round(float((good >= threshold).mean()), 6)
        parts.append(f"false-alarm rate {run.metrics['false_alarm_rate']:.1%} of {good.size} good parts")
    if bad.size:
        run.metrics["recall"] = round(float((bad >= threshold).mean()), 6)
        run.metrics["most_defects_missed"] = bool(run.metrics["recall"] < MOST_MISSED)
        parts.append(f"recall {run.metrics['recall']:.1%} of {bad.size} defects")
    if parts:
        run.log(f"at the threshold {threshold:.4g} on {run.data_dir / 'test'}: " + ", ".join(parts))
    if run.metrics.get("most_defects_missed"):
        warning = (f"WARNING: {1 - run.metrics['recall']:.0%} of the {bad.size} defects in "
                   f"{run.data_dir / 'test'} score below the threshold {threshold:.4g}: the station would miss most "
                   "defects like them. See operating_points.txt in the report for what each policy would ship "
                   "(calibration.policy, calibration.target_false_alarm_rate)")
        run.notes.append(warning)
        run.log(warning)


def write_report(run: FitRun) -> None:
    """Write report.json and the plots (ROC, PR, score histogram, hardest cases): what the trainer measured.

    Takes every earlier stage's part (``evaluation`` for the plots). Writes into ``report_dir``, else the bundle
    folder; gives ``report_path``. Reruns, into a folder outside the bundle: a bundle's files are checksummed in
    its manifest and never change.
    """
    out = run.report_dir or _need(run.bundle_dir, "a bundle folder", "report", "export")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the report folder ({exc.strerror}); pass a writable folder") from None
    plots: list[str] = []
    section: dict[str, Any] = {"close_level": None, "hardest_cases": None}
    if run.evaluation is not None:
        model_cls = _need(run.model_cls, "the model class", "report", "data check")
        section = rep.write_test_report(
            out, run.evaluation.test, run.evaluation.scores, run.evaluation.maps, run.calibration["threshold"],
            run.calibration["normal_median"], root=run.data_dir, cases=run.cfg.report.overlays,
            in_score_units=model_cls.map_in_score_units)
        plots = section.pop("plots")
        run.notes.extend(section.pop("notes"))
    operating = _operating_report(run, out)
    if operating is not None:
        plots += [operating["plot"], operating["table"]]
    report = {
        "model": run.cfg.model, "data": str(run.data_dir), "config": asdict(run.cfg), "fit": run.fit_info,
        "codec_augment": run.codec, "score_scaling": run.scaling or None, "export": run.export_info,
        "calibration": run.calibration, "parity": run.parity, "metrics": run.metrics, "plots": plots,
        **section, "operating_points": operating, "notes": run.notes,
        "total_seconds": round(time.monotonic() - run.started, 3),
        **({"rerun": run.rerun} if run.rerun is not None else {}),
    }
    run.report_path = rep.write_report(out, report)


def _operating_report(run: FitRun, out: Path) -> Optional[dict[str, Any]]:
    """The operating points (table and plot) of the calibration set's scores and DIR/test at the threshold in
    force; a rerun without calibrate scores the hold-out (and DIR/val) here. None without a threshold."""
    if "threshold" not in run.calibration:
        return None
    if not run.calibration_scores:
        _calibration_set_scores(run, "report")
    scores = run.calibration_scores
    calib = rep.Labelled("calibration", scores["normal"], scores["defects"])
    test = None
    if run.evaluation is not None:
        y = np.asarray(run.evaluation.test.labels).astype(int)
        s = np.asarray(run.evaluation.scores, np.float64)
        test = rep.Labelled("test", s[y == 0], s[y == 1])
    return rep.write_operating_report(out, float(run.calibration["threshold"]), str(run.calibration.get("policy")),
                                      calib, test)


def write_bundle_manifest(run: FitRun) -> None:
    """Write manifest.json last: input, outputs, calibration, fingerprint, metrics, sha256 of every file.

    Takes ``bundle_dir`` (with every other file written), ``model`` (its map's shape), ``calibration``,
    ``training_data``, ``metrics``, ``parity``, ``fp16_info``. Cannot rerun: an existing bundle never changes (a
    station refuses one whose files do not match its manifest), and the map's shape is the fitted model's.
    """
    cfg = run.cfg
    if _scored_in_torch(run) is not None:
        return  # no bundle (the export stage said why)
    bundle_dir = _need(run.bundle_dir, "a bundle folder", "manifest", "export")
    tiles = cfg.input.tile_grid
    map_h, map_w = stitched_map_shape(_need(run.model, "the fitted model", "manifest", "fit").map_shape(), tiles,
                                      cfg.input.tile_stride)
    hw = cfg.input.frame_hw
    tiling = {} if tiles is None else {"tiles": {"grid": list(tiles), "tile": list(cfg.input.hw),
                                                  "stride": list(cfg.input.tile_stride)}}
    write_manifest(
        bundle_dir, model_name=cfg.model,
        input_spec={"height": hw[0], "width": hw[1], "resize": cfg.input.resize, "max_batch": cfg.export.max_batch,
                    **tiling},
        outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]},
                 {"name": "anomaly_map", "dtype": "float32", "shape": ["N", map_h, map_w]}],
        calibration=run.calibration,
        training_data=run.training_data,
        metrics=run.metrics,
        extra={"parity": {k: v for k, v in run.parity.items() if isinstance(v, dict)},
               **({"fp16": _fp16_manifest(run.fp16_info)} if run.fp16 is not None else {})},
    )


def promote_bundle(run: FitRun) -> None:
    """Make the bundle its model's current version (stations pick it up) when it is at least as good as the current
    one, or only verify it as a station would.

    Takes ``bundle_dir`` with its manifest, ``evaluation`` (its scores on DIR/test), ``promote_bundle``,
    ``promote_over_current`` and ``site_calibration``. The first bundle of a model is promoted; after that, the
    champion/challenger rule of trainer/champion.py (train.yaml's ``retrain`` section) decides on DIR/test, the
    current bundle judged at its station's on-site threshold when ``site_calibration`` holds one for it; a refusal
    is one line with both measures, and the bundle stays written. ``promote_over_current`` skips the rule. Not a
    rerun stage: promoting an existing bundle is ``edge-train promote``.
    """
    if _scored_in_torch(run) is not None:
        run.log(f"no bundle to promote; report {run.report_path} ({time.monotonic() - run.started:.1f}s)")
        return
    bundle_dir = _need(run.bundle_dir, "a bundle folder", "promote", "export")
    bundle = load_bundle(bundle_dir)  # verified as a station would, promoted or not
    if not run.promote_bundle:
        run.log(f"bundle {bundle_dir} written (not promoted) ({time.monotonic() - run.started:.1f}s)")
        return
    better, why = (True, "") if run.promote_over_current else _beats_current(run, bundle)
    if not better:
        run.log(f"not promoted: {why}; {bundle_dir} stays written: make it current with edge-train promote "
                f"{bundle_dir}, or fit with --promote always")
        return
    promote(bundle_dir, reason="fit" + (f": {why}" if why else ""))
    run.log(f"bundle {bundle_dir} promoted{f' ({why})' if why else ''} ({time.monotonic() - run.started:.1f}s)")


def _beats_current(run: FitRun, bundle: Bundle) -> tuple[bool, str]:
    """(may ``bundle`` replace its model's current bundle?, why, in words); no current: yes, nothing to say."""
    model_dir = bundle.path.parent
    if not (model_dir / CURRENT).is_file():
        return True, ""
    try:
        champion = load_bundle(model_dir)
    except BundleError as exc:
        return True, f"the current bundle cannot be loaded ({exc}); this one replaces it"
    if champion.path == bundle.path:
        return True, ""
    if run.evaluation is None:
        return False, (f"no {run.data_dir / 'test'} folder to compare it with the current {champion.version} on; "
                       "add DIR/test/good and DIR/test/<defect> images")
    at = champion_threshold(champion, run.site_calibration, run.log)
    champ, _labels = score_on(champion, run.data_dir, at)
    new = scores_at(bundle.version, run.evaluation.scores, run.evaluation.test.labels,
                    JudgingThreshold(bundle.threshold, BUNDLE_THRESHOLD), run.evaluation.metrics.get("image_auroc"))
    ok, reasons = compare(champ, new, run.cfg.retrain)
    judged = "" if at.source == BUNDLE_THRESHOLD else f"; current at {at.source}, {at.value:.4g}"
    verdict = "at least as good as" if ok else "worse than"
    return ok, (f"{verdict} the current {champion.version} on {run.data_dir / 'test'}: {reasons} "
                f"(new vs current{judged})")


@dataclass(frozen=True)
class Stage:
    """A named stage; ``reruns``: it can run again on an existing bundle from its files (else ``why_not``)."""

    name: str
    run: Callable[[FitRun], None]
    reruns: bool
    why_not: str = ""


_NEEDS_MODEL = "it needs the fitted torch model, which is not kept after export; fit again (edge-train fit)"
STAGES = (
    Stage("data check", check_data, True),
    Stage("fit", fit_model, False, "a new fit is a new bundle (edge-train fit)"),
    Stage("export", export_graphs, False, _NEEDS_MODEL),
    Stage("calibrate", calibrate_threshold, True),
    Stage("parity", check_parity, False, _NEEDS_MODEL),
    Stage("evaluate", evaluate_test, True),
    Stage("report", write_report, True),
    Stage("manifest", write_bundle_manifest, False,
          "a bundle's files never change once its manifest is written (stations check them)"),
    Stage("promote", promote_bundle, False, "promote an existing bundle with edge-train promote"),
)


def _fp16_manifest(info: dict[str, Any]) -> dict[str, Any]:
    """What model.fp16.onnx keeps in FP32 (the scopes, their op types and nodes): TensorRT's FP16-flag build
    (8.6) pins the same layers to FP32, and a reader sees where the FP16 graph is not FP16."""
    return {"file": ONNX_FP16, "fp32_scopes": info["fp32_scopes"], "fp32_ops": info["fp32_ops"],
            "fp32_nodes": info["fp32_nodes"]}


def stream_scores(score: Callable[[np.ndarray], np.ndarray], data: TrainingData, paths: list[Path],
                  batch: int, whole: bool = False) -> np.ndarray:
    """Scores of ``paths`` read batch by batch from disk (hold-outs of tens of thousands of frames fit nowhere):
    the model's inputs (tiles, with tiling), or with ``whole`` the frames the exported graph takes."""
    parts = [score(frames.numpy()) for frames in data.loader(paths, batch, whole=whole)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
