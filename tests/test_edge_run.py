"""edge-run end to end: real video files → real CLI → real ONNX Runtime → real Mosquitto → real subscribers.

Every payload seen (events, stats, status) is validated against the shipped JSON Schemas.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from edge_helpers import (
    Collector,
    Mosquitto,
    assert_seq_monotonic,
    check_events,
    check_payloads,
    cli_command,
    run_cli,
    wait_stopped,
    write_video,
)

FPS = 10.0


def station_yaml(tmp_path: Path, station: str, extra: str = "", events: str = "", cameras: str = "") -> Path:
    """A station config for tests: small event windows, frequent stats, short timeouts."""
    text = f"""station: {station}
state_dir: {tmp_path / 'state'}
engine:
  max_batch: 4
  max_wait_ms: 5
events:
  k: 3
  n: 5
  close_after: 5
  hysteresis: 0.9
  cooldown_s: 0.5
{events or '  update_interval_s: 100'}
mqtt:
  stats_interval_s: 0.2
  flush_timeout_s: 10
{extra}
{cameras}
"""
    path = tmp_path / f"{station}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_video_with_planted_defects_to_a_real_broker(tmp_path: Path, mosquitto: str, toy_engines: Path) -> None:
    defects = [(30, 50), (80, 100)]
    video = write_video(tmp_path / "line.avi", defects, 130, fps=FPS)
    cfg = station_yaml(tmp_path, "st-main", extra="  snapshots: true")
    with Collector(mosquitto, ["anomaly/st-main/#"]) as col:
        sub = subprocess.Popen([*cli_command("edge-events"), "--mqtt", mosquitto, "--station", "st-main",
                                "--count", "4", "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            assert sub.stderr is not None
            assert "subscribed" in sub.stderr.readline()
            proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", "toy", "--mqtt", mosquitto],
                           cwd=toy_engines.parent)  # 'toy' resolves under ./engines (the default)
            assert proc.returncode == 0, proc.stderr
            assert "Traceback" not in proc.stderr
            out, err = sub.communicate(timeout=60)
        finally:
            if sub.poll() is None:
                sub.kill()
        assert sub.returncode == 0, err
        wait_stopped(col)
        assert col.wait_for(lambda ms: sum(m.topic.endswith("/event") for m in ms) >= 4)
        got = check_payloads(col)
    events = got["event"]
    check_events(events, defects, "cam0")
    assert_seq_monotonic(events)
    assert {e["station"] for e in events} == {"st-main"}
    assert all(e["threshold"] == 0.1 and e["model"] == "toy" and e["backend"] == "onnxruntime" for e in events)
    # the edge-events CLI printed the same events, one JSON line each
    printed = [json.loads(line) for line in out.splitlines()]
    assert [(e["event_id"], e["type"], e["seq"]) for e in printed] == \
        [(e["event_id"], e["type"], e["seq"]) for e in events]
    # file timestamps follow the frame index at the file's fps
    start = events[0]
    assert start["ts"].endswith("Z")
    assert got["status"][0] == "online" and got["status"][-1] == "stopped"
    final = got["stats"][-1]
    assert final["cameras"]["cam0"]["frames_processed"] == 130 and final["cameras"]["cam0"]["dropped"] == 0
    assert final["spool_depth"] == 0 and final["inference_ms"]["p50"] is not None
    assert len(got["snapshot"]) == 2  # one JPEG of the peak frame per ended event
    # a late subscriber sees the retained status and stats
    with Collector(mosquitto, ["anomaly/st-main/status", "anomaly/st-main/stats"]) as late:
        assert late.wait_for(lambda ms: len(ms) >= 2)
        assert {m.topic.rsplit("/", 1)[1]: m.retain for m in late.messages} == {"status": True, "stats": True}
        assert late.on("/status")[0].payload == b"stopped"


def test_seq_continues_across_restarts_and_updates_are_rate_limited(tmp_path: Path, mosquitto: str,
                                                                    toy_bundle: Path) -> None:
    defects = [(10, 45)]  # 3.5 s of defect at 10 fps
    video = write_video(tmp_path / "v.avi", defects, 60, fps=FPS)
    cfg = station_yaml(tmp_path, "st-seq", events="  update_interval_s: 1.0")
    runs = []
    for _ in range(2):
        with Collector(mosquitto, ["anomaly/st-seq/#"]) as col:
            proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle,
                                        "--mqtt", mosquitto], cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
            wait_stopped(col)
            runs.append(check_payloads(col)["event"])
    first, second = runs
    for events in runs:
        check_events(events, defects, "cam0")
        types = [e["type"] for e in events]
        assert types[0] == "start" and types[-1] == "end" and set(types[1:-1]) == {"update"}
        updates = [e for e in events if e["type"] == "update"]
        assert 2 <= len(updates) <= 3  # at most one per second of frame time
        assert all(updates[i + 1]["frame"] - updates[i]["frame"] >= 10 for i in range(len(updates) - 1))
        assert len({e["event_id"] for e in events}) == 1
    assert [e["seq"] for e in first] == list(range(1, len(first) + 1))
    assert [e["seq"] for e in second] == list(range(len(first) + 1, len(first) + len(second) + 1))
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "st-seq.spool.sqlite")) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0] == len(first) + len(second)
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0  # every record acknowledged
        assert db.execute("SELECT COUNT(*) FROM open_events").fetchone()[0] == 0


def test_unreachable_broker_keeps_processing_and_the_next_run_sends_what_it_spooled(
        tmp_path: Path, unused_port: int, mosquitto: str, toy_bundle: Path) -> None:
    defects = [(10, 30)]
    video = write_video(tmp_path / "v.avi", defects, 50, fps=FPS)
    cfg = station_yaml(tmp_path, "st-down")
    cfg.write_text(cfg.read_text().replace("flush_timeout_s: 10", "flush_timeout_s: 1"))
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle,
                                "--mqtt", f"mqtt://127.0.0.1:{unused_port}"], cwd=tmp_path)
    err = proc.stderr
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    assert "is unreachable" in err and "kept in the spool" in err
    assert "event start" in err and "stopped after 50 frames" in err  # it kept processing
    lines = [ln for ln in err.splitlines() if "not acknowledged" in ln]
    assert len(lines) == 1 and lines[0].startswith("edge-run: 2 message(s) not acknowledged"), err
    # The next run, with the broker there, sends the two spooled events first, then its own.
    with Collector(mosquitto, ["anomaly/st-down/#"]) as col:
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle,
                                    "--mqtt", mosquitto], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "2 message(s) from earlier runs" in proc.stderr
        wait_stopped(col)
        events = check_payloads(col)["event"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [(e["type"], e.get("reason")) for e in events] == [("start", None), ("end", "cleared")] * 2


def test_multi_camera_station_yaml_and_max_frames_per_camera(tmp_path: Path, mosquitto: str,
                                                             toy_engines: Path) -> None:
    a_defects, b_defects = [(10, 25)], [(40, 80)]
    va = write_video(tmp_path / "a.avi", a_defects, 100, fps=FPS, seed=1)
    vb = write_video(tmp_path / "b.avi", b_defects, 100, fps=FPS, seed=2)
    cameras = f"""cameras:
  - id: left
    source: {va}
  - id: right
    source: {vb}
"""
    extra = f"  url: {mosquitto}"
    cfg = station_yaml(tmp_path, "st-multi", extra=extra, cameras=cameras)
    text = cfg.read_text().replace("engine:\n", f"engine:\n  model: toy\n  engines_dir: {toy_engines}\n")
    cfg.write_text(text)
    with Collector(mosquitto, ["anomaly/st-multi/#"]) as col:
        proc = run_cli("edge-run", ["--config", cfg, "--max-frames", "60"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        wait_stopped(col)
        got = check_payloads(col)
    events = got["event"]
    check_events(events, a_defects, "left")
    check_events(events, b_defects, "right")  # still open at frame 59: closed with an end at the last frame
    right_end = [e for e in events if e["camera"] == "right" and e["type"] == "end"][0]
    assert right_end["frame"] == 59
    assert_seq_monotonic(events)
    final = got["stats"][-1]
    assert {c: s["frames_processed"] for c, s in final["cameras"].items()} == {"left": 60, "right": 60}


def test_live_source_is_reopened_with_backoff_and_sigterm_stops_cleanly(tmp_path: Path, mosquitto: str,
                                                                        toy_bundle: Path) -> None:
    # A file marked live behaves like a camera: drop-oldest, wall clock, and at its end "the camera
    # stopped delivering", so it is reopened (with back-off) and reported.
    video = write_video(tmp_path / "loop.avi", [(0, 15)], 15, fps=FPS)
    cameras = f"""cameras:
  - id: cam0
    source: {video}
    live: true
    reopen_initial_s: 0.05
    reopen_max_s: 0.2
"""
    cfg = station_yaml(tmp_path, "st-live", cameras=cameras)
    with Collector(mosquitto, ["anomaly/st-live/#"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle,
                                 "--mqtt", mosquitto], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            def reconnected(ms: list) -> bool:
                stats = [json.loads(m.payload) for m in ms if m.topic.endswith("/stats")]
                return any(s["cameras"]["cam0"]["reconnects"] >= 2 for s in stats)

            assert col.wait_for(reconnected, timeout=30), "no reconnects reported in stats"
            assert col.wait_for(lambda ms: any(m.topic.endswith("/event") for m in ms), timeout=10)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "SIGTERM received" in err and "reopen" in err
        wait_stopped(col)
        time.sleep(0.1)
        got = check_payloads(col)
    events = got["event"]
    starts = [e for e in events if e["type"] == "start"]
    ends = {e["event_id"] for e in events if e["type"] == "end"}
    assert starts and {e["event_id"] for e in starts} == ends  # the open event was closed on SIGTERM
    assert_seq_monotonic(events)


def test_edge_events_times_out_non_zero_without_events(mosquitto: str) -> None:
    proc = run_cli("edge-events", ["--mqtt", mosquitto, "--station", "nobody", "--count", 1,
                                   "--timeout", "0.5"])
    assert proc.returncode == 1 and proc.stdout == ""
    assert "timeout after 0.5 s with 0 of 1 events" in proc.stderr


def test_events_held_while_the_broker_is_down_are_delivered_when_it_comes_up(
        tmp_path: Path, mosquitto_bin: str, unused_port: int, toy_bundle: Path) -> None:
    defects = [(10, 30)]
    video = write_video(tmp_path / "v.avi", defects, 50, fps=FPS)
    cfg = station_yaml(tmp_path, "st-outage")
    # with reconnect_min_s 1, paho's first retry comes ~3 s after the first failure (1 s + 2 s): time
    # enough for our subscriber to be in place before the held events go out
    cfg.write_text(cfg.read_text().replace("flush_timeout_s: 10", "flush_timeout_s: 30\n  reconnect_min_s: 1"))
    url = f"mqtt://127.0.0.1:{unused_port}"
    proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--camera", video, "--engine", toy_bundle,
                             "--mqtt", url], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    broker = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the whole file is processed with the broker down...
            if "end of" in line:
                break
        broker = Mosquitto(tmp_path / "broker", unused_port, mosquitto_bin)  # ...then it comes up
        with Collector(url, ["anomaly/st-outage/#"]) as col:
            rest = proc.stderr.read()
            proc.wait(60)
            assert proc.returncode == 0, rest
            assert "sending 2 spooled messages" in rest
            wait_stopped(col)
            assert col.wait_for(lambda ms: sum(m.topic.endswith("/event") for m in ms) >= 2)
            events = check_payloads(col)["event"]
        check_events(events, defects, "cam0")
    finally:
        if proc.poll() is None:
            proc.kill()
        if broker is not None:
            broker.stop()


def test_edge_events_names_what_is_wrong_with_a_payload_that_fails_the_schema(mosquitto: str) -> None:
    import paho.mqtt.publish as mqtt_publish

    from edge.mqtt import parse_mqtt_url

    url = parse_mqtt_url(mosquitto)
    sub = subprocess.Popen([*cli_command("edge-events"), "--mqtt", mosquitto, "--station", "st-bad-payload",
                            "--count", "2", "--timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert sub.stderr is not None and "subscribed" in sub.stderr.readline()
        topic = "anomaly/st-bad-payload/cam0/event"
        bad = {"schema": 2, "event_id": "6f1c0000-0000-4000-8000-000000000000", "type": "end",
               "station": "st-bad-payload", "camera": "cam0", "seq": 0, "ts": "2026-11-26T07:12:03.400Z",
               "frame": 1, "score": 0.5, "peak_score": 0.9, "threshold": 0.1, "model": "toy",
               "model_version": "v1", "backend": "onnxruntime", "reason": "cleared"}
        mqtt_publish.single(topic, json.dumps(bad), qos=1, hostname=url.host, port=url.port)
        mqtt_publish.single(topic, b"\xff not json", qos=1, hostname=url.host, port=url.port)
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, err
    assert f"invalid event on {topic}: seq: 0 is less than the minimum of 1" in err
    assert f"invalid event on {topic}: not UTF-8" in err and "2 of 2 events did not match" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["error"] for line in lines] == ["seq: 0 is less than the minimum of 1",
                                               "not UTF-8: invalid byte at offset 0"]
