"""The station's durable outbox: every event and snapshot is on disk before any sink sees it, and leaves only
when every configured sink has acknowledged it (docs/DESIGN.md, processing contract).

A record is protocol-neutral: its kind (``event`` or ``snapshot``), camera, an idempotency key (``event_id:
type:seq`` for an event, ``event_id:snapshot`` for a snapshot), the payload bytes (an event's JSON, a snapshot's
JPEG), when it was stored and its size. How it travels (an MQTT topic, an HTTP POST) is each sink's business,
decided when it sends.

States of a record, per sink:

    stored ──▶ handed to the sink ──▶ settled by the sink ──▶ deleted (once EVERY configured sink has settled it)

- *stored*: committed to SQLite (``records``), with the event's seq and open state in the same transaction.
- *handed*: a sink's sender has it in flight (in the sink's memory only; a restart hands it again).
- *settled*: the sink recorded an outcome in ``deliveries(record_id, sink, outcome)``: ``delivered`` (the
  broker's PUBACK, an HTTP 2xx), ``refused`` (the receiver rejected it for good; counted as failed) or
  ``skipped`` (the sink does not carry that kind, e.g. a webhook without snapshots).
- *deleted*: when every sink named at open has a ``deliveries`` row for it. One sink's outage therefore never
  loses another's records and never blocks it: each sink walks the records it has not settled, oldest first.

SQLite, because it is the embedded store with the best-proven crash behaviour (atomic commits, tested
against power loss), ships with Python, and one file is easy to inspect (``sqlite3 STATION.spool.sqlite``).
WAL mode with ``synchronous=FULL``: a committed event survives a power cut, and the capture threads'
readers never block the writer. One file per station also holds the per-station ``seq`` (so it is
assigned and the event stored in one transaction: a crash can never send two events with one seq) and
the events that are open (so a restarted station can end them with reason ``restart``).

Bounded by size and age: when a new record would exceed ``max_bytes`` or a record is older than
``max_age_s``, the oldest records go first, whoever still waits for them; every drop is counted (persistently)
and logged. A file SQLite cannot read is moved aside (``*.corrupt-<time>``) with one line, and a fresh one
started; its seq floor is salvaged when possible, otherwise taken from the clock (milliseconds since the epoch:
far above any seq a station can have reached one event at a time), so seq never goes back.

A spool of earlier versions (table ``outbox`` of MQTT topics) is migrated on open: each message becomes a
record whose kind and camera are read from its topic, so what it held is still sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from core.errors import UserError
from edge.state import StationLock, legacy_seq

log = logging.getLogger("edge.outbox")

KINDS = ("event", "snapshot")
OUTCOMES = ("delivered", "refused", "skipped")
EXPIRE_EVERY_S = 60.0

_SCHEMA = """
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


def event_key(payload: dict[str, Any]) -> str:
    """What a receiver de-duplicates an event on: ``event_id:type:seq``."""
    return f"{payload['event_id']}:{payload['type']}:{payload['seq']}"


class Outbox:
    """One station's records, seq counter and open events, and which sink has settled what; thread-safe (one
    connection under a lock)."""

    def __init__(self, path: str | Path, sinks: Sequence[str], max_bytes: int, max_age_s: float,
                 lock: Optional[StationLock] = None) -> None:
        if not sinks:
            raise ValueError("an outbox needs at least one sink")
        self.path = Path(path)
        self.sinks = tuple(dict.fromkeys(sinks))
        self._station_lock = lock
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._db = self._open()
        self.dropped_this_run = 0
        self._last_drop_warning = 0.0
        self._next_expire = time.monotonic() + EXPIRE_EVERY_S
        with self._lock:
            self._delete_settled_locked()  # a sink removed from the config no longer holds records back
            self._recount_locked()
            self._expire_locked()

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
            _migrate_topic_outbox(db, self.path)
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
        """The last seq of an unreadable file, when SQLite can still read that much of it."""
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

    def _recount_locked(self) -> None:
        self._bytes, self._depth = self._db.execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records").fetchone()
        self._settled = {sink: 0 for sink in self.sinks}
        for sink, count in self._db.execute(
                "SELECT sink, COUNT(*) FROM deliveries JOIN records ON records.id = deliveries.record_id "
                "GROUP BY sink").fetchall():
            if sink in self._settled:
                self._settled[sink] = int(count)

    @property
    def seq(self) -> int:
        """The last seq handed out (0 before the first event)."""
        with self._lock:
            return self._meta("seq")

    @property
    def dropped_total(self) -> int:
        """Records dropped to keep the outbox within its bounds, over the station's life."""
        with self._lock:
            return self._meta("dropped")

    def ensure_seq_at_least(self, value: int) -> None:
        """Carry a seq over from an older store (the JSON counter of earlier versions)."""
        with self._lock:
            if value > self._meta("seq"):
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (value,))

    @property
    def depth(self) -> int:
        """Records stored and not yet settled by every sink (the stats' spool_depth)."""
        with self._lock:
            return int(self._depth)

    def waiting(self, sink: str) -> int:
        """Records ``sink`` has not settled yet (its share of the depth)."""
        with self._lock:
            return int(self._depth - self._settled[sink])

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return int(self._bytes)

    # -- writing ------------------------------------------------------------------------------------
    def add_event(self, camera: str, make_payload: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Assign the next seq, build the payload with it and store it (with the event's open state) in one
        transaction; returns the payload. Only then may a sink send it."""
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
                self._insert("event", camera, event_key(payload), data)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._enforce_size_locked()
            return payload

    def add_snapshot(self, camera: str, event_id: str, jpeg: bytes, meta: Optional[dict[str, Any]] = None) -> None:
        """Store the JPEG of an event's peak frame (no seq of its own), with ``meta`` (the peak's score, frame,
        ts: what lets an operator match the picture to its event) stored before it; see split_snapshot."""
        data = json.dumps(meta, separators=(",", ":")).encode() + b"\0" + jpeg if meta else jpeg
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._insert("snapshot", camera, f"{event_id}:snapshot", data)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._enforce_size_locked()

    def _insert(self, kind: str, camera: str, key: str, data: bytes) -> None:
        size = len(data)
        self._db.execute("INSERT INTO records (kind, camera, key, payload, created, size) VALUES (?, ?, ?, ?, ?, ?)",
                         (kind, camera, key, data, time.time(), size))
        self._bytes += size
        self._depth += 1

    def open_events(self) -> list[tuple[str, dict[str, Any]]]:
        """(camera, last payload) of every event that was open when the previous run stopped."""
        with self._lock:
            rows = self._db.execute("SELECT camera, payload FROM open_events ORDER BY rowid").fetchall()
        return [(str(camera), json.loads(payload)) for camera, payload in rows]

    # -- sending ------------------------------------------------------------------------------------
    def pending(self, sink: str, after_id: int, limit: int) -> list[Record]:
        """Records with id > ``after_id`` that ``sink`` has not settled, oldest first (drops the expired first,
        at most once a minute)."""
        with self._lock:
            if time.monotonic() >= self._next_expire:
                self._expire_locked()
            rows = self._db.execute(
                "SELECT id, kind, camera, key, payload, created FROM records WHERE id > ? AND NOT EXISTS "
                "(SELECT 1 FROM deliveries WHERE record_id = records.id AND sink = ?) ORDER BY id LIMIT ?",
                (after_id, sink, limit)).fetchall()
        return [Record(int(i), str(k), str(c), str(key), bytes(p), float(t)) for i, k, c, key, p, t in rows]

    def settle(self, record_id: int, sink: str, outcome: str = "delivered") -> None:
        """``sink`` is done with the record (``delivered``, ``refused`` or ``skipped``); the record is deleted
        once every sink is."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            exists = self._db.execute("SELECT size FROM records WHERE id = ?", (record_id,)).fetchone()
            if exists is None:
                return  # dropped by a bound meanwhile
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)",
                                       (record_id, sink, outcome, time.time()))
                fresh = cur.rowcount == 1
                settled_by = self._db.execute(
                    f"SELECT COUNT(*) FROM deliveries WHERE record_id = ? AND sink IN ({_marks(self.sinks)})",
                    (record_id, *self.sinks)).fetchone()[0]
                done = int(settled_by) >= len(self.sinks)
                if done:
                    # no DELETE ... RETURNING: JetPack 5's SQLite (3.31) predates it
                    self._db.execute("DELETE FROM records WHERE id = ?", (record_id,))
                    self._db.execute("DELETE FROM deliveries WHERE record_id = ?", (record_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if fresh and sink in self._settled:
                self._settled[sink] += 1
            if done:
                self._bytes -= int(exists[0])
                self._depth -= 1
                for name in self.sinks:
                    self._settled[name] -= 1

    def ack(self, record_id: int, sink: str) -> None:
        """``sink`` delivered the record (a PUBACK, an HTTP 2xx)."""
        self.settle(record_id, sink, "delivered")

    # -- bounds -------------------------------------------------------------------------------------
    def expire(self) -> None:
        """Drop records older than ``max_age_s``."""
        with self._lock:
            self._expire_locked()

    def _expire_locked(self) -> None:
        self._next_expire = time.monotonic() + EXPIRE_EVERY_S
        cutoff = time.time() - self.max_age_s
        count = self._db.execute("SELECT COUNT(*) FROM records WHERE created < ?", (cutoff,)).fetchone()[0]
        if count:
            self._db.execute("DELETE FROM deliveries WHERE record_id IN (SELECT id FROM records WHERE created < ?)",
                             (cutoff,))
            self._db.execute("DELETE FROM records WHERE created < ?", (cutoff,))
            self._count_drops(int(count), f"older than {self.max_age_s / 86400:g} days")

    def _enforce_size_locked(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        excess = self._bytes - self.max_bytes
        count = freed = last_id = 0
        while freed < excess:
            rows = self._db.execute("SELECT id, size FROM records WHERE id > ? ORDER BY id LIMIT 256",
                                    (last_id,)).fetchall()
            if not rows:
                break
            for record_id, size in rows:
                if freed >= excess:
                    break
                freed += int(size)
                count += 1
                last_id = int(record_id)
        self._db.execute("DELETE FROM deliveries WHERE record_id <= ?", (last_id,))
        self._db.execute("DELETE FROM records WHERE id <= ?", (last_id,))
        self._count_drops(count, f"to stay within max_bytes {self.max_bytes}")

    def _delete_settled_locked(self) -> None:
        """Records every configured sink has settled (left behind when a sink was removed from the config)."""
        done = (f"(SELECT record_id FROM deliveries WHERE sink IN ({_marks(self.sinks)}) GROUP BY record_id "
                "HAVING COUNT(*) >= ?)")
        args = (*self.sinks, len(self.sinks))
        self._db.execute(f"DELETE FROM records WHERE id IN {done}", args)
        self._db.execute("DELETE FROM deliveries WHERE record_id NOT IN (SELECT id FROM records)")

    def _count_drops(self, count: int, why: str) -> None:
        self._recount_locked()
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self._meta("dropped") + count,))
        self.dropped_this_run += count
        now = time.monotonic()
        loud = now - self._last_drop_warning >= 60.0  # at most a line a minute while an outage lasts
        if loud:
            self._last_drop_warning = now
        (log.warning if loud else log.debug)(
            "spool %s: dropped the %d oldest unsent record(s), %s (%d dropped this run)",
            self.path.name, count, why, self.dropped_this_run)


def _marks(values: Sequence[str]) -> str:
    return ", ".join("?" for _ in values)


def _migrate_topic_outbox(db: sqlite3.Connection, path: Path) -> None:
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


def open_outbox(state_dir: str | Path, station: str, sinks: Sequence[str], max_bytes: int,
                max_age_s: float) -> Outbox:
    """The station's outbox in ``state_dir`` (``<station>.spool.sqlite``, the name earlier versions gave their
    spool), held by this process alone (StationLock) until closed; the seq of the JSON counter of earlier
    versions is carried over."""
    lock = StationLock(state_dir, station)
    try:
        outbox = Outbox(Path(state_dir) / f"{station}.spool.sqlite", sinks, max_bytes, max_age_s, lock)
    except BaseException:
        lock.close()
        raise
    outbox.ensure_seq_at_least(legacy_seq(state_dir, station))
    return outbox


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
