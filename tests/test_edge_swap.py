"""Hot model swap through the real edge-run: a newly promoted bundle is taken between two batches without
losing a frame (even at another input size); a corrupt one is refused once while the old one keeps scoring;
cmd/reload over MQTT triggers it. The watcher outlives bundles that cannot load (ONNX Runtime refusing a manifest
whose input size disagrees with the graph, a missing file) and takes the next good one; an empty or unreadable
``current`` is said once; a cmd/reload that finds nothing new swaps nothing and ends no event."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import onnx
import paho.mqtt.publish as mqtt_publish
from edge_helpers import (
    Collector,
    check_payloads,
    cli_command,
    make_toy_bundle,
    run_cli,
    toy_model,
    wait_stopped,
    write_video,
)

from core.bundle import CURRENT, new_version_dir, promote, write_manifest
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


def make_mismatched_bundle(engines: Path) -> Path:
    """A bundle whose checksums are right but whose manifest says 48x48 while its graph takes 32x32: ONNX Runtime
    raises its own exception (not a UserError) when the station warms it up."""
    bundle_dir = new_version_dir(engines, "toy")
    onnx.save(toy_model((32, 32)), str(bundle_dir / "model.onnx"))
    write_manifest(bundle_dir, model_name="toy", input_spec={"height": 48, "width": 48},
                   outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]}],
                   calibration={"threshold": 0.1, "method": "fixed (toy)"}, training_data={"count": 0, "hash": "none"},
                   metrics={})
    return bundle_dir


def run_live_station(tmp_path: Path, mosquitto: str, station: str, during, watch_s: float = 0.2,
                     topics: str = "#") -> tuple[str, Collector]:
    """edge-run on a looping clip with the `toy` model folder; ``during(col)`` acts while it runs; its stderr."""
    cfg = station_yaml(tmp_path, station, tmp_path / "engines", cameras=live_loop(tmp_path))
    cfg.write_text(cfg.read_text().replace("watch_interval_s: 0.2", f"watch_interval_s: {watch_s}"))
    with Collector(mosquitto, [f"anomaly/{station}/{topics}"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", "toy", "--mqtt", mosquitto],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/stats")]) >= 3, timeout=30)
            during(col)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    return err, col


def test_the_watcher_survives_bundles_that_cannot_load_and_takes_the_next_good_one(tmp_path: Path,
                                                                                    mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    bad: list[Path] = []
    good: list[Path] = []

    def during(col: Collector) -> None:
        bad.append(make_mismatched_bundle(engines))
        promote(bad[0])
        time.sleep(1.5)  # several polls
        bad.append(make_toy_bundle(engines, promote_it=False))
        (bad[1] / "model.onnx").unlink()  # a file the manifest lists is missing (promote() would refuse it)
        atomic_write_text(engines / "toy" / CURRENT, bad[1].name + "\n")
        time.sleep(1.5)
        good.append(make_toy_bundle(engines, threshold=0.2))
        assert col.wait_for(lambda ms: good[0].name in versions_in_stats(col), timeout=15), "no swap after refusals"

    err, col = run_live_station(tmp_path, mosquitto, "st-survive", during, topics="stats")
    refusals = [ln for ln in err.splitlines() if "refused" in ln]
    assert len(refusals) == 2, err  # one line each, not one per poll
    assert bad[0].name in refusals[0] and bad[1].name in refusals[1], refusals
    assert "ONNXRuntimeError" in refusals[0] and "model.onnx" in refusals[1], refusals
    assert f"model swapped: toy {first.name} -> toy {good[0].name}" in err
    assert "bundle watcher:" not in err  # both were refused as bundles, not caught as surprises
    assert versions_in_stats(col)[-1] == good[0].name


def test_an_empty_or_unreadable_current_is_said_once_per_cause(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    current = engines / "toy" / CURRENT
    good: list[Path] = []

    def during(col: Collector) -> None:
        atomic_write_text(current, "")  # a promotion tool that truncated it
        time.sleep(1.5)  # about 7 polls
        current.unlink()
        current.mkdir()  # not a file at all
        time.sleep(1.5)
        current.rmdir()
        good.append(make_toy_bundle(engines))  # promoted properly: taken
        assert col.wait_for(lambda ms: good[0].name in versions_in_stats(col), timeout=15)

    err, _ = run_live_station(tmp_path, mosquitto, "st-empty", during, topics="stats")
    assert len([ln for ln in err.splitlines() if "is empty" in ln]) == 1, err
    assert len([ln for ln in err.splitlines() if "IsADirectoryError" in ln]) == 1, err
    assert f"model swapped: toy {first.name} -> toy {good[0].name}" in err


def test_cmd_reload_with_nothing_new_swaps_nothing_and_ends_no_event(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    url = parse_mqtt_url(mosquitto)

    def during(col: Collector) -> None:
        assert col.wait_for(lambda ms: any(e["type"] == "start" for e in col.events()), timeout=15)
        for _ in range(3):
            mqtt_publish.single("anomaly/st-noop/cmd/reload", b"{}", qos=1, hostname=url.host, port=url.port)
            time.sleep(0.5)
        time.sleep(1.0)

    err, col = run_live_station(tmp_path, mosquitto, "st-noop", during, watch_s=0)
    assert "model swapped" not in err and "refused" not in err, err
    assert err.count("command reload received") == 3, err
    # requests that arrive while the watcher is still checking the previous one are answered by that check
    assert 1 <= err.count(f"already running {first.name}") <= 3, err
    reasons = {e.get("reason") for e in col.events() if e["type"] == "end"}
    assert "model_swap" not in reasons, reasons
    assert set(versions_in_stats(col)) == {first.name}
