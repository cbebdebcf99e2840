"""Frames a station keeps for retraining, laid out as the trainer reads them, and operators' verdicts on events.

``<root>`` is one station's ``collect.dir`` (default ``<state_dir>/collect/<station>``)::

    train/good/<name>.png + <name>.json     sampled normal frames (``edge-train fit --data <root>`` reads them)
    events/<event_id>/<name>.png + .json    an event's peak and the frames around it, not yet labelled
    test/good/<name>.png + .json            event frames an operator called a false alarm
    test/<kind>/<name>.png + .json          event frames an operator called defect <kind>

``<name>`` is ``<UTC YYYYmmddTHHMMSS.fff>_<camera>_<frame index>``; the JSON sidecar carries score, threshold,
time and model version. Every file is written atomically (temp + rename), the image before its sidecar, so a
reader that finds a sidecar finds its image.

Why a writer thread: PNG encoding and disk writes must never delay inference, so the station hands frames over
through a bounded queue; a full queue drops the collection frame (counted), never a scored one. A disk error is
logged once per cause and pauses collection for ``retry_s``; it never stops the station. Normal frames are taken
in frame time away from events: a candidate waits ``guard_s`` before it is kept and is discarded when an event
opens meanwhile, and none is taken for ``guard_s`` after an event ends. The folder is bounded by ``max_mb``:
the oldest normal frames go first, then (for a new event only) the oldest unlabelled events; labelled frames
are never deleted. One lock file (``<root>/.lock``) serialises the station's writer and ``edge-run label``.
"""


from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

from core.errors import UserError
from core.events import EventDetector, Transition
from core.payloads import PayloadRefused, parse_network_json, payload_problem, shown
from edge.config import CollectConfig, StationConfig
from edge.frame_writer import EventJob, FrameWriter, LabelJob, NormalJob, Shot
from edge.labels import LabelError, check_verdict
from edge.sources import Frame

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("edge.collect")

_TIME_SLACK_S = 1e-6  # frame times are float sums (t0 + index / fps): "0.1 s later" must not miss by 1e-17


def collect_root(cfg: StationConfig) -> Path:
    """The station's collection folder: ``collect.dir``, or ``<state_dir>/collect/<station>``."""
    return Path(cfg.collect.dir) if cfg.collect.dir else Path(cfg.state_dir) / "collect" / cfg.station



# -- which frames: pure logic in frame time ----------------------------------------------------------------
class CameraSampler:
    """Per camera: normal candidates held for ``guard_s`` (dropped when an event opens), and the frames around
    the open event's current peak (``event_frames``: the peak, then half before and half after)."""

    def __init__(self, normal_every_s: float, guard_s: float, event_frames: int, window_n: int) -> None:
        self.normal_every_s = normal_every_s
        self.guard_s = guard_s
        self.before = (event_frames - 1) // 2
        self.after = event_frames - 1 - self.before
        # the detector may name a peak up to n-1 frames back (the window that opened the event)
        self._recent: deque[Shot] = deque(maxlen=window_n + self.before + self.after + 1)
        self._pending: deque[Shot] = deque()
        self._last_sample_ts = -math.inf
        self._quiet_from = -math.inf
        self._event_id: Optional[str] = None
        self._peak: Optional[int] = None
        self._window: list[Shot] = []
        self._after_left = 0
        self.discarded = 0  # candidates discarded because an event opened within guard_s after them

    @property
    def pending(self) -> int:
        return len(self._pending)

    def on_frame(self, shot: Shot, event: Optional[tuple[str, int]]) -> list[Shot]:
        """Feed one scored frame; ``event`` = (event_id, peak frame) when it belongs to an open event.
        Returns the normal frames whose guard has passed (to be written)."""
        self._recent.append(shot)
        if event is not None:
            event_id, peak = event
            if event_id != self._event_id:
                self._event_id, self._peak, self._window = event_id, None, []
                self.discarded += len(self._pending)
                self._pending.clear()
            if peak != self._peak:
                self._centre_on(peak)
            elif self._after_left > 0 and shot.frame.index > peak:
                self._window.append(shot)
                self._after_left -= 1
            return []
        ts = shot.frame.ts + _TIME_SLACK_S
        if ts >= self._quiet_from and shot.score < shot.threshold and ts - self._last_sample_ts >= self.normal_every_s:
            self._pending.append(shot)
            self._last_sample_ts = shot.frame.ts
        ready = []
        while self._pending and self._pending[0].frame.ts + self.guard_s <= ts:
            ready.append(self._pending.popleft())
        return ready

    def _centre_on(self, peak: int) -> None:
        items = list(self._recent)
        pos = next((i for i in range(len(items) - 1, -1, -1) if items[i].frame.index == peak), len(items) - 1)
        lo, hi = max(0, pos - self.before), min(len(items), pos + self.after + 1)
        self._window = items[lo:hi]
        self._peak = peak
        self._after_left = self.after - (hi - pos - 1)

    def end_event(self, event_id: str, end_ts: float) -> list[Shot]:
        """The event ended: its frames (peak marked); no normal frame is taken for ``guard_s`` after ``end_ts``."""
        shots = [dataclasses.replace(s, peak=s.frame.index == self._peak) for s in self._window] \
            if event_id == self._event_id else []
        self._event_id, self._peak, self._window, self._after_left = None, None, [], 0
        self._quiet_from = end_ts + self.guard_s
        self._pending.clear()
        return shots



# -- what the station calls ------------------------------------------------------------------------------
class Collection:
    """The station's side: fed every scored frame and every event end; takes cmd/label messages."""

    def __init__(self, cfg: CollectConfig, root: Path, station: str, cameras: Sequence[str], window_n: int) -> None:
        self.cfg = cfg
        self.root = root
        self.writer = FrameWriter(root, station, int(cfg.max_mb * 2**20), cfg.queue_frames, cfg.retry_s)
        self.samplers = {c: CameraSampler(cfg.normal_every_s, cfg.guard_s, cfg.event_frames, window_n)
                         for c in cameras}
        self.model = ("", "", 0.0)  # (model, version, threshold) the next frames are scored with
        self._open: dict[str, str] = {}  # camera -> its open event
        self._held: dict[str, tuple[str, Optional[str]]] = {}  # verdicts on events still open
        self._lock = threading.Lock()
        self.messages_ignored = 0

    def describe(self) -> str:
        c = self.cfg
        return (f"collecting in {self.root} (a normal frame every {c.normal_every_s:g} s, {c.event_frames} an "
                f"event, {c.max_mb:g} MB)")

    def set_model(self, model: str, version: str, threshold: float) -> None:
        self.model = (model, version, float(threshold))

    def start(self) -> None:
        self.writer.start()

    def close(self, timeout: float = 30.0) -> None:
        self.writer.close(timeout)

    def on_frame(self, camera: str, frame: Frame, score: float, detector: EventDetector,
                 transitions: Sequence[Transition]) -> None:
        """After the detector saw the frame: a frame of an open event, or of the one that just ended, is an
        event frame; any other is a normal candidate."""
        event: Optional[tuple[str, int]] = None
        if detector.is_open and detector.event_id is not None:
            event = (detector.event_id, detector.peak_frame)
        else:
            event = next(((t.event_id, t.peak_frame) for t in transitions if t.type == "end"), None)
        if event is not None:
            with self._lock:
                self._open[camera] = event[0]
        model, version, threshold = self.model
        shot = Shot(frame, score, threshold, model, version)
        for ready in self.samplers[camera].on_frame(shot, event):
            self.writer.submit(NormalJob(ready))

    def on_event_end(self, camera: str, t: Transition) -> None:
        shots = self.samplers[camera].end_event(t.event_id, t.ts)
        with self._lock:
            self._open.pop(camera, None)
            held = self._held.pop(t.event_id, None)
        if shots:
            self.writer.submit(EventJob(t.event_id, shots))
        if held is not None:
            self.writer.submit(LabelJob(t.event_id, *held))

    def on_label_message(self, payload: bytes) -> None:
        """cmd/label (paho's network thread): checked, then applied by the writer in order; a verdict on an
        event still open waits for its end. A bad message is one log line and is ignored."""
        try:
            message = parse_network_json(payload) if payload.strip() else None
            if not isinstance(message, dict):
                raise LabelError("the payload must be a JSON object {\"event_id\", \"verdict\", \"kind\"}")
            verdict, kind = message.get("verdict"), message.get("kind")
            if isinstance(verdict, str) and (kind is None or isinstance(kind, str)):
                check_verdict(verdict, kind)  # the friendlier line for the usual mistakes
            problem = payload_problem("label", message)
            if problem is not None:
                raise LabelError(shown(problem, 200))
        except (LabelError, PayloadRefused) as exc:
            self.messages_ignored += 1
            log.warning("collect: ignored cmd/label message (%s)", exc)
            return
        event_id, verdict = str(message["event_id"]), str(message["verdict"])
        with self._lock:
            if event_id in self._open.values():
                self._held[event_id] = (verdict, kind)
                log.info("collect: label for event %s held until the event ends and its frames are written",
                         event_id)
                return
        self.writer.submit(LabelJob(event_id, verdict, kind))

    def stats(self) -> dict[str, Any]:
        """The stats topic's ``collect`` object."""
        counts = dict(self.writer.counts)
        counts["labels_refused"] += self.messages_ignored
        counts["discarded_near_events"] = sum(s.discarded for s in self.samplers.values())
        return {**counts, "paused": self.writer.paused, "mb": round(self.writer.total_bytes / 2**20, 3)}


def open_collection(cfg: StationConfig, window_n: int) -> Optional[Collection]:
    """The station's collection when ``collect.enabled``; its folder is created now (a path that cannot be is a
    one-line UserError at start, like state_dir)."""
    if not cfg.collect.enabled:
        return None
    root = collect_root(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise UserError(f"collect.dir {root}: cannot create or write it ({exc.strerror}); set collect.dir to a "
                        "writable folder or collect.enabled false") from None
    return Collection(cfg.collect, root, cfg.station, [c.id for c in cfg.cameras], window_n)

