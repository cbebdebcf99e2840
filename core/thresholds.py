"""Score thresholds from good parts' scores: one rule for the trainer's calibration and the station's own.

A high quantile of normal scores plus a margin, and at least their mean + k·σ.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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


def normalisation(normal_scores: np.ndarray) -> dict[str, float]:
    """Statistics of normal scores: for min-max or z scaling on the edge, the close level and drift alarms."""
    s = np.asarray(normal_scores, np.float64)
    return {"normal_mean": float(s.mean()), "normal_std": float(s.std()), "normal_min": float(s.min()),
            "normal_max": float(s.max()), "normal_median": float(np.median(s))}


def normal_calibration(normal_scores: np.ndarray, quantile: float, margin: float, sigmas: float) -> dict[str, Any]:
    """The calibration dict of normal scores only (the manifest's, and the station's): threshold and statistics."""
    s = np.asarray(normal_scores, np.float64)
    out: dict[str, Any] = {"threshold": quantile_threshold(s, quantile, margin, sigmas), "method": "quantile",
                           "quantile": quantile, "margin": margin, "sigmas": sigmas, "n_normal": int(s.size),
                           "n_anomalous": 0}
    out.update(normalisation(s))
    return out
