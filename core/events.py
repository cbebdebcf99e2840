"""The per-camera event rule: a pure state machine over (frame, ts, score), driven by frame time only.

Pure so it is testable without cameras and deterministic on video files: the same scores give the same
events however fast the machine is. Opening needs k of the last n frames at or above the threshold;
closing needs ``close_after`` consecutive frames below the close level (so a score hovering at the
threshold does not flap). The close level is ``baseline + hysteresis × (threshold − baseline)``, where the
baseline is the typical score of a good part from the bundle's calibration: raw anomaly scores do not start
at zero (a good part may score 20 against a threshold of 24), so "10 % below the threshold" must be measured
from where good parts are, or an event would never close. While open an ``update`` goes out at most every
``update_interval_s``; after the end no event opens for ``cooldown_s``. An event open for ``max_duration_s``
(when set) ends with reason ``max_duration``, so a camera staring at a stuck defect still reports it in bounded
pieces rather than one event that never ends.

Every ``end`` says why it ended (END_REASONS): ``cleared`` (the scores fell), ``shutdown`` (the station stopped),
``restart`` (the station died with the event open and ended it when it came back), ``max_duration``, or
``model_swap`` (a new bundle took over, with another threshold).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

EVENT_SCHEMA_VERSION = 2  # 2: `reason` on every end
END_REASONS = ("cleared", "shutdown", "restart", "max_duration", "model_swap")


@dataclass(frozen=True)
class EventRule:
    threshold: float
    k: int = 3
    n: int = 5
    close_after: int = 10
    hysteresis: float = 0.9
    update_interval_s: float = 5.0
    cooldown_s: float = 2.0
    baseline: float = 0.0  # typical score of a good part; the hysteresis band is measured from here
    max_duration_s: Optional[float] = None  # an event open this long (frame time) ends with reason max_duration

    @property
    def close_level(self) -> float:
        base = min(self.baseline, self.threshold)
        return base + self.hysteresis * (self.threshold - base)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"need 1 <= k <= n, got k={self.k}, n={self.n}")
        if self.close_after < 1:
            raise ValueError("close_after must be at least 1")
        if not 0.0 < self.hysteresis <= 1.0:
            raise ValueError("hysteresis must be in (0, 1]")
        if self.update_interval_s <= 0 or self.cooldown_s < 0:
            raise ValueError("update_interval_s must be > 0 and cooldown_s >= 0")
        if self.max_duration_s is not None and self.max_duration_s <= 0:
            raise ValueError("max_duration_s must be > 0 (or null: no limit)")


@dataclass(frozen=True)
class Transition:
    """What the detector decided at one frame; the pipeline turns it into an event message."""

    type: str  # "start" | "update" | "end"
    event_id: str
    frame: int
    ts: float
    score: float
    peak_score: float
    peak_frame: int
    reason: Optional[str] = None  # an end's reason (END_REASONS)


class EventDetector:
    """Event state of one camera."""

    def __init__(self, rule: EventRule, new_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> None:
        self.rule = rule
        self._new_id = new_id
        self._window: deque[tuple[int, float, bool]] = deque(maxlen=rule.n)  # (frame, score, hit)
        self.event_id: Optional[str] = None
        self.peak_score = 0.0
        self.peak_frame = -1
        self._below = 0
        self._last_msg_ts = 0.0
        self._start_ts = 0.0
        self._cooldown_until: Optional[float] = None
        self._last: Optional[tuple[int, float, float]] = None  # (frame, ts, score) of the last frame fed

    @property
    def is_open(self) -> bool:
        return self.event_id is not None

    def feed(self, frame: int, ts: float, score: float) -> list[Transition]:
        """Advance by one frame; returns the transitions it caused (zero or one)."""
        r = self.rule
        score = float(score)
        self._last = (frame, ts, score)
        if self.event_id is None:
            hit = score >= r.threshold
            self._window.append((frame, score, hit))
            if self._cooldown_until is not None and ts < self._cooldown_until:
                return []
            if sum(1 for _, _, h in self._window if h) < r.k:
                return []
            self.event_id = self._new_id()
            best = max((s, f) for f, s, h in self._window if h)
            self.peak_score, self.peak_frame = best[0], best[1]
            self._below = 0
            self._last_msg_ts = self._start_ts = ts
            return [self._transition("start", frame, ts, score)]
        if score > self.peak_score:
            self.peak_score, self.peak_frame = score, frame
        if score < r.close_level:
            self._below += 1
        else:
            self._below = 0
        if self._below >= r.close_after:
            return [self._end(frame, ts, score, "cleared")]
        if r.max_duration_s is not None and ts - self._start_ts >= r.max_duration_s:
            return [self._end(frame, ts, score, "max_duration")]
        if ts - self._last_msg_ts >= r.update_interval_s:
            self._last_msg_ts = ts
            return [self._transition("update", frame, ts, score)]
        return []

    def finish(self, reason: str = "shutdown") -> list[Transition]:
        """The stream ended or the station stops (or swaps its model): close an open event at the last frame
        seen, saying why."""
        if self.event_id is None or self._last is None:
            return []
        frame, ts, score = self._last
        return [self._end(frame, ts, score, reason)]

    def _end(self, frame: int, ts: float, score: float, reason: str) -> Transition:
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}")
        t = dataclasses.replace(self._transition("end", frame, ts, score), reason=reason)
        self.event_id = None
        self._window.clear()
        self._below = 0
        self._cooldown_until = ts + self.rule.cooldown_s
        return t

    def _transition(self, kind: str, frame: int, ts: float, score: float) -> Transition:
        assert self.event_id is not None
        return Transition(type=kind, event_id=self.event_id, frame=frame, ts=ts, score=score,
                          peak_score=self.peak_score, peak_frame=self.peak_frame)


def event_payload(t: Transition, *, seq: int, station: str, camera: str, ts_iso: str, threshold: float,
                  model: str, model_version: str, backend: str) -> dict[str, Any]:
    """The event message exactly as docs/mqtt.md's MQTT contract (and core/schemas/event.schema.json) say."""
    payload: dict[str, Any] = {
        "schema": EVENT_SCHEMA_VERSION,
        "event_id": t.event_id,
        "type": t.type,
        "station": station,
        "camera": camera,
        "seq": seq,
        "ts": ts_iso,
        "frame": t.frame,
        "score": round(t.score, 6),
        "peak_score": round(t.peak_score, 6),
        "threshold": threshold,
        "model": model,
        "model_version": model_version,
        "backend": backend,
    }
    if t.type == "end":
        payload["reason"] = t.reason
    return payload
