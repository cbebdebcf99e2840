"""The durable spool on a real SQLite file: seq and open events in one transaction, order, acks, bounds,
a corrupt file moved aside, the seq of earlier versions carried over, one process per station."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from core.errors import UserError
from edge.spool import Spool, open_spool


def event(kind: str, event_id: str = "e1") -> Any:
    def make(seq: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"event_id": event_id, "type": kind, "seq": seq, "frame": seq}
        if kind == "end":
            payload["reason"] = "cleared"
        return payload
    return make


def test_seq_order_acks_and_open_events_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "st.spool.sqlite"
    spool = Spool(path, max_bytes=10**6, max_age_s=3600)
    assert spool.add_event("a/st/cam0/event", "cam0", event("start"))["seq"] == 1
    assert spool.add_event("a/st/cam0/event", "cam0", event("update"))["seq"] == 2
    spool.add("a/st/cam0/snapshot", b"\xff\xd8jpeg")
    assert spool.add_event("a/st/cam1/event", "cam1", event("start", "e2"))["seq"] == 3
    assert spool.depth == 4
    first = spool.pending(0, 10)
    assert [m.topic.rsplit("/", 1)[1] for m in first] == ["event", "event", "snapshot", "event"]
    spool.ack(first[0].id)
    spool.close()

    spool = Spool(path, max_bytes=10**6, max_age_s=3600)  # a restart: everything unacknowledged is still there
    assert spool.depth == 3 and spool.seq == 3
    assert [m.id for m in spool.pending(0, 10)] == [m.id for m in first[1:]]
    assert [m.id for m in spool.pending(first[2].id, 10)] == [first[3].id]  # only what comes after
    open_now = spool.open_events()
    assert [(cam, p["event_id"], p["type"], p["seq"]) for cam, p in open_now] == \
        [("cam0", "e1", "update", 2), ("cam1", "e2", "start", 3)]  # the last message of each open event
    assert spool.add_event("a/st/cam0/event", "cam0", event("end"))["seq"] == 4
    assert [p["event_id"] for _, p in spool.open_events()] == ["e2"]
    spool.close()


def test_a_payload_that_fails_to_build_leaves_no_trace(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=10**6, max_age_s=3600)

    def broken(seq: int) -> dict[str, Any]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        spool.add_event("t", "cam0", broken)
    assert spool.seq == 0 and spool.depth == 0 and spool.open_events() == []
    assert spool.add_event("t", "cam0", event("start"))["seq"] == 1


def test_size_bound_drops_the_oldest_first_and_counts_them(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path, max_bytes=2000, max_age_s=3600)
    with caplog.at_level(logging.WARNING, "edge.spool"):
        for _ in range(30):
            spool.add("a/st/cam0/snapshot", b"x" * 190)  # 190 + 17 bytes each: 9 fit in 2000
    assert spool.size_bytes <= 2000 and spool.depth == 9
    assert spool.dropped_total == 21 and spool.dropped_this_run == 21
    kept = spool.pending(0, 100)
    assert [m.id for m in kept] == list(range(22, 31))  # the newest survive
    assert sum("dropped the" in r.message for r in caplog.records) == 1  # one line, not one per drop
    spool.close()
    assert Spool(path, max_bytes=2000, max_age_s=3600).dropped_total == 21  # the count survives restarts


def test_age_bound_drops_old_messages(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path, max_bytes=10**6, max_age_s=3600)
    spool.add_event("t", "cam0", event("start"))
    spool.add_event("t", "cam0", event("end"))
    spool.close()
    with sqlite3.connect(path) as db:  # the first message was written two hours ago
        db.execute("UPDATE outbox SET created = ? WHERE id = 1", (time.time() - 7200,))
    spool = Spool(path, max_bytes=10**6, max_age_s=3600)
    assert [m.id for m in spool.pending(0, 10)] == [2] and spool.dropped_total == 1
    assert spool.seq == 2  # dropping messages never rewinds seq


def test_a_corrupt_spool_is_moved_aside_and_seq_never_goes_back(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "st.spool.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, "edge.spool"):
        spool = Spool(path, max_bytes=10**6, max_age_s=3600)
    moved = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
    [line] = [r.message for r in caplog.records]
    assert "unreadable" in line and moved[0].name in line
    # Nothing could be salvaged, so seq continues from the clock (ms since the epoch): above anything sent.
    assert spool.seq >= int((time.time() - 60) * 1000)
    assert spool.add_event("t", "cam0", event("start"))["seq"] == spool.seq


def test_open_spool_carries_over_the_json_counter_and_holds_the_station(tmp_path: Path) -> None:
    (tmp_path / "st.seq.json").write_text('{"seq": 41}\n')
    spool = open_spool(tmp_path, "st", 10**6, 3600)
    assert spool.add_event("t", "cam0", event("start"))["seq"] == 42
    with pytest.raises(UserError, match="another edge-run for station 'st'"):
        open_spool(tmp_path, "st", 10**6, 3600)
    spool.close()
    again = open_spool(tmp_path, "st", 10**6, 3600)  # released on close
    assert again.seq == 42
    again.close()


def test_state_dir_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(UserError, match="cannot create it"):
            open_spool(blocker / "state", "st", 10**6, 3600)  # a file where a folder should be
        return
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="state_dir"):
            open_spool(tmp_path / "state", "st", 10**6, 3600)
    finally:
        tmp_path.chmod(0o700)
