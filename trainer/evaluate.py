"""Evaluation of a bundle on DIR/test through its exported ONNX graph (onnxruntime, not the torch module).

What the station runs is the ONNX file, so that is what is measured: image AUROC, average precision, F1 at the
bundle's threshold, and pixel AUROC where ground-truth masks and anomaly maps exist. ``edge-train eval`` also
writes report.json and the plots (trainer/report.py) into a folder outside the bundle: a bundle's files are
checksummed in its manifest and never change after it is written.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from core.bundle import Bundle, load_bundle
from core.errors import UserError
from core.thresholds import f1_threshold
from trainer.data import ImageSet, load_test
from trainer.export import onnx_scorer, run_onnx

METRIC_KEYS = ("image_auroc", "average_precision", "pixel_auroc", "f1", "threshold", "n_normal", "n_anomalous")


@dataclass
class Evaluation:
    """Metrics plus the per-image outputs the report plots are drawn from."""

    metrics: dict[str, Any]
    scores: np.ndarray
    maps: Optional[np.ndarray]
    test: ImageSet
    bundle: Optional[Bundle] = None


def metrics_from_scores(scores: np.ndarray, labels: np.ndarray, threshold: float,
                        maps: Optional[np.ndarray] = None, masks: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Image AUROC and average precision (both need both classes), F1, recall and false-alarm rate of ``score >=
    threshold``, the best F1 over thresholds, counts; pixel AUROC when both maps and masks are given."""
    labels = np.asarray(labels).astype(int)
    both = 0 < labels.sum() < len(labels)
    out: dict[str, Any] = {
        "image_auroc": float(roc_auc_score(labels, scores)) if both else None,
        "average_precision": float(average_precision_score(labels, scores)) if both else None,
        "f1": float(f1_score(labels, (scores >= threshold).astype(int), zero_division=0)),
        "threshold": float(threshold),
        "n_normal": int((labels == 0).sum()),
        "n_anomalous": int((labels == 1).sum()),
        "pixel_auroc": None,
    }
    flagged = np.asarray(scores) >= threshold
    # the operating point a station acts on, and the best F1 the ranking allows (chosen on this very set: a
    # ceiling to compare with, never a threshold to ship)
    if (labels == 0).any():
        out["false_alarm_rate"] = round(float(flagged[labels == 0].mean()), 6)
    if (labels == 1).any():
        out["recall"] = round(float(flagged[labels == 1].mean()), 6)
    if both:
        s64 = np.asarray(scores, np.float64)
        best_threshold, best = f1_threshold(s64[labels == 0], s64[labels == 1])
        out["best_f1"], out["best_f1_threshold"] = float(best), float(best_threshold)
    if maps is not None and masks is not None and masks.any() and not masks.all():
        if maps.shape[1:] != masks.shape[1:]:
            h, w = masks.shape[1:]
            maps = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])
        out["pixel_auroc"] = float(roc_auc_score(masks.reshape(-1).astype(int), maps.reshape(-1)))
    return out


def evaluate_onnx(onnx_path: Path, test: ImageSet, threshold: float, batch: int = 16) -> Evaluation:
    """Score ``test`` with the ONNX file and compute the metrics."""
    scores, maps = run_onnx(onnx_scorer(onnx_path, batch), test.images)
    has_map = maps is not None and maps.ndim == 3
    metrics = metrics_from_scores(scores, test.labels, threshold, maps if has_map else None, test.masks)
    return Evaluation(metrics=metrics, scores=scores, maps=maps if has_map else None, test=test)


def evaluate_bundle(ref: str | Path, data_dir: str | Path, batch: Optional[int] = None) -> Evaluation:
    """Load and verify a bundle, read DIR/test at its input size, and evaluate through its model.onnx."""
    bundle = load_bundle(ref)
    test = load_test(Path(data_dir), bundle.input_hw, bundle.input_resize)
    if test is None:
        raise UserError(f"{Path(data_dir) / 'test'}: no test folder; add DIR/test/good and DIR/test/<defect> images")
    max_batch = int(bundle.manifest.get("input", {}).get("max_batch", 16))
    evaluation = evaluate_onnx(bundle.onnx_path, test, bundle.threshold, batch or max_batch)
    evaluation.bundle = bundle
    return evaluation


def write_eval_report(evaluation: Evaluation, data_dir: Path, out_dir: Path, cases: int) -> Path:
    """report.json and the plots of an evaluated bundle into ``out_dir``; returns the report.json path."""
    from trainer import report as rep

    bundle = evaluation.bundle
    if bundle is None:
        raise ValueError("write_eval_report needs an Evaluation from evaluate_bundle")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the report folder ({exc.strerror}); pass --out DIR, "
                        "a writable folder") from None
    has_baseline = isinstance(bundle.manifest["calibration"].get("normal_median"), (int, float))
    section = rep.write_test_report(out_dir, evaluation.test, evaluation.scores, evaluation.maps, bundle.threshold,
                                    bundle.score_baseline if has_baseline else None, root=Path(data_dir),
                                    cases=cases, in_score_units=rep.map_in_score_units(bundle.model_name))
    report = {
        "kind": "eval", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle.path), "model": bundle.model_name, "model_version": bundle.version,
        "data": str(data_dir), "graph": bundle.onnx_path.name, "metrics": evaluation.metrics,
        "threshold": bundle.threshold, **section,
    }
    return rep.write_report(out_dir, report)
