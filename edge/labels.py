"""Operators' verdicts on collected events: an event's frames move from events/<event_id> to test/good (a
false alarm) or test/<kind> (a defect), under the folder lock that the station's frame writer also holds.

Used by ``edge-run label`` and by the writer thread when a cmd/label message arrives (edge/collect.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional

from core.errors import UserError
from core.files import atomic_write_text
from core.payloads import iso_utc, shown

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("edge.collect")

KIND_RE = re.compile(r"[a-z0-9_-]{1,64}")  # fullmatch: "$" alone would let "scratch\n" through
VERDICTS = ("good", "defect")


class LabelError(UserError):
    """A verdict that cannot be applied: unknown event, labelled already, a bad kind."""



def check_event_id(event_id: str) -> str:
    """An event id as the station makes them (a lower-case uuid): it names a folder, so nothing else passes."""
    try:
        ok = str(uuid.UUID(event_id)) == event_id
    except ValueError:
        ok = False
    if not ok:
        raise LabelError(f"event id {shown(event_id)} is not an event id (a uuid such as the event_id of the "
                         "station's event messages)")
    return event_id


def check_verdict(verdict: str, kind: Optional[str]) -> str:
    """The folder a verdict sends an event to: ``good``, or the defect ``kind``."""
    if verdict not in VERDICTS:
        raise LabelError(f"verdict {shown(verdict)} must be good (a false alarm) or defect (with a kind)")
    if verdict == "good":
        if kind is not None:
            raise LabelError("a kind is given only with verdict defect (good means a false alarm)")
        return "good"
    if kind is None:
        raise LabelError("verdict defect needs a kind (the test/<kind> folder), e.g. scratch")
    if not KIND_RE.fullmatch(kind) or kind == "good":
        raise LabelError(f"defect kind {shown(kind)} must be 1-64 of a-z, 0-9, '_' or '-' and not 'good'")
    return kind



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


def move_event(root: Path, event_id: str, verdict: str, kind: Optional[str],
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
            return move_event(root, event_id, verdict, kind)
    finally:
        lock.close()


