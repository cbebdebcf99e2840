"""Hot model swap through the real edge-run: a newly promoted bundle is taken between two batches without
losing a frame (even at another input size); a corrupt one is refused once while the old one keeps scoring;
cmd/reload over MQTT triggers it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
from edge_helpers import Collector, check_payloads, cli_command, make_toy_bundle, run_cli, wait_stopped, write_video

from core.bundle import CURRENT
from core.files import atomic_write_text
from edge.mqtt import parse_mqtt_url

FPS = 10.0


def versions_in_stats(col: Collector) -> list[str]:
    return [json.loads(m.payload)["model_version"] for m in col.on("/stats")]


def station_yaml(tmp_path: Path, station: str, engines: Path, extra: str = "", cameras: str = "") -> Path:
    path = tmp_path / f"{station}.yaml"
    path.write_text(f"""station: {station}
state_dir: {tmp_path / 'state'}
engine:
  engines_dir: {engines}
  max_batch: 1
  watch_interval_s: 0.2
{extra}
mqtt: {{stats_interval_s: 0.1}}
{cameras}""", encoding="utf-8")
    return path


def test_a_promoted_bundle_is_swapped_in_mid_stream_without_losing_a_frame(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    n = 8000  # long enough that the swap (poll 0.2 s + load) lands well inside the stream
    video = write_video(tmp_path / "long.avi", [(20, 40), (7900, 7950)], n, fps=FPS)
    cfg = station_yaml(tmp_path, "st-swap", engines)
    with Collector(mosquitto, ["anomaly/st-swap/#"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--camera", video, "--engine", "toy",
                                 "--mqtt", mosquitto], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: any(json.loads(m.payload)["cameras"]["cam0"]["frames_processed"] > 50
                                               for m in col.on("/stats")), timeout=30)
            time.sleep(0.01)
            second = make_toy_bundle(engines, hw=(48, 48), threshold=0.2)  # another input size and threshold
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        wait_stopped(col)
        got = check_payloads(col)
    assert "model swapped: toy " + first.name + " -> toy " + second.name in err, err
    assert got["stats"][-1]["cameras"]["cam0"]["frames_processed"] == n  # not one frame lost over the swap
    seen = versions_in_stats(col)
    assert seen[0] == first.name and seen[-1] == second.name, "the swap did not happen mid-stream"
    last = [e for e in got["event"] if e["frame"] >= 7900]
    assert last and all(e["model_version"] == second.name and e["threshold"] == 0.2 for e in last)
    first_events = [e for e in got["event"] if e["frame"] < 100]
    assert first_events and all(e["model_version"] == first.name for e in first_events)


def live_loop(tmp_path: Path) -> str:
    clip = write_video(tmp_path / "loop.avi", [(5, 10)], 20, fps=FPS)
    return f"""cameras:
  - id: cam0
    source: {clip}
    live: true
    reopen_initial_s: 0.05
    reopen_max_s: 0.05
"""


def test_a_corrupt_new_bundle_is_refused_once_and_the_old_one_keeps_scoring(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    cfg = station_yaml(tmp_path, "st-bad", engines, cameras=live_loop(tmp_path))
    with Collector(mosquitto, ["anomaly/st-bad/stats"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", "toy", "--mqtt", mosquitto],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: len(ms) >= 3, timeout=30)
            bad = make_toy_bundle(engines, promote_it=False)
            with open(bad / "model.onnx", "ab") as fh:
                fh.write(b"\0")  # damaged after it was written: its checksum no longer matches
            atomic_write_text(engines / "toy" / CURRENT, bad.name + "\n")
            time.sleep(1.5)  # several polls of `current`
            before = len(col.messages)
            assert col.wait_for(lambda ms: len(ms) >= before + 5, timeout=10)
            frames = [json.loads(m.payload)["cameras"]["cam0"]["frames_processed"] for m in col.messages]
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    refusals = [ln for ln in err.splitlines() if "refused" in ln]
    assert len(refusals) == 1 and bad.name in refusals[0] and "checksum does not match" in refusals[0], err
    assert set(versions_in_stats(col)) == {first.name}
    assert frames[-1] > frames[len(frames) // 2] > 0  # still scoring after the refusal


def test_cmd_reload_over_mqtt_swaps_and_garbage_commands_are_ignored(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    cfg = station_yaml(tmp_path, "st-cmd", engines, cameras=live_loop(tmp_path))
    cfg.write_text(cfg.read_text().replace("watch_interval_s: 0.2", "watch_interval_s: 0"))  # commands only
    url = parse_mqtt_url(mosquitto)
    with Collector(mosquitto, ["anomaly/st-cmd/stats"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", "toy", "--mqtt", mosquitto],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: len(ms) >= 3, timeout=30)
            second = make_toy_bundle(engines)
            time.sleep(0.5)
            assert set(versions_in_stats(col)) == {first.name}  # not watching: no swap yet
            mqtt_publish.single("anomaly/st-cmd/cmd/selfdestruct", b"{}", qos=1, hostname=url.host, port=url.port)
            mqtt_publish.single("anomaly/st-cmd/cmd/reload", b"not json", qos=1, hostname=url.host, port=url.port)
            mqtt_publish.single("anomaly/st-cmd/cmd/reload", b"", qos=1, hostname=url.host, port=url.port)
            assert col.wait_for(lambda ms: second.name in versions_in_stats(col), timeout=15), "no swap on reload"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "ignored command on anomaly/st-cmd/cmd/selfdestruct (unknown command)" in err
    assert "ignored command on anomaly/st-cmd/cmd/reload (payload is not empty or a JSON object)" in err
    assert "model swapped" in err


def test_a_fixed_version_folder_is_never_swapped(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    make_toy_bundle(engines)  # promoted, but the station was told to run `first` itself
    video = write_video(tmp_path / "v.avi", [], 30, fps=FPS)
    cfg = station_yaml(tmp_path, "st-fixed", engines)
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", first, "--mqtt", mosquitto],
                   cwd=tmp_path)
    assert proc.returncode == 0 and "model swapped" not in proc.stderr
