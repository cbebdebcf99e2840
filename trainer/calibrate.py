"""Score threshold calibration and the normal/validation split it needs.

Normal-only data: a high quantile of held-out normal scores plus a margin, never the minimum (a threshold
at the lowest normal score flags nearly every good part: a bug users of a widely used library hit).
Labelled validation data with defects: the F1-optimal threshold. Either way the calibration dict also
carries normalisation constants of the normal scores, so the edge can show a scaled score and an operator
can move the threshold at run time without re-exporting.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from sklearn.metrics import precision_recall_curve

from edge.errors import UserError


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, holdout) of ``n`` training images; the holdout never enters the memory bank."""
    if n < 2:
        raise UserError(f"only {n} training image(s); at least 2 are needed (part is held out for calibration), "
                        "add more normal images to DIR/train/good")
    n_hold = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def quantile_threshold(normal_scores: np.ndarray, quantile: float, margin: float, sigmas: float = 0.0) -> float:
    """``q``-quantile of normal scores raised by ``margin`` x (quantile - median), and at least mean + ``sigmas`` x std.

    A few held-out images see little of the tail: their 0.99 quantile is about their maximum, and a camera
    stream then crosses it every few dozen good frames. The mean + k·std floor estimates the tail from the
    spread instead of from the one largest sample.
    """
    s = np.asarray(normal_scores, np.float64)
    if s.size == 0:
        raise ValueError("no normal scores to calibrate on")
    q = float(np.quantile(s, quantile))
    med = float(np.median(s))
    return max(q + margin * max(q - med, 0.0), float(s.mean() + sigmas * s.std()))


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


def normalisation(normal_scores: np.ndarray) -> dict[str, float]:
    """Statistics of normal scores: for min-max or z scaling on the edge."""
    s = np.asarray(normal_scores, np.float64)
    return {"normal_mean": float(s.mean()), "normal_std": float(s.std()), "normal_min": float(s.min()),
            "normal_max": float(s.max()), "normal_median": float(np.median(s))}


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
    out: dict[str, Any]
    if has_defects and method in ("auto", "f1"):
        assert val_scores is not None and val_labels is not None
        scores = np.concatenate([normal_scores, np.asarray(val_scores, np.float64)])
        labels = np.concatenate([np.zeros(len(normal_scores), int), np.asarray(val_labels, int)])
        thr, f1 = f1_threshold(scores, labels)
        normals = scores[labels == 0]
        out = {"threshold": thr, "method": "f1", "validation_f1": f1,
               "n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum())}
    else:
        normals = normal_scores
        thr = quantile_threshold(normals, quantile, margin, sigmas)
        out = {"threshold": thr, "method": "quantile", "quantile": quantile, "margin": margin, "sigmas": sigmas,
               "n_normal": len(normals), "n_anomalous": 0}
    out.update(normalisation(normals))
    out["threshold"] = float(out["threshold"])
    return out
