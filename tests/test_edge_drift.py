"""Drift alarms: the median of recent scores outside events against the calibrated baseline, sustained.

The state machine on its own (a blip is not an alarm; a sustained shift is, once; recovery clears it), then
the real thing: a clip whose light changes half way and comes back, through edge-run and a real Mosquitto,
where the retained ``health`` message is raised and then cleared.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from edge_helpers import Collector, check_payloads, run_cli, validate, wait_stopped, write_lit_video
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.site_calibration import calibration_path, load_site_calibration
from edge.drift import DriftMonitor
from edge.mqtt import parse_mqtt_url


def feed(monitor: DriftMonitor, scores: list[float], t0: float = 0.0, fps: float = 10.0) -> list[tuple[float, bool]]:
    """Feed scores at ``fps`` from ``t0``; (frame time, alarm up) at every change."""
    changes = []
    for i, s in enumerate(scores):
        ts = t0 + i / fps
        if monitor.feed(ts, s):
            changes.append((ts, monitor.alarm is not None))
    return changes


def test_sustained_shift_raises_once_and_recovery_clears() -> None:
    m = DriftMonitor("cam0", baseline=10.0, sigma=1.0, sigmas=2.0, sustain_s=3.0, window=10)
    assert feed(m, [10.0] * 50) == []
    assert m.stats()["p50"] == 10.0 and m.stats()["frames"] == 10 and m.stats()["drift"] is False
    # a 2 s blip (shorter than sustain_s) moves the median, but not for long enough
    assert feed(m, [13.0] * 20 + [10.0] * 30, t0=5.0) == []
    changes = feed(m, [13.0] * 100, t0=10.0)
    assert len(changes) == 1 and changes[0][1] is True
    assert 10.5 + 3.0 <= changes[0][0] <= 10.6 + 3.0 + 1e-9  # median crosses after 6 of 10 frames, then 3 s
    alarm = m.alarm
    assert alarm is not None and alarm.median == 13.0
    payload = alarm.payload("2026-12-01T20:00:00.000Z")
    assert payload["sigmas_away"] == 3.0 and payload["limit_sigmas"] == 2.0 and "camera 'cam0'" in payload["message"]
    assert m.stats()["drift"] is True
    changes = feed(m, [10.0] * 100, t0=20.0)
    assert len(changes) == 1 and changes[0][1] is False and m.alarm is None
    # drift downwards counts too (good parts scoring lower: the threshold is then blind to defects)
    assert [up for _, up in feed(m, [6.0] * 60, t0=30.0)] == [True]


def test_without_a_spread_there_is_no_drift_alarm() -> None:
    for sigma in (None, 0.0):
        m = DriftMonitor("cam0", baseline=0.0, sigma=sigma, sigmas=2.0, sustain_s=0.0, window=5)
        assert not m.enabled and feed(m, [5.0] * 50) == [] and m.stats()["p50"] == 5.0


class RetainedHealth:
    """Subscribes to one station's health topic (MQTT 5, retain-as-published) to see that it is sent retained."""

    def __init__(self, url: str, topic: str) -> None:
        u = parse_mqtt_url(url)
        self.messages: list[tuple[bool, dict]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, options=SubscribeOptions(
            qos=1, retainAsPublished=True))
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = lambda c, u, msg: self.messages.append((bool(msg.retain), json.loads(msg.payload)))
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        assert self._ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_light_that_changes_half_way_raises_and_then_clears_the_retained_health_alarm(
        tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    # 10 fps: frames 0-29 calibrate (good parts, normal light), 60-109 the light is up, from 110 it is back
    clip = write_lit_video(tmp_path / "light.avi", 170, lit=[(60, 110, 16)])
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-drift
state_dir: {tmp_path / 'state'}
engine:
  threshold: 0.9  # far above every frame here: this test is about drift, not events (station.yaml still wins)
drift:
  sigmas: 2.0
  sustain_s: 1.5
  window: 15
mqtt:
  stats_interval_s: 0.2
""")
    health = RetainedHealth(mosquitto, "anomaly/st-drift/health")
    try:
        with Collector(mosquitto, ["anomaly/st-drift/#"]) as col:
            proc = run_cli("edge-run", ["--config", cfg, "--camera", clip, "--engine", toy_bundle, "--mqtt", mosquitto,
                                        "--calibrate", "30"], timeout=120)
            assert proc.returncode == 0, proc.stderr
            wait_stopped(col)
            got = check_payloads(col)  # health payloads validated against core/schemas/health.schema.json
    finally:
        health.close()
    cal = load_site_calibration(calibration_path(tmp_path / "state", "st-drift"))
    assert cal is not None and cal.sigma > 0
    assert got["event"] == []
    states = [(h["ok"], [a["camera"] for a in h["alarms"]]) for h in got["health"]]
    assert states == [(True, []), (False, ["cam0"]), (True, [])], states  # start, raised, cleared
    raised = got["health"][1]["alarms"][0]
    assert raised["sigmas_away"] > 2.0 and raised["baseline"] == round(cal.baseline, 6)
    assert raised["sigma"] == round(cal.sigma, 6) and raised["limit_sigmas"] == 2.0
    assert [retained for retained, _ in health.messages] == [True, True, True]  # published retained, QoS 1
    for _, payload in health.messages:
        validate("health", payload)
    assert "health: camera 'cam0': median score of good frames" in proc.stderr
    assert "score drift cleared" in proc.stderr
    final = got["stats"][-1]
    assert final["calibration"]["source"] == "config" and final["calibration"]["baseline"] == round(cal.baseline, 6)
    assert final["cameras"]["cam0"]["scores"]["drift"] is False
    with Collector(mosquitto, ["anomaly/st-drift/health"]) as late:  # what a dashboard sees now: cleared
        assert late.wait_for(lambda ms: len(ms) >= 1)
        assert late.messages[0].retain and json.loads(late.messages[0].payload)["ok"] is True
