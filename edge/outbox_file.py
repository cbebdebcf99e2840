"""The outbox's file and what it stores: the SQLite schema and how the file is opened, a record, the key a
receiver de-duplicates on, the snapshot's bytes, which SQLite errors mean a full or read-only disk, how an
unreadable file is moved aside and its seq salvaged, and the migration of the MQTT-topic spool of earlier
versions. edge/outbox.py holds the store itself: its bounds, its states and the deliveries.

SQLite, because it is the embedded store with the best-proven crash behaviour (atomic commits, tested
against power loss), ships with Python, and one file is easy to inspect (``sqlite3 STATION.spool.sqlite``).
WAL mode with ``synchronous=FULL``: a committed event survives a power cut, and the capture threads'
readers never block the writer. One file per station also holds the per-station ``seq`` (so it is
assigned and the event stored in one transaction: a crash can never send two events with one seq) and
the events that are open (so a restarted station can end them with reason ``restart``).

A spool of earlier versions (table ``outbox`` of MQTT topics) is migrated on open: each message becomes a
record whose kind and camera are read from its topic, so what it held is still sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("edge.outbox")

KINDS = ("event", "snapshot")
OUTCOMES = ("delivered", "refused", "skipped")
# what a full, read-only or vanished disk answers; anything else on open is a file SQLite cannot read (corrupt)
_STORAGE_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM",
                   "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_NOMEM")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    camera TEXT NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    record_id INTEGER NOT NULL,
    sink TEXT NOT NULL,
    outcome TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (record_id, sink)
);
CREATE TABLE IF NOT EXISTS open_events (event_id TEXT PRIMARY KEY, camera TEXT NOT NULL, payload TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Record:
    """One stored event or snapshot, as a sink receives it."""

    id: int
    kind: str
    camera: str
    key: str
    payload: bytes
    created: float


def is_storage_error(exc: sqlite3.Error) -> bool:
    """A full, read-only or missing disk (retry later), as opposed to a file SQLite cannot read."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(_STORAGE_ERRORS) or (not name and "disk" in str(exc))


def event_key(payload: dict[str, Any]) -> str:
    """What a receiver de-duplicates an event on: ``event_id:type:seq``."""
    return f"{payload['event_id']}:{payload['type']}:{payload['seq']}"


def encode_snapshot(jpeg: bytes, meta: Optional[dict[str, Any]]) -> bytes:
    """A snapshot record's payload: ``<JSON meta>\\0<JPEG>``, or the bare JPEG without meta (split_snapshot)."""
    return json.dumps(meta, separators=(",", ":")).encode() + b"\0" + jpeg if meta else jpeg


def split_snapshot(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """A snapshot record's (meta, JPEG): add_snapshot stores ``<JSON meta>\\0<JPEG>``; a record of an earlier
    version is the bare JPEG (meta ``{}``)."""
    if payload[:1] == b"{":
        head, sep, jpeg = payload.partition(b"\0")
        if sep:
            try:
                meta = json.loads(head)
            except ValueError:
                meta = None
            if isinstance(meta, dict):
                return meta, jpeg
    return {}, payload


def read_meta(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def placeholders(values: Sequence[str]) -> str:
    return ", ".join("?" for _ in values)


def migrate_topic_outbox(db: sqlite3.Connection, path: Path) -> None:
    """Turn the MQTT-topic ``outbox`` table of earlier versions into records (kind and camera from the topic
    ``{prefix}/{station}/{camera}/{kind}``), keeping ids, order and creation times, in one transaction."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone() is None:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        moved = 0
        for record_id, topic, payload, created in db.execute(
                "SELECT id, topic, payload, created FROM outbox ORDER BY id").fetchall():
            camera, kind = str(topic).rsplit("/", 2)[-2:]
            data = bytes(payload)
            key = f"legacy:{record_id}"
            if kind == "event":
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    key = event_key(json.loads(data))
            elif kind != "snapshot":
                continue  # nothing else was ever spooled
            db.execute("INSERT INTO records (id, kind, camera, key, payload, created, size) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (int(record_id), kind, camera, key, data, float(created), len(data)))
            moved += 1
        db.execute("DROP TABLE outbox")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    log.info("spool %s: moved %d unsent message(s) of an earlier version into the outbox", path.name, moved)


def connect(path: Path, wal_limit: int) -> sqlite3.Connection:
    """WAL mode with ``synchronous=FULL`` (a committed event survives a power cut; readers never block the
    writer); a checkpoint shrinks the WAL back to ``wal_limit`` bytes."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA journal_size_limit={wal_limit}")
    return db


def salvage_seq(path: Path) -> int:
    """The last seq of an unreadable file, when SQLite can still read that much of it."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
            return int(row[0]) if row else 0
        finally:
            db.close()
    except (sqlite3.Error, TypeError, ValueError):
        return 0


def move_aside(path: Path) -> Path:
    """Rename an unreadable file (and its -wal, -shm) to ``*.corrupt-<time>``, for a person to look at later."""
    moved = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            src.replace(Path(str(moved) + suffix))
    return moved
