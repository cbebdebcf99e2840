"""The champion/challenger rule: a new bundle becomes current only when it is at least as good as the current one.

Both bundles are scored through their ONNX graphs on the same MVTec-style hold-out (test/good, test/<defect>),
and train.yaml's ``retrain`` section decides: the challenger's AUROC at least the champion's (less
``auroc_tolerance``), and its false-alarm rate and its rate of missed defects, each at its own threshold, at most
the champion's (plus ``false_alarm_tolerance`` / ``miss_tolerance``). ``edge-train retrain`` decides with it, and
so does ``edge-train fit`` when its model already has a current bundle: a fit that happens to come out worse must
not replace a better bundle that stations run.

The champion is judged at the threshold its station runs it at: the station's on-site calibration
(``edge-run --calibrate``, kept in the station's state_dir, read through core.site_calibration) when there is one
for that very version, else the bundle's own threshold. A challenger has no on-site calibration yet: its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.bundle import Bundle
from core.errors import UserError
from core.site_calibration import SUFFIX, calibration_path, load_site_calibration, stations_calibrated
from trainer.config import RetrainConfig

BUNDLE_THRESHOLD = "its bundle's threshold"


@dataclass
class ModelScores:
    """One model on the hold-out: AUROC (None without defects), false-alarm and miss rates at ``threshold``."""

    version: str
    threshold: float
    auroc: Optional[float]
    false_alarm_rate: float
    miss_rate: Optional[float]
    scores: list[float]
    threshold_from: str = BUNDLE_THRESHOLD  # where ``threshold`` comes from (the bundle, or a station's calibration)


@dataclass(frozen=True)
class JudgingThreshold:
    """The threshold a model is judged at, and where it comes from (said in the decision line)."""

    value: float
    source: str


def scores_at(version: str, scores: np.ndarray, labels: np.ndarray, at: JudgingThreshold,
              auroc: Optional[float]) -> ModelScores:
    """A model's rates on the hold-out from its ``scores`` (labels 0 good, 1 defect), at threshold ``at``."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    good, bad = scores[labels == 0], scores[labels == 1]
    return ModelScores(version=version, threshold=at.value, auroc=None if auroc is None else float(auroc),
                       false_alarm_rate=float((good >= at.value).mean()) if len(good) else 0.0,
                       miss_rate=float((bad < at.value).mean()) if len(bad) else None,
                       scores=[float(s) for s in scores], threshold_from=at.source)


def score_on(bundle: Bundle, holdout: Path, at: Optional[JudgingThreshold] = None) -> tuple[ModelScores, np.ndarray]:
    """``bundle`` on ``holdout``/test through its ONNX graph, judged at ``at`` (default: its own threshold);
    returns its scores and the labels."""
    from trainer.evaluate import evaluate_bundle

    ev = evaluate_bundle(bundle.path, holdout)
    labels = ev.test.labels.astype(int)
    at = at or JudgingThreshold(bundle.threshold, BUNDLE_THRESHOLD)
    return scores_at(bundle.version, ev.scores, labels, at, ev.metrics.get("image_auroc")), labels


def compare(champion: ModelScores, challenger: ModelScores, rule: RetrainConfig) -> tuple[bool, str]:
    """The rule: (is the challenger at least as good?, each measure as "challenger vs champion", in one line)."""
    reasons = []
    ok = True
    if champion.auroc is not None and challenger.auroc is not None:
        good = challenger.auroc >= champion.auroc - rule.auroc_tolerance
        ok &= good
        reasons.append(f"AUROC {challenger.auroc:.4f} vs {champion.auroc:.4f}" + ("" if good else " (worse)"))
    good = challenger.false_alarm_rate <= champion.false_alarm_rate + rule.false_alarm_tolerance
    ok &= good
    reasons.append(f"false alarms {challenger.false_alarm_rate:.1%} vs {champion.false_alarm_rate:.1%}"
                   + ("" if good else " (more)"))
    if champion.miss_rate is not None and challenger.miss_rate is not None:
        good = challenger.miss_rate <= champion.miss_rate + rule.miss_tolerance
        ok &= good
        reasons.append(f"missed defects {challenger.miss_rate:.1%} vs {champion.miss_rate:.1%}"
                       + ("" if good else " (more)"))
    return ok, ", ".join(reasons)


def decide(champion: ModelScores, challenger: ModelScores, rule: RetrainConfig) -> tuple[bool, str]:
    """The rule as retrain reports it: (promote?, "promoted: ..." or "refused: ...", in one line)."""
    ok, reasons = compare(champion, challenger, rule)
    judged = ("" if champion.threshold_from == BUNDLE_THRESHOLD
              else f"; champion at {champion.threshold_from}, {champion.threshold:.4g}")
    return ok, ("promoted: " if ok else "refused: ") + reasons + f" (challenger vs champion{judged})"


def station_calibration_file(state_dir: Path, station: Optional[str]) -> Optional[Path]:
    """The on-site calibration file that judges a champion: ``state_dir/<station>.calibration.json``; without
    ``station``, the one station calibrated in ``state_dir`` (None when none is). One line when it cannot say, or
    when the file is not a calibration (read now: before the minutes of training, not after)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"--state-dir {state_dir}: no such folder; pass the station's state_dir (state_dir in "
                        "station.yaml, where edge-run --calibrate keeps <station>.calibration.json), or leave "
                        "--state-dir out to judge the current bundle at its own threshold")
    if not station:
        stations = stations_calibrated(state_dir)
        if len(stations) > 1:
            raise UserError(f"--state-dir {state_dir}: holds the on-site calibrations of stations "
                            f"{', '.join(stations)}; pass --station ID to say whose threshold judges the current "
                            "bundle")
        if not stations:
            return None
        station = stations[0]
    path = calibration_path(state_dir, station)
    load_site_calibration(path)
    return path


def champion_threshold(champion: Bundle, calibration_file: Optional[Path],
                       log: Callable[[str], None]) -> JudgingThreshold:
    """The threshold the station runs ``champion`` at: its on-site calibration in ``calibration_file`` when that is
    of this very version, else the bundle's own (said in ``log`` when a file was given but does not apply)."""
    own = JudgingThreshold(champion.threshold, BUNDLE_THRESHOLD)
    if calibration_file is None:
        return own
    cal = load_site_calibration(calibration_file)
    if cal is None:
        log(f"no on-site calibration at {calibration_file}: the current bundle is judged at its own threshold")
        return own
    if not cal.applies_to(champion):
        log(f"{calibration_file} calibrates {cal.model} {cal.model_version}, not {champion.model_name} "
            f"{champion.version}: the current bundle is judged at its own threshold")
        return own
    station = calibration_file.name.removesuffix(SUFFIX)
    return JudgingThreshold(cal.threshold, f"station {station}'s on-site threshold ({cal.describe()})")
