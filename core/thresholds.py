"""Score thresholds: one calibration policy for the trainer's calibration and the station's own.

A threshold is an operating point: it trades false alarms on good parts against missed defects. The policies
(``calibration.policy``):

- ``false-alarm-rate`` (the default): the score that ``target_false_alarm_rate`` of good parts reach, estimated
  from held-out normal scores. A few dozen normals do not show a 1 % tail (their 0.99 quantile is about their
  maximum), so unless at least ``EMPIRICAL_TAIL`` normals lie above the target, the tail is a Gaussian fitted to
  them (mean + z·sd) instead of the sample quantile.
- ``recall``: the highest threshold that catches ``target_recall`` of the labelled defects.
- ``best-f1``: the F1-optimal threshold on held-out normals and labelled defects.
- ``quantile``: the rule bundles had before policies (a high quantile plus a margin, at least mean + k·σ); on
  real data it sat above nearly every defect (elpv: recall 0.125), kept for old configs.

Torch- and sklearn-free: the station (edge/calibration.py) applies the very same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Optional

import numpy as np

FALSE_ALARM_RATE = "false-alarm-rate"
RECALL = "recall"
BEST_F1 = "best-f1"
QUANTILE = "quantile"
POLICIES = (FALSE_ALARM_RATE, RECALL, BEST_F1, QUANTILE)
NEEDS_DEFECTS = (RECALL, BEST_F1)
DEFAULT_POLICY = FALSE_ALARM_RATE
DEFAULT_FALSE_ALARM_RATE = 0.01  # chosen on the elpv solar-cell protocol: docs/training.md, "Calibration"
DEFAULT_RECALL = 0.9
EMPIRICAL_TAIL = 20  # normals above a rate's threshold needed before their sample quantile is trusted
MOST_MISSED = 0.5  # expected recall below this with labelled defects: a loud warning


class NeedsDefects(ValueError):
    """The policy chooses on labelled defects and there are none; the caller says where to put them."""


@dataclass(frozen=True)
class Policy:
    """How a threshold is chosen; the targets and the quantile rule's settings not used by ``name`` are ignored."""

    name: str = DEFAULT_POLICY
    target_false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    target_recall: float = DEFAULT_RECALL
    quantile: float = 0.99
    margin: float = 0.5
    sigmas: float = 3.0

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"calibration.policy '{self.name}' is not one of {', '.join(POLICIES)}")
        if not 0.0 < self.target_false_alarm_rate < 0.5:
            raise ValueError("calibration.target_false_alarm_rate must be in (0, 0.5), e.g. 0.01 for 1 %")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError("calibration.target_recall must be in (0, 1], e.g. 0.9")
        if not 0.5 <= self.quantile <= 1.0 or self.margin < 0 or self.sigmas < 0:
            raise ValueError("calibration.quantile must be in [0.5, 1], calibration.margin and sigmas >= 0")

    @property
    def needs_defects(self) -> bool:
        return self.name in NEEDS_DEFECTS

    def describe(self) -> str:
        """The policy in a few words, for logs: ``false-alarm-rate 1%``."""
        if self.name == FALSE_ALARM_RATE:
            return f"{self.name} {self.target_false_alarm_rate:.3g}"
        if self.name == RECALL:
            return f"{self.name} {self.target_recall:.3g}"
        if self.name == QUANTILE:
            return f"{self.name} {self.quantile:g} + margin {self.margin:g}, mean + {self.sigmas:g} sd floor"
        return self.name

    def record(self) -> dict[str, Any]:
        """The policy's part of a calibration dict (what a station re-applies on site)."""
        out: dict[str, Any] = {"policy": self.name}
        if self.name == FALSE_ALARM_RATE:
            out["target_false_alarm_rate"] = self.target_false_alarm_rate
        elif self.name == RECALL:
            out["target_recall"] = self.target_recall
        elif self.name == QUANTILE:
            out.update(quantile=self.quantile, margin=self.margin, sigmas=self.sigmas)
        return out


def recorded_policy(calibration: dict[str, Any]) -> Optional[Policy]:
    """The policy a calibration dict (a manifest's) was chosen with; None for one written before policies."""
    name = calibration.get("policy")
    if name not in POLICIES:
        return None
    try:
        return Policy(str(name), float(calibration.get("target_false_alarm_rate", DEFAULT_FALSE_ALARM_RATE)),
                      float(calibration.get("target_recall", DEFAULT_RECALL)), float(calibration.get("quantile", 0.99)),
                      float(calibration.get("margin", 0.5)), float(calibration.get("sigmas", 3.0)))
    except (TypeError, ValueError):
        return None


# -- the rules --------------------------------------------------------------------------------------------------
def quantile_threshold(normal_scores: np.ndarray, quantile: float, margin: float, sigmas: float = 0.0) -> float:
    """``q``-quantile of normal scores raised by ``margin`` x (quantile - median), and at least mean + ``sigmas`` x std
    (the ``quantile`` policy)."""
    s = _scores(normal_scores)
    q = float(np.quantile(s, quantile))
    med = float(np.median(s))
    return max(q + margin * max(q - med, 0.0), float(s.mean() + sigmas * s.std()))


def rate_threshold(normal_scores: np.ndarray, rate: float) -> tuple[float, str]:
    """(threshold, estimator): the score ``rate`` of good parts reach, from normal scores.

    The sample ``1 - rate`` quantile when at least ``EMPIRICAL_TAIL`` normals lie above it; otherwise a Gaussian
    tail (mean + z·sd): 60 normals put their 0.99 quantile at about their maximum, far above the 1 % a line sees.
    """
    s = _scores(normal_scores)
    if s.size * rate >= EMPIRICAL_TAIL:
        return float(np.quantile(s, 1.0 - rate)), "empirical quantile"
    if s.size < 2:
        raise ValueError("a false-alarm-rate threshold needs at least 2 normal scores")
    sd = float(s.std(ddof=1))
    if sd == 0.0:  # every normal scored the same: just above them
        return float(np.nextafter(s.max(), np.inf)), "gaussian tail"
    return float(s.mean() + NormalDist().inv_cdf(1.0 - rate) * sd), "gaussian tail"


def false_alarm_rate(normal_scores: np.ndarray, threshold: float) -> float:
    """The share of good parts expected at or above ``threshold``, by the estimator ``rate_threshold`` uses: the
    sample share when at least ``EMPIRICAL_TAIL`` normals reach it, else the Gaussian tail."""
    s = _scores(normal_scores)
    above = int((s >= threshold).sum())
    if above >= EMPIRICAL_TAIL or s.size < 2:
        return above / s.size
    sd = float(s.std(ddof=1))
    if sd == 0.0:
        return float(above > 0)
    return float(1.0 - NormalDist(float(s.mean()), sd).cdf(threshold))


def recall_threshold(normal_scores: np.ndarray, defect_scores: np.ndarray, recall: float) -> float:
    """The highest threshold with at least ``recall`` of the defects at or above it, placed halfway down to the next
    lower score (of either kind), so it sits on no sample."""
    d = np.sort(_scores(defect_scores))[::-1]
    k = max(1, math.ceil(recall * d.size - 1e-9))
    thr = float(d[k - 1])
    return _halfway(thr, np.concatenate([_scores(normal_scores), d]))


def f1_threshold(normal_scores: np.ndarray, defect_scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the F1-optimal threshold of ``score >= threshold`` (the highest on a tie: fewer alarms),
    placed halfway down to the next lower score."""
    s = np.concatenate([_scores(normal_scores), _scores(defect_scores)])
    y = np.concatenate([np.zeros(len(normal_scores), bool), np.ones(len(defect_scores), bool)])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last of each run of equal scores: every threshold at a score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    f1 = 2 * tp / np.maximum(tp + fp + y.sum(), 1)
    best = int(np.argmax(f1))
    return _halfway(float(s[last][best]), s), float(f1[best])


def rates(normal_scores: np.ndarray, defect_scores: Optional[np.ndarray], threshold: float) -> dict[str, Any]:
    """What ``threshold`` does on these scores: false alarms (sample share and tail estimate) and, with defects,
    recall, precision and F1."""
    s = _scores(normal_scores)
    out: dict[str, Any] = {"false_alarm_rate": false_alarm_rate(s, threshold),
                           "holdout_false_alarm_rate": float((s >= threshold).mean()),
                           "holdout_false_alarms": int((s >= threshold).sum())}
    if defect_scores is not None and len(defect_scores):
        d = _scores(defect_scores)
        tp, fp = int((d >= threshold).sum()), int((s >= threshold).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / d.size
        out.update(recall=recall, precision=precision,
                   f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return out


def choose_threshold(policy: Policy, normal_scores: np.ndarray,
                     defect_scores: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The calibration dict of ``policy`` on held-out normal scores (and labelled defect scores): threshold, the
    policy, what it is expected to do (false alarms always, recall with defects; ``most_defects_missed`` when most
    labelled defects fall below it) and the normals' statistics. Raises ``NeedsDefects`` for a policy that chooses
    on defects when there are none."""
    s = _scores(normal_scores)
    d = None if defect_scores is None or not len(defect_scores) else _scores(defect_scores)
    if policy.needs_defects and d is None:
        raise NeedsDefects(f"calibration.policy {policy.name} chooses the threshold on labelled defect images and "
                           "there are none")
    out: dict[str, Any] = {"method": policy.name, **policy.record()}
    if policy.name == FALSE_ALARM_RATE:
        thr, out["estimator"] = rate_threshold(s, policy.target_false_alarm_rate)
    elif policy.name == RECALL:
        assert d is not None
        thr = recall_threshold(s, d, policy.target_recall)
    elif policy.name == BEST_F1:
        assert d is not None
        thr, _f1 = f1_threshold(s, d)
    else:
        thr = quantile_threshold(s, policy.quantile, policy.margin, policy.sigmas)
    out["threshold"] = float(thr)
    out.update({"n_normal": int(s.size), "n_anomalous": 0 if d is None else int(d.size)})
    measured = rates(s, d, thr)
    out["expected_false_alarm_rate"] = measured.pop("false_alarm_rate")
    out.update(measured)
    if d is not None:
        out["expected_recall"] = out.pop("recall")
        out["most_defects_missed"] = bool(out["expected_recall"] < MOST_MISSED)
    out.update(normalisation(s))
    return out


def normal_calibration(normal_scores: np.ndarray, quantile: float, margin: float, sigmas: float) -> dict[str, Any]:
    """The ``quantile`` policy's calibration dict (the rule before policies): threshold and statistics."""
    return choose_threshold(Policy(QUANTILE, quantile=quantile, margin=margin, sigmas=sigmas), normal_scores)


def normalisation(normal_scores: np.ndarray) -> dict[str, float]:
    """Statistics of normal scores: for min-max or z scaling on the edge, the close level and drift alarms."""
    s = np.asarray(normal_scores, np.float64)
    return {"normal_mean": float(s.mean()), "normal_std": float(s.std()), "normal_min": float(s.min()),
            "normal_max": float(s.max()), "normal_median": float(np.median(s))}


def _scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError("no scores to calibrate on")
    return s


def _halfway(threshold: float, scores: np.ndarray) -> float:
    """``threshold`` moved halfway down to the next lower score, when there is one."""
    below = scores[scores < threshold]
    return 0.5 * (threshold + float(below.max())) if below.size else threshold
