"""Score thresholds from good parts' scores, and the station's own (on-site) calibration.

One rule for trainer and station alike (trainer/calibrate.py imports it from here): a high quantile of normal
scores plus a margin, and at least their mean + k·σ. A bundle is calibrated on the trainer's held-out stills;
a live stream (another codec, other light, a nudged camera) moves good parts' scores, so ``edge-run
--calibrate N`` applies the same rule to N frames of the station's own stream that the operator declares good.
That result is station state (``state_dir/<station>.calibration.json``), never written into the bundle, which
stays immutable; it records the bundle version it belongs to and applies to that version only.
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
from core.site_calibration import CALIBRATION_FORMAT, SiteCalibration, load_site_calibration
from core.thresholds import normal_calibration

log = logging.getLogger("edge.calibration")


def site_calibration(scores: np.ndarray, bundle: Bundle, quantile: float, margin: float,
                     sigmas: float) -> SiteCalibration:
    """The station's calibration of ``bundle`` from scores of frames the operator declared good."""
    cal = normal_calibration(scores, quantile, margin, sigmas)
    return SiteCalibration(model=bundle.model_name, model_version=bundle.version, threshold=float(cal["threshold"]),
                           baseline=cal["normal_median"], sigma=cal["normal_std"], frames=int(cal["n_normal"]),
                           quantile=quantile, margin=margin, sigmas=sigmas,
                           created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


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

    def __init__(self, path: Path, config_threshold: Optional[float], quantile: float, margin: float, sigmas: float,
                 calibrate_frames: Optional[int] = None, warm_up_frames: int = 0) -> None:
        self.path = path
        self.config_threshold = config_threshold
        self.rule = (quantile, margin, sigmas)
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
        quantile, margin, sigmas = self.rule
        scores = np.asarray(self.calibrator.scores, np.float64)
        cal = site_calibration(scores, bundle, quantile, margin, sigmas)
        save_site_calibration(self.path, cal)
        self.stored = cal
        choice = self.choose(bundle)
        log.info("on-site calibration of %s %s: %d good frames, median %.6g, σ %.4g, 0.99 quantile %.6g: threshold "
                 "%.6g (the bundle's %.6g), stored in %s; %s", bundle.model_name, bundle.version, cal.frames,
                 cal.baseline, cal.sigma, float(np.quantile(scores, 0.99)), cal.threshold, bundle.threshold,
                 self.path, "in force from now" if choice.source == "on-site"
                 else f"engine.threshold {choice.threshold:.6g} of the station config stays in force")
        return choice

    def swapped(self, bundle: Bundle) -> ThresholdChoice:
        """A new bundle version runs: the old version's calibration is cleared (re-run --calibrate N for the new
        one); a calibration in progress starts again on the new bundle's scores."""
        if self.calibrator is not None and not self.calibrator.done:
            if self.warming_up:  # the new version warms up afresh if it needs to (choose decides)
                self.calibrator, self.warming_up = None, False
            else:
                self.calibrator = Calibrator(self.calibrator.frames)
        return self.choose(bundle)
