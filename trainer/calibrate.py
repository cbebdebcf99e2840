"""Score threshold calibration and the normal/validation split it needs.

Normal-only data: a high quantile of held-out normal scores plus a margin, never the minimum (a threshold
at the lowest normal score flags nearly every good part: a bug users of a widely used library hit). That
rule lives in edge/calibration.py, so a station calibrating on its own stream applies the very same one.
Labelled validation data with defects: the F1-optimal threshold. Either way the calibration dict also
carries normalisation constants of the normal scores, so the edge can show a scaled score and an operator
can move the threshold at run time without re-exporting.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from sklearn.metrics import precision_recall_curve

from core.errors import UserError
from core.thresholds import normal_calibration, normalisation, quantile_threshold

__all__ = ["calibrate", "f1_threshold", "normalisation", "quantile_threshold", "split_holdout"]


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, holdout) of ``n`` training images; the holdout never enters the memory bank."""
    if n < 2:
        raise UserError(f"only {n} training image(s); at least 2 are needed (part is held out for calibration), "
                        "add more normal images to DIR/train/good")
    n_hold = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of ``score >= threshold`` on labelled scores.

    The threshold is placed halfway between the chosen score and the next lower score, so it is not
    sitting exactly on one sample.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise ValueError("F1 calibration needs both normal and anomalous scores")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    thr = float(thresholds[best])
    below = scores[scores < thr]
    if below.size:
        thr = 0.5 * (thr + float(below.max()))
    return thr, float(f1[best])


def calibrate(normal_scores: np.ndarray, method: str = "auto", quantile: float = 0.99, margin: float = 0.5,
              sigmas: float = 3.0, val_scores: Optional[np.ndarray] = None,
              val_labels: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The manifest's calibration dict: threshold, method and normalisation constants.

    ``normal_scores``: held-out normal images (not in the model). ``val_scores``/``val_labels``: optional
    labelled validation data (DIR/val); used for F1 when it holds defects and ``method`` is auto or f1.
    """
    normal_scores = np.asarray(normal_scores, np.float64)
    has_defects = val_labels is not None and len(val_labels) > 0 and int(np.max(val_labels)) == 1
    if method == "f1" and not has_defects:
        raise UserError("calibration.method is f1 but there are no defect images in DIR/val/<defect>/; "
                        "add some or set calibration.method: quantile")
    if not (has_defects and method in ("auto", "f1")):
        return normal_calibration(normal_scores, quantile, margin, sigmas)  # the rule the station uses on site
    assert val_scores is not None and val_labels is not None
    scores = np.concatenate([normal_scores, np.asarray(val_scores, np.float64)])
    labels = np.concatenate([np.zeros(len(normal_scores), int), np.asarray(val_labels, int)])
    thr, f1 = f1_threshold(scores, labels)
    out: dict[str, Any] = {"threshold": float(thr), "method": "f1", "validation_f1": f1,
                           "n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum())}
    out.update(normalisation(scores[labels == 0]))
    return out
