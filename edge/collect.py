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
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional, Sequence, Union

import cv2

from core.errors import UserError
from core.events import EventDetector, Transition
from core.files import atomic_write_bytes, atomic_write_text
from core.payloads import iso_utc, payload_problem
from edge.config import CollectConfig, StationConfig
from edge.sources import Frame, lower_thread_priority

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("edge.collect")

KIND_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
VERDICTS = ("good", "defect")
WRITER_NICE = 10  # PNG encoding runs below inference and capture
_TIME_SLACK_S = 1e-6  # frame times are float sums (t0 + index / fps): "0.1 s later" must not miss by 1e-17


class LabelError(UserError):
    """A verdict that cannot be applied: unknown event, labelled already, a bad kind."""


def collect_root(cfg: StationConfig) -> Path:
    """The station's collection folder: ``collect.dir``, or ``<state_dir>/collect/<station>``."""
    return Path(cfg.collect.dir) if cfg.collect.dir else Path(cfg.state_dir) / "collect" / cfg.station


def frame_name(ts: float, camera: str, index: int) -> str:
    """``<UTC YYYYmmddTHHMMSS.fff>_<camera>_<frame index>``: sorts by time within a camera."""
    t = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return f"{t.strftime('%Y%m%dT%H%M%S')}.{t.microsecond // 1000:03d}_{camera}_{index}"


def check_event_id(event_id: str) -> str:
    """An event id as the station makes them (a lower-case uuid): it names a folder, so nothing else passes."""
    try:
        ok = str(uuid.UUID(event_id)) == event_id
    except ValueError:
        ok = False
    if not ok:
        raise LabelError(f"event id {event_id!r} is not an event id (a uuid such as the event_id of the "
                         "station's event messages)")
    return event_id


def check_verdict(verdict: str, kind: Optional[str]) -> str:
    """The folder a verdict sends an event to: ``good``, or the defect ``kind``."""
    if verdict not in VERDICTS:
        raise LabelError(f"verdict {verdict!r} must be good (a false alarm) or defect (with a kind)")
    if verdict == "good":
        if kind is not None:
            raise LabelError("a kind is given only with verdict defect (good means a false alarm)")
        return "good"
    if kind is None:
        raise LabelError("verdict defect needs a kind (the test/<kind> folder), e.g. scratch")
    if not KIND_RE.match(kind) or kind == "good":
        raise LabelError(f"defect kind {kind!r} must be 1-64 of a-z, 0-9, '_' or '-' and not 'good'")
    return kind


@dataclass(frozen=True)
class Shot:
    """One frame to keep, with what the station knew when it scored it."""

    frame: Frame
    score: float
    threshold: float
    model: str
    model_version: str
    peak: Optional[bool] = None  # events only: the event's peak frame


def sidecar(shot: Shot, station: str, kind: str, size: tuple[int, int], captured: bool,
            event_id: Optional[str] = None) -> dict[str, Any]:
    """The JSON written beside each image (README, "Collecting frames for retraining")."""
    f = shot.frame
    out: dict[str, Any] = {
        "station": station, "camera": f.camera, "frame": f.index, "time": iso_utc(f.ts),
        "score": round(shot.score, 6), "threshold": shot.threshold, "model": shot.model,
        "model_version": shot.model_version, "kind": kind, "size": [int(size[0]), int(size[1])],
        "resolution": "captured" if captured else "model input",
    }
    if event_id is not None:
        out["event_id"] = event_id
        out["peak"] = bool(shot.peak)
    return out


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


# -- the folder: lock, labels ------------------------------------------------------------------------------
class FolderLock:
    """``<root>/.lock``, held (flock) around every change to the folder, by the station and by ``edge-run label``."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"
        self._fh: Optional[IO[str]] = None

    def __enter__(self) -> FolderLock:
        if self._fh is None:
            self._fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (kept open for the next use)
        if fcntl is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if self._fh is not None and fcntl is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_labelled(root: Path, event_id: str) -> Optional[dict[str, Any]]:
    """A sidecar of ``event_id`` already under test/ (the event was labelled), else None."""
    test = root / "test"
    if not test.is_dir():
        return None
    for path in sorted(test.glob("*/*.json")):
        data = _read_json(path)
        if data is not None and data.get("event_id") == event_id:
            return {**data, "folder": path.parent.name}
    return None


@dataclass(frozen=True)
class LabelResult:
    event_id: str
    folder: Path
    frames: int
    bytes: int


def _move_event(root: Path, event_id: str, verdict: str, kind: Optional[str],
                now: Optional[float] = None) -> LabelResult:
    """Move the frames of ``events/<event_id>`` into test/good or test/<kind>, recording the verdict in each
    sidecar; the caller holds the folder lock. Each image is renamed before its new sidecar is written."""
    check_event_id(event_id)
    folder = check_verdict(verdict, kind)
    src = root / "events" / event_id
    if not src.is_dir():
        prior = find_labelled(root, event_id)
        if prior is not None:
            raise LabelError(f"event {event_id} is already labelled {prior.get('label')!r} "
                             f"(at {prior.get('labelled_at')}, in {root / 'test' / prior['folder']}); to change "
                             "the verdict, move its files by hand")
        raise LabelError(f"unknown event {event_id}: no collected frames in {root / 'events'} (an event is "
                         "collected when it ends, with collect.enabled true)")
    dest = root / "test" / folder
    dest.mkdir(parents=True, exist_ok=True)
    stamp = iso_utc(time.time() if now is None else now)
    frames = moved_bytes = 0
    for meta_path in sorted(src.glob("*.json")):
        data = _read_json(meta_path) or {}
        data.update(label=folder, labelled_at=stamp)
        image = meta_path.with_suffix(".png")
        if image.exists():
            moved_bytes += image.stat().st_size
            os.replace(image, dest / image.name)
            frames += 1
        text = json.dumps(data, indent=1) + "\n"
        atomic_write_text(dest / meta_path.name, text)
        moved_bytes += len(text.encode())
        meta_path.unlink()
    shutil.rmtree(src, ignore_errors=True)  # what is left: nothing, or an image whose sidecar was lost
    return LabelResult(event_id, dest, frames, moved_bytes)


def label_event(root: Path, event_id: str, verdict: str, kind: Optional[str] = None) -> LabelResult:
    """An operator's verdict (``edge-run label``): move the event's frames, under the folder lock."""
    lock = FolderLock(root)
    try:
        with lock:
            return _move_event(root, event_id, verdict, kind)
    finally:
        lock.close()


# -- the writer thread -------------------------------------------------------------------------------------
@dataclass
class NormalJob:
    shot: Shot


@dataclass
class EventJob:
    event_id: str
    shots: list[Shot]


@dataclass
class LabelJob:
    event_id: str
    verdict: str
    kind: Optional[str]


Job = Union[NormalJob, EventJob, LabelJob]


def encode_png(shot: Shot) -> tuple[bytes, tuple[int, int], bool]:
    """Lossless PNG of the frame at its captured resolution when the station kept it, else the model input."""
    f = shot.frame
    captured = f.packet is not None or f.original is not None
    image = f.snapshot_image()
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"PNG encoding failed for frame {f.index}")
    return buf.tobytes(), (int(image.shape[0]), int(image.shape[1])), captured


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class FrameWriter:
    """Writes collected frames and applies verdicts on its own thread, in the order they were handed over."""

    def __init__(self, root: Path, station: str, max_bytes: int, queue_frames: int, retry_s: float) -> None:
        self.root = root
        self.station = station
        self.max_bytes = max_bytes
        self.queue_frames = queue_frames
        self.retry_s = retry_s
        self.counts = {"normal_frames": 0, "event_frames": 0, "events": 0, "dropped": 0, "skipped": 0,
                       "rotated": 0, "labelled": 0, "labels_refused": 0, "errors": 0}
        self._jobs: deque[Job] = deque()
        self._queued_frames = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._paused_until = 0.0
        self._cause: Optional[str] = None  # the disk error last reported (each cause is said once)
        self._full_reported = False
        self._lock = FolderLock(root)
        self._normals: deque[tuple[Path, int]] = deque()  # (image path, bytes with its sidecar), oldest first
        self._events: OrderedDict[str, int] = OrderedDict()  # unlabelled event -> bytes, oldest first
        self._labelled_bytes = 0
        self.total_bytes = 0
        self._scanned = False  # what earlier runs left is counted before the first write
        self._thread = threading.Thread(target=self._run, name="collect-writer", daemon=True)

    # -- handing over (station threads; never blocks) --------------------------------------------------
    def submit(self, job: Job) -> bool:
        frames = 1 if isinstance(job, NormalJob) else len(job.shots) if isinstance(job, EventJob) else 0
        with self._cond:
            if self._stopping:
                if isinstance(job, LabelJob):
                    log.warning("collect: the station is stopping; label for event %s not applied (use edge-run "
                                "label)", job.event_id)
                return False
            if frames and time.monotonic() < self._paused_until:
                self.counts["skipped"] += frames
                return False
            if frames and self._queued_frames + frames > self.queue_frames:
                self.counts["dropped"] += frames
                return False
            self._jobs.append(job)
            self._queued_frames += frames
            self._cond.notify()
        return True

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float) -> None:
        """Write what was handed over (bounded by ``timeout``), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("collect: %d frame(s) still queued after %.0f s at stop; not written",
                        self._queued_frames, timeout)
        self._lock.close()

    # -- the thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        lower_thread_priority(WRITER_NICE)
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                if not self._scanned:
                    self.root.mkdir(parents=True, exist_ok=True)
                    with self._lock:
                        self._scan()
                    self._scanned = True
                with self._lock:
                    self._do(job)
            except OSError as exc:
                self._disk_error(exc, "writing")
            except Exception as exc:  # e.g. a frame OpenCV cannot encode: the writer never dies of it
                self._disk_error(exc, "writing")
            finally:
                with self._cond:
                    self._queued_frames -= 1 if isinstance(job, NormalJob) else \
                        len(job.shots) if isinstance(job, EventJob) else 0

    def _do(self, job: Job) -> None:
        if isinstance(job, LabelJob):
            self._label(job)
            return
        if time.monotonic() < self._paused_until:
            self.counts["skipped"] += 1 if isinstance(job, NormalJob) else len(job.shots)
            return
        if isinstance(job, NormalJob):
            self._write_normal(job.shot)
        else:
            self._write_event(job)
        if self._cause is not None:
            log.info("collect: writing to %s again", self.root)
            self._cause = None

    def _scan(self) -> None:
        """What an earlier run left: the size bound counts it; half-written temp files are removed."""
        self._normals.clear()
        self._events.clear()
        # folders are made when first needed: an empty test/ would stop `edge-train fit` ("no images")
        good = self.root / "train" / "good"
        for p in sorted(good.iterdir()) if good.is_dir() else []:
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
            elif p.suffix == ".png":
                meta = p.with_suffix(".json")
                self._normals.append((p, p.stat().st_size + (meta.stat().st_size if meta.exists() else 0)))
        events_dir = self.root / "events"
        events = [p for p in events_dir.iterdir() if p.is_dir()] if events_dir.is_dir() else []
        for p in sorted(events, key=lambda d: d.stat().st_mtime):
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
            else:
                self._events[p.name] = _folder_bytes(p)
        self._labelled_bytes = _folder_bytes(self.root / "test") if (self.root / "test").is_dir() else 0
        self.total_bytes = sum(b for _, b in self._normals) + sum(self._events.values()) + self._labelled_bytes

    def _make_room(self, need: int, for_event: bool) -> bool:
        """Delete the oldest normal frames (and, for an event, then the oldest unlabelled events) until ``need``
        more bytes fit under max_mb; False when they cannot (the rest is labelled frames)."""
        deletable = sum(b for _, b in self._normals) + (sum(self._events.values()) if for_event else 0)
        if self.total_bytes - deletable + need > self.max_bytes:
            if not self._full_reported:
                log.warning("collect: %s holds %.1f MB of frames it may not delete (labelled frames%s), over "
                            "collect.max_mb (%.1f MB) with the next frame; such frames are skipped until "
                            "labelled ones are moved out or max_mb is raised", self.root,
                            (self.total_bytes - deletable) / 2**20, "" if for_event else " and unlabelled events",
                            self.max_bytes / 2**20)
                self._full_reported = True
            return False
        while self.total_bytes + need > self.max_bytes:
            if self._normals:
                image, size = self._normals.popleft()
                image.with_suffix(".json").unlink(missing_ok=True)  # sidecar first: no sidecar without image
                image.unlink(missing_ok=True)
                self.total_bytes -= size
                self.counts["rotated"] += 1
            elif for_event and self._events:
                event_id, size = self._events.popitem(last=False)
                folder = self.root / "events" / event_id
                if folder.is_dir():
                    shutil.rmtree(folder)
                    self.total_bytes -= size
                    self.counts["rotated"] += 1
                else:  # labelled by `edge-run label` meanwhile: its bytes are labelled frames now
                    self._labelled_bytes += size
                    return self._make_room(need, for_event)
            else:
                return False
        self._full_reported = False
        return True

    def _write_normal(self, shot: Shot) -> None:
        png, size, captured = encode_png(shot)
        name = frame_name(shot.frame.ts, shot.frame.camera, shot.frame.index)
        text = json.dumps(sidecar(shot, self.station, "normal", size, captured), indent=1) + "\n"
        need = len(png) + len(text.encode())
        if not self._make_room(need, for_event=False):
            self.counts["skipped"] += 1
            return
        image = self.root / "train" / "good" / f"{name}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(image, png)
        atomic_write_text(image.with_suffix(".json"), text)
        self._normals.append((image, need))
        self.total_bytes += need
        self.counts["normal_frames"] += 1

    def _write_event(self, job: EventJob) -> None:
        """All frames of one event appear at once: written into a hidden folder, then renamed."""
        final = self.root / "events" / job.event_id
        files = []
        for shot in job.shots:
            png, size, captured = encode_png(shot)
            name = frame_name(shot.frame.ts, shot.frame.camera, shot.frame.index)
            meta = sidecar(shot, self.station, "event", size, captured, event_id=job.event_id)
            files.append((name, png, json.dumps(meta, indent=1) + "\n"))
        need = sum(len(png) + len(text.encode()) for _, png, text in files)
        if final.exists() or not self._make_room(need, for_event=True):
            self.counts["skipped"] += len(files)
            return
        tmp = self.root / "events" / f".{job.event_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, png, text in files:
            atomic_write_bytes(tmp / f"{name}.png", png)
            atomic_write_text(tmp / f"{name}.json", text)
        os.rename(tmp, final)
        self._events[job.event_id] = need
        self.total_bytes += need
        self.counts["event_frames"] += len(files)
        self.counts["events"] += 1

    def _label(self, job: LabelJob) -> None:
        try:
            result = _move_event(self.root, job.event_id, job.verdict, job.kind)
        except LabelError as exc:
            self.counts["labels_refused"] += 1
            log.warning("collect: cmd/label refused: %s", exc)
            return
        size = self._events.pop(job.event_id, None)
        if size is not None:
            self._labelled_bytes += size
        self.counts["labelled"] += 1
        log.info("collect: event %s labelled %s: %d frame(s) moved to %s", job.event_id,
                 job.kind or job.verdict, result.frames, result.folder)

    def _disk_error(self, exc: Exception, doing: str) -> None:
        """One line per cause; collection pauses for retry_s and is tried again."""
        self.counts["errors"] += 1
        cause = (exc.strerror if isinstance(exc, OSError) else None) or f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._paused_until = time.monotonic() + self.retry_s
        if cause != self._cause:
            self._cause = cause
            filename = getattr(exc, "filename", None)
            where = f" ({filename})" if filename else ""
            log.error("collect: error %s %s%s: %s; collection paused for %g s (collect.retry_s), the station "
                      "keeps running; check the disk and collect.dir", doing, self.root, where, cause, self.retry_s)


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
            message = json.loads(payload) if payload.strip() else None
            if not isinstance(message, dict):
                raise LabelError("the payload must be a JSON object {\"event_id\", \"verdict\", \"kind\"}")
            verdict, kind = message.get("verdict"), message.get("kind")
            if isinstance(verdict, str) and (kind is None or isinstance(kind, str)):
                check_verdict(verdict, kind)  # the friendlier line for the usual mistakes
            problem = payload_problem("label", message)
            if problem is not None:
                raise LabelError(problem)
        except (LabelError, ValueError, UnicodeDecodeError) as exc:
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

