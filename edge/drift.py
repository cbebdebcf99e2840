"""Score drift: is the stream still the one the threshold was calibrated on?

Light that changes, a nudged camera or another codec move the scores of good parts long before they cross the
threshold on every frame. Per camera the station keeps the scores of its recent frames outside events (a
window of ``drift.window`` frames) and compares their median with the calibration's good-part baseline, in units
of the calibration's spread σ. When the median stays more than ``drift.sigmas`` σ away for ``drift.sustain_s``
seconds of frame time the alarm is raised; it clears once the median has been back within the band for as long.
Frame time, as the event rule: a video file gives the same alarms on any machine.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

HEALTH_SCHEMA_VERSION = 2  # 2: spool_degraded and worker_failed alarms (edge/health.py)


@dataclass(frozen=True)
class DriftAlarm:
    """A raised drift alarm of one camera (the health topic's ``alarms`` item)."""

    camera: str
    since: float  # frame time the median first left the band
    median: float
    baseline: float
    sigma: float
    sigmas: float

    def payload(self, ts_iso: str) -> dict[str, Any]:
        away = (self.median - self.baseline) / self.sigma
        return {"kind": "score_drift", "camera": self.camera, "since": ts_iso, "median": round(self.median, 6),
                "baseline": round(self.baseline, 6), "sigma": round(self.sigma, 6), "sigmas_away": round(away, 2),
                "limit_sigmas": self.sigmas,
                "message": f"camera '{self.camera}': median score of good frames {self.median:.4g} is {away:+.1f} σ "
                           f"from the calibrated {self.baseline:.4g} (alarm beyond {self.sigmas:g} σ): light, "
                           "camera position or codec changed? Fix the scene, or re-run edge-run --calibrate N "
                           "on good parts"}


class DriftMonitor:
    """Recent scores of one camera's frames outside events, and its sustained-drift state machine."""

    def __init__(self, camera: str, baseline: float, sigma: Optional[float], sigmas: float, sustain_s: float,
                 window: int) -> None:
        self.camera = camera
        self.baseline = baseline
        self.sigma = sigma
        self.sigmas = sigmas
        self.sustain_s = sustain_s
        self.scores: deque[float] = deque(maxlen=window)
        self.alarm: Optional[DriftAlarm] = None
        self._since: Optional[float] = None  # frame time the median crossed the band edge (either way)
        self._median: Optional[float] = None

    @property
    def enabled(self) -> bool:
        """Without a spread of good scores (a bundle that recorded none, all-equal scores) there is no σ."""
        return self.sigma is not None and self.sigma > 0

    def feed(self, ts: float, score: float) -> bool:
        """One score of a frame outside events; True when the alarm was raised or cleared by it."""
        self.scores.append(float(score))
        if not self.enabled or len(self.scores) < (self.scores.maxlen or 1):
            return False
        assert self.sigma is not None
        median = float(np.median(np.fromiter(self.scores, np.float64, len(self.scores))))
        self._median = median
        drifting = abs(median - self.baseline) > self.sigmas * self.sigma
        if drifting == (self.alarm is not None):
            self._since = None  # the state holds: nothing pending
            if self.alarm is not None:
                self.alarm = DriftAlarm(self.camera, self.alarm.since, median, self.baseline, self.sigma, self.sigmas)
            return False
        if self._since is None:
            self._since = ts
        if ts - self._since < self.sustain_s:
            return False
        self.alarm = DriftAlarm(self.camera, self._since, median, self.baseline, self.sigma, self.sigmas) \
            if drifting else None
        self._since = None
        return True

    def stats(self) -> dict[str, Any]:
        """The stats topic's per-camera ``scores``: recent scores outside events, and whether the alarm is up."""
        p50: Optional[float] = None
        p99: Optional[float] = None
        if self.scores:
            arr = np.fromiter(self.scores, np.float64, len(self.scores))
            p50, p99 = (round(float(v), 6) for v in np.percentile(arr, [50, 99]))
        return {"p50": p50, "p99": p99, "frames": len(self.scores), "drift": self.alarm is not None}


def health_payload(station: str, ts_iso: str, alarms: list[dict[str, Any]]) -> dict[str, Any]:
    """The retained ``{prefix}/{station}/health`` message (core/schemas/health.schema.json)."""
    return {"schema": HEALTH_SCHEMA_VERSION, "station": station, "ts": ts_iso, "ok": not alarms, "alarms": alarms}
