"""A full or read-only disk is a state, not a crash: the outbox holds what it cannot store in memory, hands it to
the sinks, says ``degraded`` (and why), and stores again by itself when space returns. On a real 2 MB tmpfs (the
test mounts one where it may, and skips with the reason where it may not) and, everywhere, on a file size limit
(RLIMIT_FSIZE: SQLite's writes fail with "database or disk is full" as on a full disk)."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from edge_helpers import Collector, cli_command, event_maker, fill_disk, free_port, validate, write_video
from prometheus_client.parser import text_string_to_metric_families
from test_edge_faults import dedup, live_station, wait_line

import edge.outbox
from edge.outbox import Outbox
from edge.outbox_file import split_snapshot

MQTT = ("mqtt",)




@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs at tmp_path/state (skipped with the reason where mounting is not allowed)."""
    mount = tmp_path / "state"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(done.stderr or done.stdout).strip()}); the RLIMIT_FSIZE "
                    "variant covers the outbox")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill ``folder``'s disk; returns the filler file."""
    return fill_disk(folder / "filler")


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge.outbox, "RETRY_MIN_S", 0.05)
    monkeypatch.setattr(edge.outbox, "RETRY_MAX_S", 0.05)


def exercise_a_full_disk(box: Outbox, make_full: Any, make_room: Any) -> None:
    """Events before, during and after a full disk: nothing raises, seq rises, the sinks see every record in id
    order (stored ones, then the ones held in memory), settling works in both, and recovery stores what waits."""
    assert box.add_event("cam0", event_maker("start"))["seq"] == 1
    first = box.pending("mqtt", 0, 10)
    make_full()
    seqs = [box.add_event("cam0", event_maker("update"))["seq"] for _ in range(40)]
    assert seqs == list(range(2, 42))
    assert box.state == "degraded" and box.problem and box.not_kept > 0
    records = box.pending("mqtt", 0, 100)
    assert [json.loads(r.payload)["seq"] for r in records] == list(range(1, 42))  # every event, in order
    assert [r.id for r in records] == sorted(r.id for r in records)
    assert box.depth == 41 and box.waiting("mqtt") == 41
    for r in records[:10]:  # a sink delivers stored and held records alike; nothing raises into its thread
        box.ack(r.id, "mqtt")
    assert box.waiting("mqtt") == 31
    assert [r.id for r in box.pending("mqtt", 0, 100)] == [r.id for r in records[10:]]
    assert first[0].id == records[0].id
    make_room()
    time.sleep(0.1)
    box.pending("mqtt", 0, 1)  # a sink's poll retries the store when it is due
    assert box.state == "ok" and box.problem is None
    assert [r.id for r in box.pending("mqtt", 0, 100)] == [r.id for r in records[10:]]  # now stored, same ids
    assert box.add_event("cam0", event_maker("end"))["seq"] == 42
    path = box.path
    box.close()
    again = Outbox(path, MQTT, max_bytes=10**7, max_age_s=3600)  # what waited survives a restart
    assert again.seq == 42 and again.state == "ok"
    assert [json.loads(r.payload)["seq"] for r in again.pending("mqtt", 0, 100)] == list(range(11, 43))
    assert again.open_events() == []
    again.close()


def test_outbox_on_a_full_tmpfs_holds_in_memory_and_stores_again(small_disk: Path, fast_retry: None) -> None:
    box = Outbox(small_disk / "st.spool.sqlite", MQTT, max_bytes=10**7, max_age_s=3600)
    filler: list[Path] = []
    exercise_a_full_disk(box, lambda: filler.append(fill(small_disk)), lambda: filler[0].unlink())


def test_outbox_under_a_file_size_limit_holds_in_memory_and_stores_again(tmp_path: Path, fast_retry: None) -> None:
    """The variant that needs no mount: RLIMIT_FSIZE at the files' current sizes makes every write that grows a
    file fail (Python ignores SIGXFSZ), as a full disk does."""
    box = Outbox(tmp_path / "st.spool.sqlite", MQTT, max_bytes=10**7, max_age_s=3600)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def make_full() -> None:
        box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL has no room left to reuse
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))

    try:
        exercise_a_full_disk(box, make_full, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_spool_that_cannot_be_written_at_start_starts_degraded_and_seq_never_goes_back(
        small_disk: Path, fast_retry: None) -> None:
    path = small_disk / "st.spool.sqlite"
    box = Outbox(path, MQTT, max_bytes=10**7, max_age_s=3600)
    box.add_event("cam0", event_maker("start"))
    box.close()
    filler = fill(small_disk)
    box = Outbox(path, MQTT, max_bytes=10**7, max_age_s=3600)  # no exception: a degraded start
    assert box.state == "degraded"
    seq = box.add_event("cam0", event_maker("update"))["seq"]
    assert seq >= int((time.time() - 60) * 1000)  # from the clock: above anything a crashed run sent from memory
    assert [json.loads(r.payload)["seq"] for r in box.pending("mqtt", 0, 10)][-1] == seq
    filler.unlink()
    time.sleep(0.1)
    box.pending("mqtt", 0, 1)
    assert box.state == "ok" and box.seq == seq
    box.close()


def test_the_wal_counts_toward_max_bytes(tmp_path: Path) -> None:
    """Payloads plus the WAL and shared-memory files stay within max_bytes: the WAL is checkpointed first, then
    the oldest records go."""
    budget = 400_000
    box = Outbox(tmp_path / "st.spool.sqlite", MQTT, max_bytes=budget, max_age_s=3600)
    for i in range(200):
        box.add_event("cam0", lambda seq, i=i: {"event_id": f"e{i}", "type": "end", "seq": seq, "pad": "x" * 4000})
        files = sum(p.stat().st_size for p in tmp_path.glob("st.spool.sqlite-*"))
        assert box.size_bytes + files <= budget + 64 * 1024  # at most one write's WAL frames beyond the last check
    wal = tmp_path / "st.spool.sqlite-wal"
    assert wal.stat().st_size <= max(64 * 1024, budget // 8) + 64 * 1024
    assert 0 < box.depth < 200 and box.dropped_this_run == 200 - box.depth
    assert box.disk_bytes <= budget
    box.close()


# -- the whole station -----------------------------------------------------------------------------
def scrape(port: int) -> dict[str, float]:
    """The station's unlabelled Prometheus samples."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_a_station_on_a_full_disk_keeps_delivering_live_and_recovers(tmp_path: Path, small_disk: Path,
                                                                      mosquitto: str, toy_bundle: Path) -> None:
    """State dir on a 2 MB tmpfs, filled mid-run: every event of the run reaches a real subscriber live, stats
    and health say degraded and then ok, the spool stores again when the filler goes, exit 0, no traceback."""
    video = write_video(tmp_path / "clip.avi", [(5, 15)], 30, fps=10.0)  # an event every 3 s, looped
    cfg = live_station(tmp_path, "st-full", video)
    port = free_port()
    text = cfg.read_text().replace(f"state_dir: {tmp_path / 'state'}", f"state_dir: {small_disk}")
    cfg.write_text(text + f"health: {{prometheus_port: {port}}}\n")
    with Collector(mosquitto, ["anomaly/st-full/#"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle, "--mqtt",
                                 mosquitto], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            wait_line(proc, "event end", timeout=60)
            filler = fill(small_disk)

            def stats(ms: list[Any]) -> list[dict[str, Any]]:
                return [json.loads(m.payload) for m in ms if m.topic.endswith("/stats")]

            assert col.wait_for(lambda ms: any(s["spool"] == "degraded" for s in stats(ms)), timeout=30), \
                "stats never said the spool was degraded"
            assert scrape(port)["edge_spool_degraded"] == 1.0
            during = len(col.events())
            assert col.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/event")]) >= during + 4,
                                timeout=30), "no event went out live while the disk was full"
            filler.unlink()
            freed = len(stats(col.messages))
            assert col.wait_for(lambda ms: any(s["spool"] == "ok" for s in stats(ms)[freed:]), timeout=60), \
                "the spool did not recover when space returned"
            metrics = scrape(port)
            assert metrics["edge_spool_degraded"] == 0.0 and metrics["edge_spool_not_kept_total"] > 0
            after = len(col.events())
            assert col.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/event")]) >= after + 2,
                                timeout=30)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert col.wait_for(lambda ms: any(m.topic.endswith("/status") and m.payload == b"stopped" and not m.retain
                                           for m in ms), timeout=15)
        messages = list(col.messages)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "cannot store" in err and "storing again" in err
    events = dedup([json.loads(m.payload) for m in messages if m.topic.endswith("/event")])
    seqs = sorted(e["seq"] for e in events)
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # every event of the run arrived
    for m in messages:
        if m.topic.endswith("/stats"):
            validate("stats", json.loads(m.payload))
        elif m.topic.endswith("/health"):
            validate("health", json.loads(m.payload))
    kinds = [[a["kind"] for a in json.loads(m.payload)["alarms"]] for m in messages if m.topic.endswith("/health")]
    raised = next(i for i, k in enumerate(kinds) if "spool_degraded" in k)
    assert any("spool_degraded" not in k for k in kinds[raised:]), kinds  # the alarm was cleared
    with contextlib.closing(sqlite3.connect(small_disk / "st-full.spool.sqlite")) as db:
        stored = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
    assert stored == seqs[-1]  # stored again: the last seq is on disk
    last = [json.loads(m.payload) for m in messages if m.topic.endswith("/stats")][-1]
    assert last["spool"] == "ok" and last["spool_not_kept"] > 0
    print(f"{len(seqs)} events delivered, {last['spool_not_kept']} sent from memory while the disk was full")


def test_a_snapshot_on_a_full_disk_is_held_in_memory_not_raised(tmp_path: Path, fast_retry: None) -> None:
    """With snapshots on, a full disk raised "cannot rollback - no transaction is active" out of add_snapshot
    into the station loop; a snapshot is now held in memory like an event, and stored when room returns."""
    box = Outbox(tmp_path / "st.spool.sqlite", MQTT, max_bytes=10**7, max_age_s=3600)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
        box.add_snapshot("cam0", "e1", b"\xff\xd8jpeg" * 500, {"score": 0.9, "frame": 12})
        assert box.state == "degraded" and box.not_kept == 1
        held = box.pending("mqtt", 0, 10)
        assert [r.kind for r in held] == ["snapshot"] and split_snapshot(held[0].payload)[0]["frame"] == 12
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        time.sleep(0.1)
        box.pending("mqtt", 0, 1)
        assert box.state == "ok" and [r.id for r in box.pending("mqtt", 0, 10)] == [held[0].id]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        box.close()
