"""The collection's writer thread: PNG encoding and disk writes off the inference path, in the order frames were
handed over, within the folder's size budget; a disk error pauses collection, never the station.

The folder layout and the reasons are in edge/collect.py's docstring.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import cv2

from core.files import atomic_write_bytes, atomic_write_text
from core.payloads import iso_utc
from edge.labels import FolderLock, LabelError, move_event
from edge.sources import Frame, lower_thread_priority

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("edge.collect")

WRITER_NICE = 10  # PNG encoding runs below inference and capture


def frame_name(ts: float, camera: str, index: int) -> str:
    """``<UTC YYYYmmddTHHMMSS.fff>_<camera>_<frame index>``: sorts by time within a camera."""
    t = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return f"{t.strftime('%Y%m%dT%H%M%S')}.{t.microsecond // 1000:03d}_{camera}_{index}"


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
    """The JSON written beside each image (docs/station.md, "Collecting frames for retraining")."""
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
            result = move_event(self.root, job.event_id, job.verdict, job.kind)
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


