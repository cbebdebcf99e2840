"""The station's durable outbox: every event and snapshot is on disk before paho sees it, and leaves only
on the broker's PUBACK (DESIGN.md, processing contract).

SQLite, because it is the embedded store with the best-proven crash behaviour (atomic commits, tested
against power loss), ships with Python, and one file is easy to inspect (``sqlite3 STATION.spool.sqlite``).
WAL mode with ``synchronous=FULL``: a committed event survives a power cut, and the capture threads'
readers never block the writer. One file per station also holds the per-station ``seq`` (so it is
assigned and the event stored in one transaction: a crash can never send two events with one seq) and
the events that are open (so a restarted station can end them with reason ``restart``).

Bounded by size and age: when a new message would exceed ``max_bytes`` or a message is older than
``max_age_s``, the oldest messages go first; every drop is counted (persistently) and logged.
A file SQLite cannot read is moved aside (``*.corrupt-<time>``) with one line, and a fresh one started; its
seq floor is salvaged when possible, otherwise taken from the clock (milliseconds since the epoch: far
above any seq a station can have reached one event at a time), so seq never goes back.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import UserError
from edge.state import StationLock, legacy_seq

log = logging.getLogger("edge.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS open_events (event_id TEXT PRIMARY KEY, camera TEXT NOT NULL, payload TEXT NOT NULL);
"""


@dataclass(frozen=True)
class SpooledMessage:
    id: int
    topic: str
    payload: bytes


class Spool:
    """One station's outbox, seq counter and open events; thread-safe (one connection under a lock)."""

    def __init__(self, path: str | Path, max_bytes: int, max_age_s: float,
                 lock: Optional[StationLock] = None) -> None:
        self.path = Path(path)
        self._station_lock = lock
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._db = self._open()
        self._bytes, self._depth = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM outbox").fetchone()
        self.dropped_this_run = 0
        self._last_drop_warning = 0.0
        self.expire()

    # -- opening ------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _open(self) -> sqlite3.Connection:
        seq_floor = 0
        try:
            db = self._connect()
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            db.executescript(_SCHEMA)
            return db
        except sqlite3.DatabaseError as exc:
            seq_floor = self._salvage_seq()
            moved = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.replace(Path(str(moved) + suffix))
            seq_floor = seq_floor or int(time.time() * 1000)
            log.error("spool %s is unreadable (%s); moved it to %s and started a fresh one (seq continues "
                      "from %d); the events in it were not sent", self.path, exc, moved.name, seq_floor)
        try:
            db = self._connect()
            db.executescript(_SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (seq_floor,))
            return db
        except sqlite3.Error as exc:
            raise UserError(f"spool {self.path}: cannot create it ({exc}); check state_dir's disk") from None

    def _salvage_seq(self) -> int:
        """The last seq of an unreadable spool, when SQLite can still read that much of it."""
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
                return int(row[0]) if row else 0
            finally:
                db.close()
        except (sqlite3.Error, TypeError, ValueError):
            return 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._station_lock is not None:
            self._station_lock.close()

    # -- counters -----------------------------------------------------------------------------------
    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def seq(self) -> int:
        """The last seq handed out (0 before the first event)."""
        with self._lock:
            return self._meta("seq")

    @property
    def dropped_total(self) -> int:
        """Messages dropped to keep the spool within its bounds, over the station's life."""
        with self._lock:
            return self._meta("dropped")

    def ensure_seq_at_least(self, value: int) -> None:
        """Carry a seq over from an older store (the JSON counter of earlier versions)."""
        with self._lock:
            if value > self._meta("seq"):
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (value,))

    @property
    def depth(self) -> int:
        with self._lock:
            return int(self._depth)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return int(self._bytes)

    # -- writing ------------------------------------------------------------------------------------
    def add_event(self, topic: str, camera: str, make_payload: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Assign the next seq, build the payload with it and store it (with the event's open state) in one
        transaction; returns the payload. Only then may it be published."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("seq") + 1
                payload = make_payload(seq)
                data = json.dumps(payload).encode()
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (seq,))
                if payload["type"] == "end":
                    self._db.execute("DELETE FROM open_events WHERE event_id = ?", (payload["event_id"],))
                else:
                    self._db.execute("INSERT OR REPLACE INTO open_events VALUES (?, ?, ?)",
                                     (payload["event_id"], camera, data.decode()))
                self._insert(topic, data)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._enforce_size_locked()
            return payload

    def add(self, topic: str, payload: bytes) -> None:
        """Store a message without a seq (a snapshot)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._insert(topic, payload)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._enforce_size_locked()

    def _insert(self, topic: str, data: bytes) -> None:
        size = len(data) + len(topic)
        self._db.execute("INSERT INTO outbox (topic, payload, created, size) VALUES (?, ?, ?, ?)",
                         (topic, data, time.time(), size))
        self._bytes += size
        self._depth += 1

    def open_events(self) -> list[tuple[str, dict[str, Any]]]:
        """(camera, last payload) of every event that was open when the previous run stopped."""
        with self._lock:
            rows = self._db.execute("SELECT camera, payload FROM open_events ORDER BY rowid").fetchall()
        return [(str(camera), json.loads(payload)) for camera, payload in rows]

    # -- sending ------------------------------------------------------------------------------------
    def pending(self, after_id: int, limit: int) -> list[SpooledMessage]:
        """Stored messages with id > ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (after_id, limit)).fetchall()
        return [SpooledMessage(int(i), str(t), bytes(p)) for i, t, p in rows]

    def ack(self, message_id: int) -> None:
        """The broker acknowledged it: delete it."""
        with self._lock:
            # no DELETE ... RETURNING: JetPack 5's SQLite (3.31) predates it
            row = self._db.execute("SELECT size FROM outbox WHERE id = ?", (message_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
                self._bytes -= int(row[0])
                self._depth -= 1

    # -- bounds -------------------------------------------------------------------------------------
    def expire(self) -> None:
        """Drop messages older than ``max_age_s`` (called now and then by the sender)."""
        with self._lock:
            self._expire_locked()

    def _expire_locked(self) -> None:
        cutoff = time.time() - self.max_age_s
        rows = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE created < ?",
                                (cutoff,)).fetchone()
        if rows[0]:
            self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,))
            self._count_drops(int(rows[0]), int(rows[1]), f"older than {self.max_age_s / 86400:g} days")

    def _enforce_size_locked(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        excess = self._bytes - self.max_bytes
        count = freed = last_id = 0
        while freed < excess:
            rows = self._db.execute("SELECT id, size FROM outbox WHERE id > ? ORDER BY id LIMIT 256",
                                    (last_id,)).fetchall()
            if not rows:
                break
            for message_id, size in rows:
                if freed >= excess:
                    break
                freed += int(size)
                count += 1
                last_id = int(message_id)
        self._db.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
        self._count_drops(count, freed, f"to stay within max_bytes {self.max_bytes}")

    def _count_drops(self, count: int, size: int, why: str) -> None:
        self._bytes -= size
        self._depth -= count
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self._meta("dropped") + count,))
        self.dropped_this_run += count
        now = time.monotonic()
        loud = now - self._last_drop_warning >= 60.0  # at most a line a minute while an outage lasts
        if loud:
            self._last_drop_warning = now
        (log.warning if loud else log.debug)(
            "spool %s: dropped the %d oldest unsent message(s), %s (%d dropped this run)",
            self.path.name, count, why, self.dropped_this_run)


def open_spool(state_dir: str | Path, station: str, max_bytes: int, max_age_s: float) -> Spool:
    """The station's spool in ``state_dir``, held by this process alone (StationLock) until closed; the seq of
    the JSON counter of earlier versions is carried over."""
    lock = StationLock(state_dir, station)
    try:
        spool = Spool(Path(state_dir) / f"{station}.spool.sqlite", max_bytes, max_age_s, lock)
    except BaseException:
        lock.close()
        raise
    spool.ensure_seq_at_least(legacy_seq(state_dir, station))
    return spool
