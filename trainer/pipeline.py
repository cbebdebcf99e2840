"""fit -> calibrate -> export -> evaluate -> bundle -> promote, as one function the CLI (and tests) call.

The threshold and the test metrics are computed through the exported ONNX graph, so they describe the
file the station runs. A failed run removes its half-written version folder; nothing is promoted.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from torch import nn

from core.bundle import ONNX_FP16, ONNX_FP32, ONNX_SCORE, load_bundle, new_version_dir, promote, write_manifest
from trainer import calibrate as cal
from trainer import distributed
from trainer import export as ex
from trainer import report as rep
from trainer.config import TrainConfig
from trainer.data import fingerprint, load_test, load_val, train_paths
from trainer.datacheck import grayscale_warning, holdout_warning, scan_images, size_warnings
from trainer.degrade import Degradation, codec_plan
from trainer.evaluate import evaluate_onnx
from trainer.frames import TrainingData
from trainer.loop import run_fingerprint
from trainer.models import RunOptions, get_model_class

CHECKPOINTS = "checkpoints"  # engines/<model>/checkpoints/: the training run of models trained by epochs


def _stderr(msg: str) -> None:
    print(f"edge-train: {msg}", file=sys.stderr, flush=True)


def _quiet(_msg: str) -> None:
    """The log of the ranks other than 0 of a distributed fit: rank 0 speaks for all."""


def _round(x: Any) -> Any:
    return round(x, 6) if isinstance(x, float) else x


def fit_bundle(cfg: TrainConfig, data_dir: Path, engines_root: Path,
               log: Callable[[str], None] = _stderr, resume: bool = False,
               stop_after_epoch: Optional[int] = None,
               on_export: Optional[Callable[[nn.Module], None]] = None, promote_bundle: bool = True) -> Path:
    """Train ``cfg.model`` on DIR/train/good, write and promote a bundle under ``engines_root``; returns its path.

    ``promote_bundle`` False: the bundle is written and verified but not made current (a retrain's challenger).
    Checkpoints of models trained by epochs go to ``engines_root/<model>/checkpoints/``; ``resume`` continues
    the run found there. ``on_export`` receives the torch module the ONNX graph was exported from (benchmarks
    compare the two on the same weights).
    """
    t_start = time.monotonic()
    data_dir, engines_root = Path(data_dir), Path(engines_root)
    model_cls = get_model_class(cfg.model)  # unknown name: fail before reading any data
    shard = distributed.check_launch(cfg.model, model_cls.trains_distributed)  # torchrun: rank 0 writes, logs
    if not shard.writer:
        log = _quiet
    paths = train_paths(data_dir)
    scan = scan_images(paths)
    cfg.resolve(model_cls.defaults, all_gray=len(scan.grayscale) == scan.count)
    hw, resize = cfg.input.hw, cfg.input.resize
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        log(f"warning: {message}")

    for message in size_warnings(scan, "train/good", hw, resize):
        note(message)
    gray = grayscale_warning(scan, "train/good")
    if gray:
        note(gray)
    log(f"{len(paths)} training images in {data_dir / 'train' / 'good'}, fitted to {hw[1]}x{hw[0]} ({resize})")
    if cfg.epochs is not None and not model_cls.trains_with_epochs:
        notes.append(f"{cfg.model} does not train by epochs; epochs={cfg.epochs} ignored")
        log(notes[-1])
    fit_idx, hold_idx = cal.split_holdout(len(paths), cfg.calibration.holdout_fraction, cfg.seed)
    small = holdout_warning(len(hold_idx), cfg.calibration.quantile, cfg.calibration.sigmas)
    if small:
        note(small)
    val = load_val(data_dir, hw, resize)
    test = load_test(data_dir, hw, resize, warn=note) if shard.writer else None
    ca = cfg.codec_augment
    degradation, copies, codec_line = codec_plan(
        ca.enabled, ca.copies, Degradation((ca.jpeg_quality[0], ca.jpeg_quality[1]), ca.brightness, ca.contrast),
        paths)
    log(codec_line)
    data = TrainingData(fit_paths=[paths[i] for i in fit_idx], holdout_paths=[paths[i] for i in hold_idx], hw=hw,
                        resize=resize, val=val, workers=cfg.training.workers, seed=cfg.seed,
                        degradation=degradation, degraded_copies=copies)
    training_data = fingerprint(paths, data_dir)
    log(f"fitting {cfg.model} on {len(fit_idx)} images; {len(hold_idx)} held out for calibration")
    model = model_cls(cfg)
    run = RunOptions(device=cfg.device, amp=cfg.training.amp, select=cfg.training.select,
                     checkpoint_dir=engines_root / cfg.model / CHECKPOINTS, resume=resume,
                     fingerprint=run_fingerprint(_config_dict(cfg), str(training_data["sha256"])),
                     log_every=cfg.training.log_every, stop_after_epoch=stop_after_epoch)
    t0 = time.monotonic()
    fit_info = model.fit(data, log, run)
    fit_seconds = time.monotonic() - t0
    if not shard.writer:
        raise distributed.HelperRankFinished(f"rank {shard.rank}: its share of the fit is done; rank 0 writes the "
                                             "bundle")
    batch = cfg.export.max_batch
    scaling: dict[str, Any] = {}
    if model.scales_scores:
        raw = _stream_scores(lambda f: model.score(f, batch)[0], data, data.holdout_paths, batch)
        if val is not None:
            raw = np.concatenate([raw, model.score(val.images, batch)[0]])
        scaling = {"low": float(raw.min()), "high": float(raw.max()),
                   "from": "held-out training normals" + (" and DIR/val" if val is not None else "")}
        model.set_score_range(scaling["low"], scaling["high"])
        log(f"score scaled to [0, 1] over the {scaling['from']}: raw {scaling['low']:.4g}..{scaling['high']:.4g}")
    bounds = model.export_checks(cfg.export.max_batch, cfg.export.max_distance_elements)

    bundle_dir = new_version_dir(engines_root, cfg.model)
    try:
        module = model.export_module()
        fp32 = bundle_dir / ONNX_FP32
        ex.export_onnx(module, fp32, hw, cfg.export.opset)
        if on_export is not None:
            on_export(module)
        fp16: Optional[Path] = None
        fp16_info: dict[str, Any] = {}
        if cfg.export.fp16:
            fp16 = bundle_dir / ONNX_FP16
            fp16_info = ex.convert_fp16(fp32, fp16, model.fp32_scopes)
        score_only: Optional[Path] = None
        if cfg.export.score_only:
            score_only = bundle_dir / ONNX_SCORE
            ex.export_onnx(ex.ScoreOnly(module), score_only, hw, cfg.export.opset, outputs=("score",))
        log(f"exported {fp32.name} ({fp32.stat().st_size / 1e6:.1f} MB)" + (f", {fp16.name}" if fp16 else "")
            + (f", {score_only.name}" if score_only else ""))

        scorer = ex.onnx_scorer(fp32, batch)
        hold_scores = _stream_scores(lambda f: ex.run_onnx(scorer, f)[0], data, data.holdout_paths, batch)
        val_scores = ex.run_onnx(scorer, val.images)[0] if val is not None else None
        calibration = cal.calibrate(hold_scores, cfg.calibration.method, cfg.calibration.quantile,
                                    cfg.calibration.margin, cfg.calibration.sigmas, val_scores,
                                    None if val is None else val.labels)
        log(f"threshold {calibration['threshold']:.4g} ({calibration['method']}; held-out normal scores "
            f"{calibration['normal_min']:.4g}..{calibration['normal_max']:.4g})")

        parity_frames = data.read(data.holdout_paths[: cfg.report.parity_frames])
        if test is not None:
            extra = max(0, cfg.report.parity_frames - len(parity_frames))
            parity_frames = np.concatenate([parity_frames, test.images[np.argsort(-test.labels)][:extra]])
        parity = ex.parity(module, fp32, fp16, parity_frames, batch, score_path=score_only)
        log("parity vs torch: max rel diff of scores " + ", ".join(
            f"{k} {v['score_max_rel_diff']:.2e}" for k, v in parity.items() if isinstance(v, dict)))

        metrics: dict[str, Any] = {"fit_seconds": round(fit_seconds, 3)}
        plots: list[str] = []
        test_section: dict[str, Any] = {"close_level": None, "hardest_cases": None}
        if test is not None:
            evaluation = evaluate_onnx(fp32, test, calibration["threshold"], batch)
            metrics.update({k: _round(v) for k, v in evaluation.metrics.items()})
            log("test: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in evaluation.metrics.items()))
            test_report = rep.write_test_report(
                bundle_dir, test, evaluation.scores, evaluation.maps, calibration["threshold"],
                calibration["normal_median"], root=data_dir, cases=cfg.report.overlays,
                in_score_units=model_cls.map_in_score_units)
            plots = test_report.pop("plots")
            notes.extend(test_report.pop("notes"))
            test_section = test_report  # close_level, hardest_cases
        else:
            notes.append(f"no {data_dir / 'test'} folder: no test metrics")
            log(notes[-1])

        sizes = {p.name: p.stat().st_size for p in (fp32, fp16, score_only) if p is not None}
        report = {
            "model": cfg.model, "data": str(data_dir), "config": _config_dict(cfg), "fit": fit_info,
            "codec_augment": {"on": degradation is not None, "copies": copies, "plan": codec_line},
            "score_scaling": scaling or None,
            "export": {**bounds, "opset": cfg.export.opset, "file_bytes": sizes, "fp16": fp16_info},
            "calibration": calibration, "parity": parity, "metrics": metrics, "plots": plots,
            **test_section, "notes": notes,
            "total_seconds": round(time.monotonic() - t_start, 3),
        }
        rep.write_report(bundle_dir, report)
        map_h, map_w = model.map_shape()
        write_manifest(
            bundle_dir, model_name=cfg.model,
            input_spec={"height": hw[0], "width": hw[1], "resize": resize, "max_batch": cfg.export.max_batch},
            outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]},
                     {"name": "anomaly_map", "dtype": "float32", "shape": ["N", map_h, map_w]}],
            calibration=calibration,
            training_data=training_data,
            metrics=metrics,
            extra={"parity": {k: v for k, v in parity.items() if isinstance(v, dict)},
                   **({"fp16": _fp16_manifest(fp16_info)} if fp16 is not None else {})},
        )
        if promote_bundle:
            promote(bundle_dir)
        else:
            load_bundle(bundle_dir)  # verified as a station would, even when not promoted
    except BaseException:
        shutil.rmtree(bundle_dir, ignore_errors=True)
        raise
    log(f"bundle {bundle_dir} {'promoted' if promote_bundle else 'written (not promoted)'} "
        f"({time.monotonic() - t_start:.1f}s)")
    return bundle_dir


def _fp16_manifest(info: dict[str, Any]) -> dict[str, Any]:
    """What model.fp16.onnx keeps in FP32 (the scopes, their op types and nodes): TensorRT's FP16-flag build
    (8.6) pins the same layers to FP32, and a reader sees where the FP16 graph is not FP16."""
    return {"file": ONNX_FP16, "fp32_scopes": info["fp32_scopes"], "fp32_ops": info["fp32_ops"],
            "fp32_nodes": info["fp32_nodes"]}


def _stream_scores(score: Callable[[np.ndarray], np.ndarray], data: TrainingData, paths: list[Path],
                   batch: int) -> np.ndarray:
    """Scores of ``paths`` read batch by batch from disk (hold-outs of tens of thousands of frames fit nowhere)."""
    parts = [score(frames.numpy()) for frames in data.loader(paths, batch)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
