"""Operator health through the real edge-run: the Prometheus endpoint scraped over HTTP, and the systemd
notify protocol on a real unix datagram socket (READY, then WATCHDOG only while frames flow)."""

from __future__ import annotations

import configparser
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from edge_helpers import FifoCamera, cli_command, free_port, write_video
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def test_prometheus_endpoint_serves_the_station_counters(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    clip = write_video(tmp_path / "loop.avi", [(5, 10)], 20, fps=10.0)
    port = free_port()
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-prom
state_dir: {tmp_path / 'state'}
cameras:
  - {{id: cam0, source: {clip}, live: true, reopen_initial_s: 0.05, reopen_max_s: 0.05}}
events: {{cooldown_s: 0.1}}
health: {{prometheus_port: {port}}}
""", encoding="utf-8")
    proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle, "--mqtt", mosquitto],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        samples: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    samples[f"{sample.name}{{{labels}}}"] = sample.value
            if samples.get("edge_events_total{camera=cam0,type=end}", 0) >= 1:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert samples.get("edge_frames_processed_total{camera=cam0}", 0) > 0, samples
    assert samples["edge_camera_connected{camera=cam0}"] in (0.0, 1.0)
    assert samples["edge_events_total{camera=cam0,type=start}"] >= 1
    assert samples["edge_inference_seconds_count{}"] > 0 and samples["edge_capture_to_decision_seconds_count{}"] > 0
    assert samples["edge_spool_depth{}"] >= 0 and samples["edge_mqtt_connected{}"] == 1.0
    assert samples["edge_spool_degraded{}"] == 0.0 and samples["edge_spool_not_kept_total{}"] == 0.0
    assert samples["edge_workers_failed{}"] == 0.0
    assert samples["edge_frames_undecodable_total{camera=cam0}"] == 0.0
    assert samples["edge_camera_refits_total{camera=cam0}"] == 0.0
    assert f"edge_model_info{{backend=onnxruntime,model=toy,station=st-prom,version={toy_bundle.name}}}" in samples


def test_systemd_watchdog_is_pinged_only_while_frames_flow(tmp_path: Path, mosquitto: str,
                                                           toy_bundle: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    cam = FifoCamera(tmp_path / "cam0.mjpeg")
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-sd
state_dir: {tmp_path / 'state'}
cameras:
  - {{id: cam0, source: {cam.path}, live: true, stale_timeout_s: 30}}
""", encoding="utf-8")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000",
           "OPENCV_FFMPEG_CAPTURE_OPTIONS": "probesize;4096|analyzeduration;0"}
    proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle, "--mqtt", mosquitto],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)

    def received(seconds: float) -> list[str]:
        out: list[str] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                out.append(notify.recv(4096).decode())
        return out

    try:
        flowing = received(3.0)
        cam.stalled.set()  # frames stop (the read blocks; stale_timeout_s is long, so no reopen either)
        received(0.6)  # let the ping already due go out
        stalled = received(2.0)
        proc.send_signal(signal.SIGTERM)
        rest = received(2.0)
        proc.communicate(timeout=30)
    finally:
        cam.stop()
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert any(m.startswith("READY=1") and "STATUS=station st-sd" in m for m in flowing), flowing
    assert sum(m == "WATCHDOG=1" for m in flowing) >= 3, flowing  # every 0.2 s while frames flow
    assert "WATCHDOG=1" not in stalled, stalled  # silent once no frame is scored: systemd would restart it
    assert "STOPPING=1" in rest


def test_the_systemd_unit_uses_notify_watchdog_and_restart_on_failure() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "deploy" / "edge-run.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0 and service["RestartPreventExitStatus"] == "2"
    from edge.pipeline import EXIT_WORKER_DIED
    assert str(EXIT_WORKER_DIED) not in service["RestartPreventExitStatus"].split()  # a dead worker is restarted
    assert "edge-run --config" in service["ExecStart"] and service["KillSignal"] == "SIGTERM"
