"""Score threshold calibration by ``calibration.policy`` and the normal/validation split it needs.

The policies live in core/thresholds.py, so a station calibrating on its own stream applies the very same
rules. Here: the trainer's inputs (held-out normals; DIR/val/good joins them, DIR/val/<defect> are the labelled
defects) and its user-facing errors, and the lines a fit prints about the operating point it ships: the
false-alarm rate it expects always, the recall it expects when there are labelled defects, and a WARNING when
most labelled defects fall below the threshold.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from core.errors import UserError
from core.thresholds import (
    MOST_MISSED,
    NeedsDefects,
    Policy,
    choose_threshold,
    f1_threshold,
    normalisation,
    quantile_threshold,
)

__all__ = ["calibrate", "expectation_lines", "f1_threshold", "normalisation", "quantile_threshold", "split_holdout"]


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, holdout) of ``n`` training images; the holdout never enters the memory bank."""
    if n < 2:
        raise UserError(f"only {n} training image(s); at least 2 are needed (part is held out for calibration), "
                        "add more normal images to DIR/train/good")
    n_hold = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def calibrate(normal_scores: np.ndarray, policy: Policy, val_scores: Optional[np.ndarray] = None,
              val_labels: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The manifest's calibration dict: threshold, policy, expected rates and normalisation constants.

    ``normal_scores``: held-out normal images (not in the model). ``val_scores``/``val_labels``: optional labelled
    validation data (DIR/val): its good images join the normals, its defects are the labelled defects every
    policy reports recall on and ``recall`` / ``best-f1`` choose on.
    """
    normal = np.asarray(normal_scores, np.float64)
    defects: Optional[np.ndarray] = None
    if val_scores is not None and val_labels is not None and len(val_labels):
        v, y = np.asarray(val_scores, np.float64), np.asarray(val_labels).astype(int)
        normal = np.concatenate([normal, v[y == 0]])
        defects = v[y == 1] if (y == 1).any() else None
    try:
        return choose_threshold(policy, normal, defects)
    except NeedsDefects:
        raise UserError(
            f"calibration.policy is {policy.name} but there are no labelled defect images: put some in "
            "DIR/val/<defect>/ (and good ones in DIR/val/good/), or set calibration.policy: false-alarm-rate "
            "(with calibration.target_false_alarm_rate)") from None


def expectation_lines(calibration: dict[str, Any]) -> tuple[list[str], Optional[str]]:
    """(the fit log's lines on the shipped operating point, the warning when most labelled defects fall below it)."""
    c = calibration
    lines = [f"expected false-alarm rate at the threshold {c['threshold']:.4g}: {c['expected_false_alarm_rate']:.2%} "
             f"of good parts ({c.get('estimator', 'sample share')} of {c['n_normal']} held-out normal scores; "
             f"{c['holdout_false_alarms']} of them at or above it)"]
    warning = None
    if c.get("n_anomalous"):
        lines.append(f"expected recall at the threshold: {c['expected_recall']:.1%} of {c['n_anomalous']} labelled "
                     f"defects (precision {c['precision']:.1%}, F1 {c['f1']:.3f} on the hold-out and DIR/val)")
        if c.get("most_defects_missed"):
            warning = (f"WARNING: {1 - c['expected_recall']:.0%} of the {c['n_anomalous']} labelled defects score "
                       f"below the threshold {c['threshold']:.4g} (recall {c['expected_recall']:.1%} < "
                       f"{MOST_MISSED:.0%}): the station would miss most defects like them. Look at the report's "
                       "operating curve and choose calibration.policy recall or best-f1, or a higher "
                       "calibration.target_false_alarm_rate")
    return lines, warning
