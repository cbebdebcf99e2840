"""The durable outbox on a real SQLite file: seq and open events in one transaction, order, per-sink settling,
bounds, a corrupt file moved aside, an earlier version's spool migrated, the seq of earlier versions carried
over, one process per station."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from edge_helpers import event_maker

from core.errors import UserError
from edge.outbox import Outbox, open_outbox

MQTT = ("mqtt",)


SHM_BYTES = 32768  # SQLite's WAL index (-shm) of one 32 KiB region




def test_seq_order_acks_and_open_events_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "st.spool.sqlite"
    box = Outbox(path, MQTT, max_bytes=10**6, max_age_s=3600)
    assert box.add_event("cam0", event_maker("start"))["seq"] == 1
    assert box.add_event("cam0", event_maker("update"))["seq"] == 2
    box.add_snapshot("cam0", "e1", b"\xff\xd8jpeg")
    assert box.add_event("cam1", event_maker("start", "e2"))["seq"] == 3
    assert box.depth == 4
    first = box.pending("mqtt", 0, 10)
    assert [(r.kind, r.camera) for r in first] == [("event", "cam0"), ("event", "cam0"), ("snapshot", "cam0"),
                                                     ("event", "cam1")]
    assert [r.key for r in first] == ["e1:start:1", "e1:update:2", "e1:snapshot", "e2:start:3"]
    box.ack(first[0].id, "mqtt")
    box.close()

    box = Outbox(path, MQTT, max_bytes=10**6, max_age_s=3600)  # a restart: everything unacknowledged is still there
    assert box.depth == 3 and box.seq == 3
    assert [r.id for r in box.pending("mqtt", 0, 10)] == [r.id for r in first[1:]]
    assert [r.id for r in box.pending("mqtt", first[2].id, 10)] == [first[3].id]  # only what comes after
    open_now = box.open_events()
    assert [(cam, p["event_id"], p["type"], p["seq"]) for cam, p in open_now] == \
        [("cam0", "e1", "update", 2), ("cam1", "e2", "start", 3)]  # the last message of each open event
    assert box.add_event("cam0", event_maker("end"))["seq"] == 4
    assert [p["event_id"] for _, p in box.open_events()] == ["e2"]
    box.close()


def test_a_record_leaves_only_when_every_sink_has_settled_it(tmp_path: Path) -> None:
    path = tmp_path / "st.spool.sqlite"
    box = Outbox(path, ("mqtt", "webhook"), max_bytes=10**6, max_age_s=3600)
    for kind in ("start", "update", "end"):
        box.add_event("cam0", event_maker(kind))
    ids = [r.id for r in box.pending("mqtt", 0, 10)]
    for i in ids:  # MQTT delivers everything while the webhook's receiver is down
        box.ack(i, "mqtt")
    assert box.depth == 3 and box.waiting("mqtt") == 0 and box.waiting("webhook") == 3
    assert box.pending("mqtt", 0, 10) == []  # MQTT is not blocked by the webhook...
    assert [r.id for r in box.pending("webhook", 0, 10)] == ids  # ...and the webhook lost nothing
    box.ack(ids[0], "webhook")
    box.settle(ids[1], "webhook", "refused")
    assert box.depth == 1 and box.waiting("webhook") == 1
    box.close()

    box = Outbox(path, ("mqtt", "webhook"), max_bytes=10**6, max_age_s=3600)  # settled state survives a restart
    assert box.depth == 1 and box.waiting("mqtt") == 0 and [r.id for r in box.pending("webhook", 0, 10)] == ids[2:]
    box.close()
    box = Outbox(path, ("mqtt",), max_bytes=10**6, max_age_s=3600)  # the webhook removed from the config
    assert box.depth == 0
    with pytest.raises(ValueError, match="outcome"):
        box.settle(ids[2], "mqtt", "lost")
    box.close()


def test_a_spool_of_an_earlier_version_is_migrated_and_still_sent(tmp_path: Path) -> None:
    path = tmp_path / "st.spool.sqlite"
    with sqlite3.connect(path) as db:  # the schema of earlier versions: MQTT topics
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                                 created REAL NOT NULL, size INTEGER NOT NULL);
            CREATE TABLE open_events (event_id TEXT PRIMARY KEY, camera TEXT NOT NULL, payload TEXT NOT NULL);
        """)
        start = json.dumps({"event_id": "e7", "type": "start", "seq": 7}).encode()
        db.execute("INSERT INTO meta VALUES ('seq', 7)")
        db.execute("INSERT INTO outbox VALUES (5, 'plant/a/st/cam2/event', ?, ?, ?)", (start, time.time(), 99))
        db.execute("INSERT INTO outbox VALUES (6, 'plant/a/st/cam2/snapshot', ?, ?, ?)", (b"\xff\xd8", time.time(), 9))
        db.execute("INSERT INTO open_events VALUES ('e7', 'cam2', ?)", (start.decode(),))
    box = Outbox(path, MQTT, max_bytes=10**6, max_age_s=3600)
    got = box.pending("mqtt", 0, 10)
    assert [(r.id, r.kind, r.camera, r.key) for r in got] == [(5, "event", "cam2", "e7:start:7"),
                                                               (6, "snapshot", "cam2", "legacy:6")]
    assert got[0].payload == start and box.seq == 7 and [c for c, _ in box.open_events()] == ["cam2"]
    assert box.add_event("cam2", event_maker("end", "e7"))["seq"] == 8
    assert box.pending("mqtt", 6, 10)[0].id == 7  # ids continue after the migrated ones
    box.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'outbox'").fetchone() is None


def test_a_payload_that_fails_to_build_leaves_no_trace(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "s.sqlite", MQTT, max_bytes=10**6, max_age_s=3600)

    def broken(seq: int) -> dict[str, Any]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        box.add_event("cam0", broken)
    assert box.seq == 0 and box.depth == 0 and box.open_events() == []
    assert box.add_event("cam0", event_maker("start"))["seq"] == 1


def test_size_bound_drops_the_oldest_first_and_counts_them(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.sqlite"
    # max_bytes counts the WAL and its 32 KiB shared-memory index too; the WAL is checkpointed to empty when over
    box = Outbox(path, ("mqtt", "webhook"), max_bytes=SHM_BYTES + 2000, max_age_s=3600)
    with caplog.at_level(logging.WARNING, "edge.outbox"):
        for _ in range(30):
            box.add_snapshot("cam0", "e1", b"x" * 210)  # 210 bytes each: 9 fit in 2000
            last = box.pending("mqtt", 0, 100)[-1].id
            box.ack(last, "mqtt")  # one sink settled it, the other still waits: it is still held
    assert box.size_bytes <= 2000 and box.depth == 9 and box.disk_bytes <= SHM_BYTES + 2000
    assert box.dropped_total == 21 and box.dropped_this_run == 21
    kept = box.pending("webhook", 0, 100)
    assert [r.id for r in kept] == list(range(22, 31))  # the newest survive
    assert box.waiting("mqtt") == 0 and box.waiting("webhook") == 9
    assert sum("dropped the" in r.message for r in caplog.records) == 1  # one line, not one per drop
    box.close()
    reopened = Outbox(path, MQTT, max_bytes=SHM_BYTES + 2000, max_age_s=3600)
    assert reopened.dropped_total == 21  # the count survives restarts


def test_age_bound_drops_old_records(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    box = Outbox(path, MQTT, max_bytes=10**6, max_age_s=3600)
    box.add_event("cam0", event_maker("start"))
    box.add_event("cam0", event_maker("end"))
    box.close()
    with sqlite3.connect(path) as db:  # the first record was written two hours ago
        db.execute("UPDATE records SET created = ? WHERE id = 1", (time.time() - 7200,))
    box = Outbox(path, MQTT, max_bytes=10**6, max_age_s=3600)
    assert [r.id for r in box.pending("mqtt", 0, 10)] == [2] and box.dropped_total == 1
    assert box.seq == 2  # dropping records never rewinds seq


def test_a_corrupt_spool_is_moved_aside_and_seq_never_goes_back(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "st.spool.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, "edge.outbox"):
        box = Outbox(path, MQTT, max_bytes=10**6, max_age_s=3600)
    moved = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
    [line] = [r.message for r in caplog.records]
    assert "unreadable" in line and moved[0].name in line
    # Nothing could be salvaged, so seq continues from the clock (ms since the epoch): above anything sent.
    assert box.seq >= int((time.time() - 60) * 1000)
    assert box.add_event("cam0", event_maker("start"))["seq"] == box.seq


def test_open_outbox_carries_over_the_json_counter_and_holds_the_station(tmp_path: Path) -> None:
    (tmp_path / "st.seq.json").write_text('{"seq": 41}\n')
    box = open_outbox(tmp_path, "st", MQTT, 10**6, 3600)
    assert box.add_event("cam0", event_maker("start"))["seq"] == 42
    with pytest.raises(UserError, match="another edge-run for station 'st'"):
        open_outbox(tmp_path, "st", MQTT, 10**6, 3600)
    box.close()
    again = open_outbox(tmp_path, "st", MQTT, 10**6, 3600)  # released on close
    assert again.seq == 42
    again.close()


def test_state_dir_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(UserError, match="cannot create it"):
            open_outbox(blocker / "state", "st", MQTT, 10**6, 3600)  # a file where a folder should be
        return
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="state_dir"):
            open_outbox(tmp_path / "state", "st", MQTT, 10**6, 3600)
    finally:
        tmp_path.chmod(0o700)
