"""The station's durable outbox: every event and snapshot is on disk before any sink sees it, and leaves only
when every configured sink has acknowledged it (docs/DESIGN.md, processing contract). Its file, the records
and their format are edge/outbox_file.py's.

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

Bounded by size and age: when a new record would exceed ``max_bytes`` or a record is older than
``max_age_s``, the oldest records go first, whoever still waits for them; every drop is counted (persistently)
and logged. A file SQLite cannot read is moved aside (``*.corrupt-<time>``) with one line, and a fresh one
started; its seq floor is salvaged when possible, otherwise taken from the clock (milliseconds since the epoch:
far above any seq a station can have reached one event at a time), so seq never goes back.

A full or read-only disk is a state, not a crash (``state`` ``degraded``, ``problem`` says why): a record that
cannot be stored is held in a bounded memory queue that the sinks read after the stored records (ids stay one
rising sequence), counted in ``not_kept``; settlements that cannot be written are held too, so no sink is
handed a record twice. No call raises into its caller (the station loop, paho's network thread, the webhook's
thread) for a storage failure. The store is retried with back-off (1 s doubling to 30 s); when it succeeds, what
memory still holds (records some sink still waits for, settlements, open events, seq, drops) is written in one
transaction and the state is ``ok`` again. A restart while degraded loses what was only in memory; a spool that
cannot be written at start continues seq from the clock, so seq still never goes back.

``max_bytes`` bounds the payloads plus the WAL and shared-memory files (measured after each write): the WAL is
checkpointed (truncated) when it passes an eighth of the budget or the budget is exceeded, before anything is
dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from core.errors import UserError
from edge.outbox_file import (
    OUTCOMES,
    SCHEMA,
    Record,
    connect,
    encode_snapshot,
    event_key,
    is_storage_error,
    migrate_topic_outbox,
    move_aside,
    placeholders,
    read_meta,
    salvage_seq,
)
from edge.state import StationLock, legacy_seq

log = logging.getLogger("edge.outbox")

EXPIRE_EVERY_S = 60.0
RETRY_MIN_S = 1.0  # a failed store is retried after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
MEMORY_RECORDS = 2000  # records held in memory while the spool cannot store them (bytes: max_bytes, at most 64 MB)
MEMORY_BYTES = 64 * 2**20
WAL_MIN_BYTES = 64 * 2**10  # the WAL is checkpointed when it passes max(this, max_bytes / 8)
@dataclass
class _Held:
    """A record the spool could not store, and the sinks that have settled it so far."""

    record: Record
    settled: dict[str, str] = field(default_factory=dict)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Outbox:
    """One station's records, seq counter and open events, and which sink has settled what; thread-safe (one
    connection under a lock). ``state`` is ``ok`` or ``degraded`` (the disk refuses writes; ``problem`` says
    why): see the module docstring."""

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
        self.dropped_this_run = 0
        self._last_drop_warning = 0.0
        self._next_expire = time.monotonic() + EXPIRE_EVERY_S
        self.state = "ok"
        self.problem: Optional[str] = None  # why the spool is degraded (the disk's answer)
        self.degraded_since: Optional[float] = None  # wall clock
        self.not_kept = 0  # records of this run that could not be stored when made (sent from memory)
        self._held: dict[int, _Held] = {}  # id -> record not stored, in id order
        self._held_bytes = 0
        self._late_settles: dict[int, dict[str, str]] = {}  # stored record id -> {sink: outcome} not yet written
        self._open_changes: dict[str, Optional[tuple[str, str]]] = {}  # event_id -> (camera, payload) / None: ended
        self._unwritten_drops = 0  # drops not yet added to the stored counter
        self._retry_s = RETRY_MIN_S
        self._next_retry = 0.0
        self._files_bytes = 0  # WAL + shared memory, at the last write
        self._bytes = self._depth = 0
        self._settled = {sink: 0 for sink in self.sinks}
        self._seq = 0
        self._next_id = 1
        self._conn: Optional[sqlite3.Connection] = self._open()
        with self._lock:
            try:
                if self.state == "ok":
                    self._delete_settled_locked()  # a sink removed from the config no longer holds records back
                self._recount_locked()
                if self.state == "ok":
                    self._expire_locked()
            except sqlite3.Error as exc:
                self._degrade_locked(exc)

    @property
    def _db(self) -> sqlite3.Connection:
        """The open connection (callers that may run without one check ``_conn`` first)."""
        if self._conn is None:
            raise sqlite3.OperationalError(f"spool {self.path} is not open ({self.problem})")
        return self._conn

    # -- opening ------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, self._wal_limit)

    @property
    def _wal_limit(self) -> int:
        return max(WAL_MIN_BYTES, self.max_bytes // 8)

    def _open(self) -> Optional[sqlite3.Connection]:
        """The connection, or None when the disk refuses even that (the outbox starts degraded)."""
        seq_floor = 0
        try:
            db = self._connect()
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            db.executescript(SCHEMA)
            migrate_topic_outbox(db, self.path)
            return self._started(db)
        except sqlite3.DatabaseError as exc:
            if is_storage_error(exc):
                self._start_degraded(exc)
                return None
            seq_floor = salvage_seq(self.path)
            moved = move_aside(self.path)
            seq_floor = seq_floor or int(time.time() * 1000)
            log.error("spool %s is unreadable (%s); moved it to %s and started a fresh one (seq continues "
                      "from %d); the events in it were not sent", self.path, exc, moved.name, seq_floor)
        try:
            db = self._connect()
            db.executescript(SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (seq_floor,))
            return self._started(db)
        except sqlite3.Error as exc:
            if is_storage_error(exc) and self.path.parent.is_dir():
                self._start_degraded(exc)
                return None
            raise UserError(f"spool {self.path}: cannot create it ({exc}); check state_dir's disk") from None

    def _started(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """Read seq and the next record id, and prove the file can be written (a degraded start otherwise)."""
        self._seq = read_meta(db, "seq")
        row = db.execute("SELECT MAX(seq) FROM sqlite_sequence WHERE name = 'records'").fetchone()
        top = db.execute("SELECT MAX(id) FROM records").fetchone()
        self._next_id = max(int(row[0] or 0) if row else 0, int(top[0] or 0)) + 1
        try:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (int(time.time()),))
        except sqlite3.Error as exc:
            if not is_storage_error(exc):
                raise
            self._start_degraded(exc)
        return db

    def _start_degraded(self, exc: sqlite3.Error) -> None:
        """The disk refuses writes at start: what the last run sent from memory may carry seqs above the stored
        one, so seq and record ids continue from the clock (ms since the epoch: above anything handed out)."""
        floor = int(time.time() * 1000)
        self._seq = max(self._seq, salvage_seq(self.path), floor)
        self._next_id = max(self._next_id, floor)
        with self._lock:
            self._degrade_locked(exc)

    def close(self) -> None:
        with self._lock:
            if self.state != "ok":
                self._recover_locked()  # the disk may be back: keep what memory holds
            if self._held:
                log.warning("spool %s: %d record(s) could not be stored (%s) and are not sent after a restart",
                            self.path.name, len(self._held), self.problem)
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._conn = None
        if self._station_lock is not None:
            self._station_lock.close()

    # -- the degraded state ----------------------------------------------------------------------
    def _degrade_locked(self, exc: BaseException) -> None:
        """A write failed: go on from memory, say so once, retry with back-off."""
        why = str(exc) or type(exc).__name__
        if self.state == "ok":
            self.state, self.problem, self.degraded_since = "degraded", why, time.time()
            self._retry_s = RETRY_MIN_S
            log.error("spool %s: cannot store (%s); scoring and sending go on, records are held in memory (not "
                      "kept across a restart) and the spool is retried every %g-%g s; free space in the state_dir",
                      self.path, why, RETRY_MIN_S, RETRY_MAX_S)
        else:
            self.problem = why
            self._retry_s = min(self._retry_s * 2.0, RETRY_MAX_S)
        self._next_retry = time.monotonic() + self._retry_s

    def _retry_if_due_locked(self) -> None:
        if self.state != "ok" and time.monotonic() >= self._next_retry:
            self._recover_locked()

    def _transaction(self, work: Callable[[sqlite3.Connection], object]) -> bool:
        """Run ``work`` in one write transaction; False (and degraded) when the disk refused it. Anything but a
        storage failure is rolled back and raised."""
        db = self._conn
        if db is None:
            try:
                db = self._conn = self._connect()
                db.executescript(SCHEMA)
            except sqlite3.Error as exc:
                self._conn = None
                self._degrade_locked(exc)
                return False
        try:
            db.execute("BEGIN IMMEDIATE")
            work(db)
            db.execute("COMMIT")
            return True
        except sqlite3.Error as exc:
            self._rollback_quietly(db)
            self._degrade_locked(exc)
            return False
        except BaseException:
            self._rollback_quietly(db)
            raise

    @staticmethod
    def _rollback_quietly(db: sqlite3.Connection) -> None:
        """SQLite may already have rolled back (a full disk during COMMIT); a ROLLBACK then fails: not news."""
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def _recover_locked(self) -> None:
        """Write what memory holds (seq, open events, records some sink still waits for, settlements, drops) in
        one transaction; state ``ok`` again when it commits."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (max(self._seq, read_meta(db, "seq")),))
            for event_id, change in self._open_changes.items():
                if change is None:
                    db.execute("DELETE FROM open_events WHERE event_id = ?", (event_id,))
                else:
                    db.execute("INSERT OR REPLACE INTO open_events VALUES (?, ?, ?)", (event_id, *change))
            for held in self._held.values():
                r = held.record
                db.execute("INSERT INTO records (id, kind, camera, key, payload, created, size) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (r.id, r.kind, r.camera, r.key, r.payload, r.created,
                                                           len(r.payload)))
                for sink, outcome in held.settled.items():
                    db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)", (r.id, sink, outcome,
                                                                                         time.time()))
            for record_id, settles in self._late_settles.items():
                for sink, outcome in settles.items():
                    db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)", (record_id, sink, outcome,
                                                                                         time.time()))
            self._delete_settled_locked(db)
            if self._unwritten_drops:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)",
                           (read_meta(db, "dropped") + self._unwritten_drops,))

        if self._conn is not None:  # a WAL that filled the disk itself is reused from its start after this
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if not self._transaction(work):
            return
        moved, since = len(self._held), self.degraded_since
        self._held.clear()
        self._held_bytes = 0
        self._late_settles.clear()
        self._open_changes.clear()
        self._unwritten_drops = 0
        self.state, self.problem, self.degraded_since = "ok", None, None
        with contextlib.suppress(sqlite3.Error):
            self._recount_locked()
        log.info("spool %s: storing again after %.0f s; %d record(s) held in memory written to it; %d record(s) "
                 "of this run were sent without being kept", self.path.name, time.time() - (since or time.time()),
                 moved, self.not_kept)
        self._after_write_locked()

    def _hold_locked(self, record: Record) -> None:
        """Keep a record the spool could not store, for the sinks to read from memory (bounded: the oldest
        go first, counted as drops)."""
        self._held[record.id] = _Held(record)
        self._held_bytes += len(record.payload)
        self.not_kept += 1
        limit = min(MEMORY_BYTES, self.max_bytes)
        count = 0
        while len(self._held) > 1 and (len(self._held) > MEMORY_RECORDS or self._held_bytes > limit):
            oldest = self._held.pop(next(iter(self._held)))
            self._held_bytes -= len(oldest.record.payload)
            count += 1
        if count:
            self._unwritten_drops += count
            self._note_drops(count, "held in memory beyond its bound while the spool cannot store")

    def health(self) -> dict[str, Any]:
        """``state``, ``problem``, ``since`` (wall clock), ``not_kept`` and ``held`` (records in memory now)."""
        with self._lock:
            return {"state": self.state, "problem": self.problem, "since": self.degraded_since,
                    "not_kept": self.not_kept, "held": len(self._held)}

    # -- counters -----------------------------------------------------------------------------------
    def _meta(self, key: str) -> int:
        return read_meta(self._db, key) if self._conn is not None else 0

    def _recount_locked(self) -> None:
        if self._conn is None:
            return
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
            return self._seq

    @property
    def dropped_total(self) -> int:
        """Records dropped to keep the outbox within its bounds, over the station's life."""
        with self._lock:
            try:
                return self._meta("dropped") + self._unwritten_drops
            except sqlite3.Error:
                return self.dropped_this_run

    def ensure_seq_at_least(self, value: int) -> None:
        """Carry a seq over from an older store (the JSON counter of earlier versions)."""
        with self._lock:
            if value > self._seq:
                self._seq = value
                self._transaction(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (value,)))

    @property
    def depth(self) -> int:
        """Records not yet settled by every sink, stored or held in memory (the stats' spool_depth)."""
        with self._lock:
            return int(self._depth) + len(self._held)

    def waiting(self, sink: str) -> int:
        """Records ``sink`` has not settled yet (its share of the depth)."""
        with self._lock:
            late = sum(1 for settles in self._late_settles.values() if sink in settles)
            held = sum(1 for h in self._held.values() if sink not in h.settled)
            return max(0, int(self._depth - self._settled[sink]) - late) + held

    @property
    def size_bytes(self) -> int:
        """Payload bytes stored (the WAL and shared-memory files come on top: ``disk_bytes``)."""
        with self._lock:
            return int(self._bytes)

    @property
    def disk_bytes(self) -> int:
        """What counts toward ``max_bytes``: payloads plus the WAL and shared-memory files at the last write."""
        with self._lock:
            return int(self._bytes) + self._files_bytes

    # -- writing ------------------------------------------------------------------------------------
    def add_event(self, camera: str, make_payload: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Assign the next seq, build the payload with it and store it (with the event's open state) in one
        transaction; returns the payload. Only then may a sink send it. When the disk refuses the write the
        payload is still returned and handed to the sinks from memory (``state`` degraded)."""
        with self._lock:
            self._retry_if_due_locked()
            seq = self._seq + 1
            payload = make_payload(seq)
            data = json.dumps(payload).encode()
            record = Record(self._next_id, "event", camera, event_key(payload), data, time.time())
            change = None if payload["type"] == "end" else (camera, data.decode())

            def work(db: sqlite3.Connection) -> None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (seq,))
                if change is None:
                    db.execute("DELETE FROM open_events WHERE event_id = ?", (payload["event_id"],))
                else:
                    db.execute("INSERT OR REPLACE INTO open_events VALUES (?, ?, ?)", (payload["event_id"], *change))
                self._write_record(db, record)

            stored = self.state == "ok" and self._transaction(work)
            self._seq, self._next_id = seq, record.id + 1
            if stored:
                self._bytes += len(data)
                self._depth += 1
                self._after_write_locked()
            else:
                self._open_changes[payload["event_id"]] = change
                self._hold_locked(record)
            return payload

    def add_snapshot(self, camera: str, event_id: str, jpeg: bytes, meta: Optional[dict[str, Any]] = None) -> None:
        """Store the JPEG of an event's peak frame (no seq of its own), with ``meta`` (the peak's score, frame,
        ts: what lets an operator match the picture to its event); held in memory when the disk refuses."""
        self._store_record("snapshot", camera, f"{event_id}:snapshot", encode_snapshot(jpeg, meta))

    def _store_record(self, kind: str, camera: str, key: str, data: bytes) -> None:
        """Store one record in a transaction of its own, or hold it in memory when the disk refuses (for
        records without a seq, e.g. snapshots)."""
        with self._lock:
            self._retry_if_due_locked()
            record = Record(self._next_id, kind, camera, key, data, time.time())
            stored = self.state == "ok" and self._transaction(lambda db: self._write_record(db, record))
            self._next_id = record.id + 1
            if stored:
                self._bytes += len(data)
                self._depth += 1
                self._after_write_locked()
            else:
                self._hold_locked(record)

    @staticmethod
    def _write_record(db: sqlite3.Connection, r: Record) -> None:
        db.execute("INSERT INTO records (id, kind, camera, key, payload, created, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (r.id, r.kind, r.camera, r.key, r.payload, r.created, len(r.payload)))

    def open_events(self) -> list[tuple[str, dict[str, Any]]]:
        """(camera, last payload) of every event that was open when the previous run stopped."""
        with self._lock:
            rows: list[tuple[str, str]] = []
            if self._conn is not None:
                try:
                    rows = self._db.execute("SELECT camera, payload FROM open_events ORDER BY rowid").fetchall()
                except sqlite3.Error as exc:
                    self._degrade_locked(exc)
            opened = {json.loads(payload)["event_id"]: (str(camera), payload) for camera, payload in rows}
            for event_id, change in self._open_changes.items():
                if change is None:
                    opened.pop(event_id, None)
                else:
                    opened[event_id] = change
        return [(camera, json.loads(payload)) for camera, payload in opened.values()]

    # -- sending ------------------------------------------------------------------------------------
    def pending(self, sink: str, after_id: int, limit: int) -> list[Record]:
        """Records with id > ``after_id`` that ``sink`` has not settled, oldest first: the stored ones and those
        held in memory (drops the expired first, at most once a minute; retries a degraded spool when due)."""
        with self._lock:
            self._retry_if_due_locked()
            late = {rid for rid, settles in self._late_settles.items() if sink in settles}
            rows: list[tuple[Any, ...]] = []
            if self._conn is not None:
                try:
                    if self.state == "ok" and time.monotonic() >= self._next_expire:
                        self._expire_locked()
                    rows = self._db.execute(
                        "SELECT id, kind, camera, key, payload, created FROM records WHERE id > ? AND NOT EXISTS "
                        "(SELECT 1 FROM deliveries WHERE record_id = records.id AND sink = ?) ORDER BY id LIMIT ?",
                        (after_id, sink, limit + len(late))).fetchall()
                except sqlite3.Error as exc:
                    self._degrade_locked(exc)
            found = [Record(int(i), str(k), str(c), str(key), bytes(p), float(t))
                     for i, k, c, key, p, t in rows if int(i) not in late]
            found += [h.record for rid, h in self._held.items() if rid > after_id and sink not in h.settled]
        found.sort(key=lambda r: r.id)
        return found[:limit]

    def settle(self, record_id: int, sink: str, outcome: str = "delivered") -> None:
        """``sink`` is done with the record (``delivered``, ``refused`` or ``skipped``); the record is deleted
        once every sink is. Never raises for a storage failure (it runs on the sinks' threads, paho's network
        thread among them): the settlement is then held in memory and written when the spool recovers."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            held = self._held.get(record_id)
            if held is not None:
                held.settled[sink] = outcome
                if all(name in held.settled for name in self.sinks):
                    del self._held[record_id]
                    self._held_bytes -= len(held.record.payload)
                return
            if self.state != "ok" or self._conn is None:
                self._late_settles.setdefault(record_id, {})[sink] = outcome
                return
            try:
                exists = self._db.execute("SELECT size FROM records WHERE id = ?", (record_id,)).fetchone()
            except sqlite3.Error as exc:
                self._degrade_locked(exc)
                self._late_settles.setdefault(record_id, {})[sink] = outcome
                return
            if exists is None:
                return  # dropped by a bound meanwhile
            result: dict[str, bool] = {}

            def work(db: sqlite3.Connection) -> None:
                cur = db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)",
                                 (record_id, sink, outcome, time.time()))
                result["fresh"] = cur.rowcount == 1
                settled_by = db.execute(
                    f"SELECT COUNT(*) FROM deliveries WHERE record_id = ? AND sink IN ({placeholders(self.sinks)})",
                    (record_id, *self.sinks)).fetchone()[0]
                result["done"] = int(settled_by) >= len(self.sinks)
                if result["done"]:
                    # no DELETE ... RETURNING: JetPack 5's SQLite (3.31) predates it
                    db.execute("DELETE FROM records WHERE id = ?", (record_id,))
                    db.execute("DELETE FROM deliveries WHERE record_id = ?", (record_id,))

            if not self._transaction(work):
                self._late_settles.setdefault(record_id, {})[sink] = outcome
                return
            if result["fresh"] and sink in self._settled:
                self._settled[sink] += 1
            if result["done"]:
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
            try:
                self._expire_locked()
            except sqlite3.Error as exc:
                self._degrade_locked(exc)

    def _expire_locked(self) -> None:
        self._next_expire = time.monotonic() + EXPIRE_EVERY_S
        if self._conn is None:
            return
        cutoff = time.time() - self.max_age_s
        count = self._db.execute("SELECT COUNT(*) FROM records WHERE created < ?", (cutoff,)).fetchone()[0]
        if count:
            self._db.execute("DELETE FROM deliveries WHERE record_id IN (SELECT id FROM records WHERE created < ?)",
                             (cutoff,))
            self._db.execute("DELETE FROM records WHERE created < ?", (cutoff,))
            self._count_drops(int(count), f"older than {self.max_age_s / 86400:g} days")

    def _after_write_locked(self) -> None:
        """Measure the WAL and shared-memory files, checkpoint the WAL when it grew or the budget is exceeded,
        then drop the oldest records if payloads plus files still exceed ``max_bytes``."""
        wal, shm = Path(f"{self.path}-wal"), Path(f"{self.path}-shm")
        files = _file_size(wal) + _file_size(shm)
        if self._conn is not None and (_file_size(wal) > self._wal_limit or self._bytes + files > self.max_bytes):
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            files = _file_size(wal) + _file_size(shm)
        self._files_bytes = files
        try:
            self._enforce_size_locked()
        except sqlite3.Error as exc:
            self._degrade_locked(exc)

    def _enforce_size_locked(self) -> None:
        if self._conn is None or self._bytes + self._files_bytes <= self.max_bytes:
            return
        excess = self._bytes + self._files_bytes - self.max_bytes
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
        if not count:
            return
        self._db.execute("DELETE FROM deliveries WHERE record_id <= ?", (last_id,))
        self._db.execute("DELETE FROM records WHERE id <= ?", (last_id,))
        self._count_drops(count, f"to stay within max_bytes {self.max_bytes} (WAL and shared memory included)")

    def _delete_settled_locked(self, db: Optional[sqlite3.Connection] = None) -> None:
        """Records every configured sink has settled (left behind when a sink was removed from the config)."""
        db = db or self._db
        assert db is not None
        done = (f"(SELECT record_id FROM deliveries WHERE sink IN ({placeholders(self.sinks)}) GROUP BY record_id "
                "HAVING COUNT(*) >= ?)")
        args = (*self.sinks, len(self.sinks))
        db.execute(f"DELETE FROM records WHERE id IN {done}", args)
        db.execute("DELETE FROM deliveries WHERE record_id NOT IN (SELECT id FROM records)")

    def _count_drops(self, count: int, why: str) -> None:
        self._recount_locked()
        self._db_drops(count)
        self._note_drops(count, why)

    def _db_drops(self, count: int) -> None:
        if not self._transaction(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)",
                                                       (read_meta(db, "dropped") + count,))):
            self._unwritten_drops += count

    def _note_drops(self, count: int, why: str) -> None:
        self.dropped_this_run += count
        now = time.monotonic()
        loud = now - self._last_drop_warning >= 60.0  # at most a line a minute while an outage lasts
        if loud:
            self._last_drop_warning = now
        (log.warning if loud else log.debug)(
            "spool %s: dropped the %d oldest unsent record(s), %s (%d dropped this run)",
            self.path.name, count, why, self.dropped_this_run)


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
