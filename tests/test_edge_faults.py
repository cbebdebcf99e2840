"""Fault injection against a real Mosquitto and the real edge-run: brokers that stop and crash, a station
SIGKILLed during an outage, a corrupt spool. What SCADA sees must be complete: every event exactly once after
de-duplication on (event_id, type, seq), in seq order, and never a start without an end."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from edge_helpers import Collector, Mosquitto, check_payloads, cli_command, free_port, run_cli, write_video

FPS = 10.0


def live_station(tmp_path: Path, station: str, video: Path, extra_mqtt: str = "") -> Path:
    """A station whose camera is a looping clip marked live: frames keep coming for as long as it runs."""
    path = tmp_path / f"{station}.yaml"
    path.write_text(f"""station: {station}
state_dir: {tmp_path / 'state'}
engine: {{max_batch: 4, max_wait_ms: 5}}
cameras:
  - id: cam0
    source: {video}
    live: true
    reopen_initial_s: 0.05
    reopen_max_s: 0.05
events: {{k: 3, n: 5, close_after: 5, update_interval_s: 0.3, cooldown_s: 0.5}}
mqtt:
  stats_interval_s: 0.3
  flush_timeout_s: 15
  reconnect_max_s: 1
{extra_mqtt}""", encoding="utf-8")
    return path


def start_station(cfg: Path, bundle: Path, url: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", bundle, "--mqtt", url],
                            cwd=cwd, stderr=subprocess.PIPE, text=True)


def dedup(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a subscriber keeps: the first copy of each (event_id, type, seq)."""
    seen: set[tuple[str, str, int]] = set()
    out = []
    for e in events:
        key = (e["event_id"], e["type"], e["seq"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return err


def wait_line(proc: subprocess.Popen, needle: str, timeout: float = 20.0) -> None:
    """Read the station's stderr until a line with ``needle`` (the stream stays readable afterwards)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if needle in line:
            return
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s"
    raise AssertionError(f"edge-run exited before {needle!r}")


def test_broker_restarted_mid_stream_with_an_event_open_loses_nothing(tmp_path: Path, mosquitto_bin: str,
                                                                      toy_bundle: Path) -> None:
    video = write_video(tmp_path / "stuck.avi", [(3, 20)], 20, fps=FPS)  # defective from frame 3 on: stays open
    broker = Mosquitto(tmp_path / "broker", free_port(), mosquitto_bin, persistent=True)
    cfg = live_station(tmp_path, "st-restart", video)
    try:
        with Collector(broker.url, ["anomaly/st-restart/+/event"], session="scada-st-restart") as col:
            time.sleep(1.5)  # the broker's autosave has our subscription
            proc = start_station(cfg, toy_bundle, broker.url, tmp_path)
            try:
                assert col.wait_for(lambda ms: len(ms) >= 3, timeout=30), "no start and updates before the outage"
                broker.kill(signal.SIGTERM)  # the broker goes away with the event open...
                time.sleep(2.0)  # ...while updates keep being spooled...
                broker.start()  # ...and comes back
                before = len(col.messages)
                assert col.wait_for(lambda ms: len(ms) >= before + 3, timeout=30), "nothing after the restart"
                err = stop(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.returncode == 0, err
            assert "Traceback" not in err and "MQTT connected" in err
            assert col.wait_for(lambda ms: json.loads(ms[-1].payload)["type"] == "end", timeout=15)
            received = check_payloads(col)["event"]
    finally:
        broker.stop()
    events = dedup(received)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), seqs  # none lost, each once, in seq order
    assert len({e["event_id"] for e in events}) == 1
    assert events[0]["type"] == "start" and events[-1]["type"] == "end" and events[-1]["reason"] == "shutdown"
    assert {e["type"] for e in events[1:-1]} == {"update"}
    print(f"{len(events)} events delivered once each after de-duplication ({len(received) - len(events)} "
          "duplicates received)")


def test_station_sigkilled_during_an_outage_delivers_everything_when_restarted(
        tmp_path: Path, mosquitto_bin: str, toy_bundle: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    stuck = write_video(tmp_path / "stuck.avi", [(3, 20)], 20, fps=FPS)
    cfg = live_station(tmp_path, "st-kill", stuck)
    proc = start_station(cfg, toy_bundle, url, tmp_path)  # no broker at all
    try:
        wait_line(proc, "event start")
        wait_line(proc, "event update")
        proc.kill()  # SIGKILL with an open event and everything unsent
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    broker = Mosquitto(tmp_path / "broker", port, mosquitto_bin)
    try:
        with Collector(url, ["anomaly/st-kill/#"]) as col:
            clean = write_video(tmp_path / "clean.avi", [], 20, fps=FPS)
            run = run_cli("edge-run", ["--config", cfg, "--camera", clean, "--engine", toy_bundle, "--mqtt", url],
                          cwd=tmp_path)
            assert run.returncode == 0, run.stderr
            assert "from earlier runs not yet acknowledged" in run.stderr
            assert "event end (restart)" in run.stderr
            assert col.wait_for(lambda ms: any(m.topic.endswith("/status") and m.payload == b"stopped"
                                               for m in ms), timeout=15)
            events = dedup(check_payloads(col)["event"])
    finally:
        broker.stop()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), seqs
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "end"
    assert events[-1]["reason"] == "restart" and len({e["event_id"] for e in events}) == 1
    assert events[-1]["frame"] == events[-2]["frame"]  # the last frame the event had reported


def test_a_station_that_died_while_the_broker_was_down_is_not_shown_online(
        tmp_path: Path, mosquitto_bin: str, toy_bundle: Path) -> None:
    video = write_video(tmp_path / "v.avi", [], 20, fps=FPS)
    broker = Mosquitto(tmp_path / "broker", free_port(), mosquitto_bin, persistent=True)
    lease = 3
    cfg = live_station(tmp_path, "st-ghost", video, extra_mqtt=f"  status_lease_s: {lease}\n")
    proc = start_station(cfg, toy_bundle, broker.url, tmp_path)
    try:
        with Collector(broker.url, ["anomaly/st-ghost/status"]) as col:
            assert col.wait_for(lambda ms: any(m.payload == b"online" for m in ms), timeout=20)
        time.sleep(1.5)  # the broker's autosave has the retained 'online'
        broker.kill()  # the broker crashes (SIGKILL: it sends no will)...
        proc.kill()  # ...and the station dies while it is down
        proc.wait(10)
        broker.start()
        t_back = time.monotonic()
        time.sleep(lease + 0.5)
        with Collector(broker.url, ["anomaly/st-ghost/status"]) as late:
            late.wait_for(lambda ms: bool(ms), timeout=1.0)
            shown = [m.payload for m in late.messages]
        assert b"online" not in shown, f"{shown} {time.monotonic() - t_back:.1f} s after the broker came back"
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()


def test_a_corrupt_spool_is_moved_aside_with_one_line_and_the_station_runs(
        tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "st-corrupt.spool.sqlite").write_bytes(b"\x00garbage" * 512)
    video = write_video(tmp_path / "v.avi", [(5, 15)], 30, fps=FPS)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"station: st-corrupt\nstate_dir: {state}\n", encoding="utf-8")
    with Collector(mosquitto, ["anomaly/st-corrupt/+/event"]) as col:
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", mosquitto],
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "unreadable" in ln]
        assert len(lines) == 1 and "moved it to st-corrupt.spool.sqlite.corrupt-" in lines[0], proc.stderr
        assert col.wait_for(lambda ms: len(ms) >= 2, timeout=10)
        events = check_payloads(col)["event"]
    assert [e["type"] for e in events] == ["start", "end"]
    assert events[0]["seq"] > 10**12  # continued from the clock: above any seq the lost file could have held
    assert len(list(state.glob("*.corrupt-*"))) == 1
