"""The station's own (on-site) calibration: the trainer's calibration policy applied to the station's stream.

A bundle is calibrated on the trainer's held-out stills; a live stream (another codec, other light, a nudged
camera) moves good parts' scores, so ``edge-run --calibrate N`` applies the same policy (core/thresholds.py, the
functions trainer/calibrate.py uses) to N frames of the station's own stream that the operator declares good:
by default the policy the bundle was calibrated with (its manifest's ``calibration.policy``: a target
false-alarm rate unless the trainer was told otherwise). A policy that chooses on labelled defects (``recall``,
``best-f1``) takes the peak frames of the events operators labelled as defects of this bundle version
(``<collect dir>/test/<kind>/``, scores from their sidecars); without any it falls back to the false-alarm-rate
target and says so. That result is station state (``state_dir/<station>.calibration.json``), never written into
the bundle, which stays immutable; it records the bundle version it belongs to and applies to that version only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from core.bundle import Bundle
from core.errors import UserError
from core.files import atomic_write_text
from core.site_calibration import CALIBRATION_FORMAT, SUFFIX, SiteCalibration, load_site_calibration
from core.thresholds import (
    FALSE_ALARM_RATE,
    MOST_MISSED,
    QUANTILE,
    RECALL,
    Policy,
    normal_calibration,
    recorded_policy,
)
from core.thresholds import choose_threshold as choose_by_policy

__all__ = ["normal_calibration", "labelled_defect_scores", "site_calibration", "station_policy"]

log = logging.getLogger("edge.calibration")


def station_policy(bundle: Bundle, policy: Optional[Policy] = None, quantile: Optional[float] = None,
                   margin: Optional[float] = None, sigmas: Optional[float] = None) -> tuple[Policy, str]:
    """(the policy an on-site calibration of ``bundle`` applies, where it comes from): ``policy`` when given; the
    quantile rule when the station config sets calibration.quantile, margin or sigmas (configs from before
    policies); else the policy recorded in the bundle's calibration; else the default policy."""
    if policy is not None:
        return policy, "the station config's calibration.policy"
    if quantile is not None or margin is not None or sigmas is not None:
        return (Policy(QUANTILE, quantile=0.99 if quantile is None else quantile,
                       margin=0.5 if margin is None else margin, sigmas=3.0 if sigmas is None else sigmas),
                "calibration.quantile/margin/sigmas of the station config")
    recorded = recorded_policy(bundle.manifest.get("calibration", {}))
    if recorded is not None:
        return recorded, "the bundle's calibration policy"
    return Policy(), "the default policy (the bundle records none)"


def labelled_defect_scores(labels_dir: Optional[Path], bundle: Bundle) -> np.ndarray:
    """Scores of the events operators labelled as defects (``labels_dir/test/<kind>/``, the peak frame's sidecar)
    that ``bundle``'s very version scored; empty without any. Another version's scores mean nothing here."""
    scores: list[float] = []
    test = labels_dir / "test" if labels_dir is not None else None
    if test is None or not test.is_dir():
        return np.zeros(0)
    for kind in sorted(p for p in test.iterdir() if p.is_dir() and p.name != "good"):
        for sidecar in sorted(kind.glob("*.json")):
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
                if (meta.get("peak") and meta.get("model") == bundle.model_name
                        and meta.get("model_version") == bundle.version):
                    scores.append(float(meta["score"]))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a sidecar that cannot be read is no label
    return np.asarray(scores, np.float64)


def site_calibration(scores: np.ndarray, bundle: Bundle, quantile: float = 0.99, margin: float = 0.5,
                     sigmas: float = 3.0, *, policy: Optional[Policy] = None,
                     defect_scores: Optional[np.ndarray] = None) -> SiteCalibration:
    """The station's calibration of ``bundle`` by ``policy`` (else the quantile rule of ``quantile``, ``margin``,
    ``sigmas``) from scores of frames the operator declared good, and of labelled defects when there are some."""
    rule = policy if policy is not None else Policy(QUANTILE, quantile=quantile, margin=margin, sigmas=sigmas)
    defects = defect_scores if defect_scores is not None and len(defect_scores) else None
    cal = choose_by_policy(rule, scores, defects)
    target = {FALSE_ALARM_RATE: rule.target_false_alarm_rate, RECALL: rule.target_recall}.get(rule.name)
    return SiteCalibration(model=bundle.model_name, model_version=bundle.version, threshold=float(cal["threshold"]),
                           baseline=cal["normal_median"], sigma=cal["normal_std"], frames=int(cal["n_normal"]),
                           quantile=rule.quantile, margin=rule.margin, sigmas=rule.sigmas,
                           created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), policy=rule.name,
                           target=target, defects=int(cal["n_anomalous"]),
                           expected_false_alarm_rate=float(cal["expected_false_alarm_rate"]),
                           expected_recall=cal.get("expected_recall"))


def save_site_calibration(path: Path, cal: SiteCalibration) -> None:
    """Write then rename: a power cut leaves the old calibration or the new one, never half of either."""
    atomic_write_text(path, json.dumps({"format": CALIBRATION_FORMAT, **asdict(cal)}, indent=2) + "\n")


def clear_site_calibration(path: Path) -> bool:
    """Remove the stored calibration (a new bundle was promoted: it no longer applies); True when one was there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold in force, the good-part statistics that go with it, and why (for the log and the stats)."""

    threshold: float
    baseline: float
    sigma: Optional[float]  # spread of good scores (drift alarm unit); None when nothing recorded it
    source: str  # "config", "on-site" or "bundle"
    reason: str
    calibration: Optional[SiteCalibration]

    def stats(self) -> dict[str, Any]:
        """The stats topic's ``calibration`` object."""
        cal = self.calibration
        return {"source": self.source, "threshold": round(self.threshold, 6), "baseline": round(self.baseline, 6),
                "sigma": None if self.sigma is None else round(self.sigma, 6),
                "frames": cal.frames if cal else None, "created": cal.created if cal else None}


def choose_threshold(bundle: Bundle, config_threshold: Optional[float],
                     stored: Optional[SiteCalibration]) -> ThresholdChoice:
    """station.yaml's ``engine.threshold`` wins; else the on-site calibration of this very bundle version; else the
    bundle's own. The baseline and spread come from the on-site calibration whenever it is for this version."""
    cal = stored if stored is not None and stored.applies_to(bundle) else None
    sigma: Optional[float]
    if cal is not None:
        baseline, sigma = cal.baseline, cal.sigma
    else:
        recorded = bundle.manifest["calibration"].get("normal_std")
        baseline, sigma = bundle.score_baseline, (float(recorded) if recorded is not None else None)
    stale = (f"; the on-site calibration of {stored.model} {stored.model_version} does not apply to this version "
             "and was cleared: re-run --calibrate N on good parts" if stored is not None and cal is None else "")
    if config_threshold is not None:
        return ThresholdChoice(float(config_threshold), baseline, sigma, "config",
                               "engine.threshold in the station config" + stale, cal)
    if cal is not None:
        return ThresholdChoice(cal.threshold, baseline, sigma, "on-site", cal.describe(), cal)
    return ThresholdChoice(bundle.threshold, baseline, sigma, "bundle", "the bundle's calibration" + stale, None)


class Calibrator:
    """Collects the scores of the first ``frames`` frames (the operator declares them good); then ``done``."""

    def __init__(self, frames: int) -> None:
        if frames < 2:
            raise ValueError("calibration needs at least 2 frames")
        self.frames = frames
        self.scores: list[float] = []

    @property
    def done(self) -> bool:
        return len(self.scores) >= self.frames

    def add(self, score: float) -> None:
        if not self.done:
            self.scores.append(float(score))


class SiteThreshold:
    """The station's threshold over its run: the choice at start, an on-site calibration in progress
    (``--calibrate N``) and what a hot-swapped bundle does to it (its version's calibration no longer applies).

    The first minutes on a new station are where a bundle calibrated on the trainer's stills fires falsely (another
    camera, codec or light moves good parts' scores). So a bundle version that runs on neither an on-site
    calibration nor ``engine.threshold`` is said loudly (a WARNING naming ``edge-run --calibrate N``), and with
    ``calibration.warm_up_frames`` N > 0 the station calibrates on its first N frames of that version by itself,
    as ``--calibrate N`` would (no events until done; stored, so later runs of the version use it). Off by
    default: the warm-up takes those frames as good parts, which only the operator can vouch for.
    """

    def __init__(self, path: Path, config_threshold: Optional[float], quantile: Optional[float] = None,
                 margin: Optional[float] = None, sigmas: Optional[float] = None,
                 calibrate_frames: Optional[int] = None, warm_up_frames: int = 0, policy: Optional[Policy] = None,
                 labels_dir: Optional[Path] = None) -> None:
        self.path = path
        self.config_threshold = config_threshold
        self.rule = (quantile, margin, sigmas)  # set: the quantile rule of configs from before policies
        self.policy = policy  # None: the bundle's own policy
        # where operators' labelled events are (the default collect.dir, beside the calibration file)
        self.labels_dir = labels_dir if labels_dir is not None else path.parent / "collect" / path.name[:-len(SUFFIX)]
        if calibrate_frames is not None and calibrate_frames < 2:
            raise UserError(f"--calibrate {calibrate_frames}: calibration needs at least 2 frames (a few hundred "
                            "show the tail of good parts' scores)")
        if warm_up_frames == 1 or warm_up_frames < 0:
            raise UserError(f"calibration.warm_up_frames {warm_up_frames}: 0 (off) or at least 2 frames")
        self.calibrator = Calibrator(calibrate_frames) if calibrate_frames else None
        self.warm_up_frames = warm_up_frames
        self.warming_up = False  # the calibration in progress is the warm-up, not the operator's --calibrate
        self._said: Optional[tuple[str, str]] = None  # the bundle version last warned about
        self._notices: list[str] = []  # warnings kept until the station has started (``tell``)
        try:
            self.stored = load_site_calibration(path)
        except UserError as exc:
            if self.calibrator is None:
                raise
            log.warning("%s; --calibrate replaces it", exc)
            self.stored = None

    def start(self, frames: int) -> None:
        """Calibrate on the next ``frames`` scored frames, as --calibrate N does from the start (the live page's
        "calibrate now")."""
        self.calibrator, self.warming_up = Calibrator(frames), False

    @property
    def calibrating(self) -> bool:
        return self.calibrator is not None and not self.calibrator.done

    def choose(self, bundle: Bundle) -> ThresholdChoice:
        """The threshold ``bundle`` runs at; a stored calibration of another version is cleared (its reason says so).
        A version with no on-site calibration starts the warm-up, or is warned about (once a version)."""
        choice = choose_threshold(bundle, self.config_threshold, self.stored)
        if self.stored is not None and not self.stored.applies_to(bundle):
            clear_site_calibration(self.path)
            self.stored = None
        if choice.source == "bundle" and not self.calibrating:
            self._uncalibrated(bundle)
        return choice

    def _uncalibrated(self, bundle: Bundle) -> None:
        """``bundle`` would run at the threshold set on the trainer's stills: warm up, or say so loudly."""
        version = (bundle.model_name, bundle.version)
        if self.warm_up_frames:
            self.calibrator, self.warming_up = Calibrator(self.warm_up_frames), True
            self._notices.append(
                f"no on-site calibration for {bundle.model_name} {bundle.version} on this station: warming up, the "
                f"first {self.warm_up_frames} frames are taken as good parts and set its threshold "
                "(calibration.warm_up_frames); no events until then")
        elif self._said != version:
            self._notices.append(
                f"no on-site calibration for {bundle.model_name} {bundle.version} on this station: it runs at the "
                f"bundle's threshold {bundle.threshold:.6g}, set on the trainer's images; another camera, codec or "
                "light moves good parts' scores and may raise false events. With good parts in view, run edge-run "
                "--calibrate N (N good frames, a few hundred) with this station's arguments, or set "
                "calibration.warm_up_frames to have the station calibrate at start by itself")
        self._said = version

    def tell(self) -> None:
        """Log the warnings kept since the last call. Kept, not logged at once: a start that fails afterwards (a
        camera that will not open) must still end in one line."""
        for notice in self._notices:
            log.warning("%s", notice)
        self._notices.clear()

    def startup_text(self, choice: ThresholdChoice) -> str:
        """The start-up line's ``threshold ...`` part: which threshold is in force and why."""
        text = f"threshold {choice.threshold:.6g} ({choice.reason})"
        if self.calibrating:
            assert self.calibrator is not None
            text += (f", {'warm-up' if self.warming_up else 'on-site'} calibration on the first "
                     f"{self.calibrator.frames} frames (declared good: no events until it is done)")
        return text

    def add(self, score: float, bundle: Bundle) -> Optional[ThresholdChoice]:
        """A score of a frame declared good; once the N-th arrives the calibration is stored and the new choice
        returned (the config's engine.threshold still wins, and the log says so)."""
        assert self.calibrator is not None
        self.calibrator.add(score)
        if not self.calibrator.done:
            return None
        self.warming_up = False
        scores = np.asarray(self.calibrator.scores, np.float64)
        cal = self._calibrate(scores, bundle)
        save_site_calibration(self.path, cal)
        self.stored = cal
        choice = self.choose(bundle)
        recall = ("" if cal.expected_recall is None else
                  f", expected recall {cal.expected_recall:.1%} of {cal.defects} labelled defects")
        log.info("on-site calibration of %s %s: %d good frames, median %.6g, σ %.4g: threshold %.6g by policy %s "
                 "(the bundle's %.6g), expected false-alarm rate %.2f%%%s, stored in %s; %s", bundle.model_name,
                 bundle.version, cal.frames, cal.baseline, cal.sigma, cal.threshold, cal.policy, bundle.threshold,
                 100 * (cal.expected_false_alarm_rate or 0.0), recall, self.path,
                 "in force from now" if choice.source == "on-site"
                 else f"engine.threshold {choice.threshold:.6g} of the station config stays in force")
        if cal.expected_recall is not None and cal.expected_recall < MOST_MISSED:
            log.warning("WARNING: %d of the %d defects operators labelled for %s %s score below the on-site "
                        "threshold %.6g: the station would miss most defects like them; see docs/station.md, "
                        "\"On-site calibration and drift alarms\"", round(cal.defects * (1 - cal.expected_recall)),
                        cal.defects, bundle.model_name, bundle.version, cal.threshold)
        return choice

    def _calibrate(self, scores: np.ndarray, bundle: Bundle) -> SiteCalibration:
        """The calibration of ``bundle`` from the good frames' ``scores`` by the station's policy; a policy that
        needs labelled defects and finds none of this version falls back to its false-alarm-rate target."""
        quantile, margin, sigmas = self.rule
        policy, source = station_policy(bundle, self.policy, quantile, margin, sigmas)
        defects = labelled_defect_scores(self.labels_dir, bundle)
        if policy.needs_defects and not defects.size:
            fallback = Policy(FALSE_ALARM_RATE, policy.target_false_alarm_rate)
            log.warning("on-site calibration: policy %s (%s) chooses on labelled defects and operators have labelled "
                        "none of %s %s in %s: the threshold is set for %s on the good frames instead; label events "
                        "as defects (edge-run label) and calibrate again to use them", policy.describe(), source,
                        bundle.model_name, bundle.version, self.labels_dir / "test", fallback.describe())
            policy = fallback
        return site_calibration(scores, bundle, policy=policy, defect_scores=defects)

    def swapped(self, bundle: Bundle) -> ThresholdChoice:
        """A new bundle version runs: the old version's calibration is cleared (re-run --calibrate N for the new
        one); a calibration in progress starts again on the new bundle's scores."""
        if self.calibrator is not None and not self.calibrator.done:
            if self.warming_up:  # the new version warms up afresh if it needs to (choose decides)
                self.calibrator, self.warming_up = None, False
            else:
                self.calibrator = Calibrator(self.calibrator.frames)
        return self.choose(bundle)
