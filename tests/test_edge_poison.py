"""Poison messages from the network (issue 21, items 1 and 8): a command nested 2 000 deep, a 10 MB string,
invalid UTF-8 or control characters is acknowledged and dropped with a count on every command topic; the
station keeps answering commands and publishing events, also after a restart on the same persistent session
(the broker must not bring the poison back); nothing network-provided is logged whole."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from edge_helpers import Collector, Mosquitto, cli_command, free_port, make_toy_bundle, write_video
from paho.mqtt.enums import CallbackAPIVersion

from core.payloads import payload_problem
from edge.collect import Collection
from edge.config import CollectConfig, MqttConfig
from edge.labels import LabelError, check_verdict
from edge.mqtt import parse_mqtt_url
from edge.outbox import Outbox
from edge.sinks.mqtt import MqttSink

POISON = {
    "deep": b"[" * 2000 + b"]" * 2000,
    "deep-object": b'{"a":' * 2000 + b"1" + b"}" * 2000,
    "huge": json.dumps({"event_id": "x" * 10_000_000, "verdict": "good"}).encode(),
    "not-utf8": b'{"event_id": "\xff\xfe\xfd", "verdict": "good"}',
    "control": b'{"event_id": "a\x00b", "verdict": "good"}',
}
EVENT_ID = "6f1c0000-0000-4000-8000-000000000000"


# -- item 8: what is logged of a network field, and the kind check -------------------------------------
def test_a_kind_with_a_trailing_newline_is_refused() -> None:
    assert check_verdict("defect", "scratch") == "scratch"
    with pytest.raises(LabelError, match="defect kind"):
        check_verdict("defect", "scratch\n")
    body = {"event_id": EVENT_ID, "verdict": "defect", "kind": "scratch"}
    assert payload_problem("label", body) is None  # the schema too: a pattern is a search, "$" alone lets "\n" by
    assert payload_problem("label", {**body, "kind": "scratch\n"}) is not None
    assert payload_problem("label", {**body, "event_id": EVENT_ID + "\n"}) is not None


def test_a_10_mb_event_id_in_cmd_label_is_not_logged_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    collection = Collection(CollectConfig(), tmp_path, "st", ["cam0"], window_n=5)
    caplog.set_level(logging.WARNING)
    for body in ({"event_id": "x" * 10_000_000, "verdict": "good"}, {"event_id": "y" * 1000, "verdict": "good"},
                 {"event_id": EVENT_ID, "verdict": "defect", "kind": "z" * 1000}):
        collection.on_label_message(json.dumps(body).encode())
    lines = [r.getMessage() for r in caplog.records if "ignored cmd/label" in r.getMessage()]
    assert len(lines) == 3 and all(len(line) < 400 for line in lines), [len(line) for line in lines]
    assert "too large" in lines[0] and "… (" in lines[1] + lines[2]
    assert collection.messages_ignored == 3


# -- the sink against a real broker ------------------------------------------------------------------------
def _publish_all(url: str, items: list[tuple[str, bytes]]) -> None:
    """Publish each (topic, payload) with QoS 1 and wait for every PUBACK."""
    u = parse_mqtt_url(url)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"poisoner-{time.monotonic_ns()}")
    client.connect(u.host, u.port)
    client.loop_start()
    try:
        for topic, payload in items:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _wait(pred: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_poison_on_every_command_topic_is_acked_dropped_and_counted(tmp_path: Path, mosquitto_bin: str) -> None:
    broker = Mosquitto(tmp_path / "broker", free_port(), mosquitto_bin, persistent=True,
                       conf="message_size_limit 0\n")
    try:
        base = "anomaly/st-poison"
        got: list[tuple[str, bytes]] = []
        handled = threading.Event()

        def handler(name: str) -> Any:
            def run(payload: bytes) -> None:
                got.append((name, payload))
                handled.set()
            return run

        def sink_for_run() -> tuple[MqttSink, Outbox]:
            outbox = Outbox(tmp_path / "outbox.db", ["mqtt"], 2**26, 86400)
            cfg = MqttConfig(url=broker.url, client_id="edge-st-poison", stats_interval_s=1, flush_timeout_s=3)
            return MqttSink(cfg, "st-poison", outbox, {"reload": handler("reload"), "label": handler("label")}), outbox

        sink, outbox = sink_for_run()
        sink.start()
        assert sink.wait_first_attempt(10)
        time.sleep(0.3)  # subscribed (the session keeps the subscription from here on)
        sink.stop()
        outbox.close()
        # while the station is away, poison is queued for its persistent session on every command topic
        poison = [(f"{base}/cmd/{cmd}", body) for cmd in ("reload", "label", "selfdestruct")
                  for body in POISON.values()]
        _publish_all(broker.url, poison)
        for run in range(2):
            sink, outbox = sink_for_run()
            sink.start()
            assert sink.wait_first_attempt(10)
            if run == 0:
                refused_all = partial(lambda s: s.commands_refused + s.commands_ignored >= len(poison), sink)
                assert _wait(refused_all), sink.counters()
            _publish_all(broker.url, [(f"{base}/cmd/reload", b""), (f"{base}/cmd/label", b'{"verdict": "good"}')])
            assert _wait(partial(lambda n: len(got) >= n, 2 * (run + 1))), got
            outbox.add_event("cam0", lambda seq: {"event_id": EVENT_ID, "type": "start", "seq": seq})
            sink.wake()
            assert sink.flush(10) == 0  # the PUBACK came: paho's thread reads
            assert sink.failure() is None
            counts = sink.counters()
            sink.stop()
            outbox.close()
            if run == 0:
                assert counts["commands_refused"] == 2 * len(POISON), counts  # reload and label: refused
                assert counts["commands_ignored"] == len(POISON), counts  # an unknown command: ignored
            else:  # the same session after a restart: the broker had its PUBACKs, nothing comes back
                assert counts["commands_refused"] == 0 and counts["commands_ignored"] == 0, counts
            assert counts["callback_errors"] == 0, counts
        assert [name for name, _ in got] == ["reload", "label"] * 2
    finally:
        broker.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_failure_names_a_dead_network_thread(tmp_path: Path, mosquitto: str) -> None:
    outbox = Outbox(tmp_path / "outbox.db", ["mqtt"], 2**26, 86400)
    sink = MqttSink(MqttConfig(url=mosquitto, client_id="edge-st-dead"), "st-dead", outbox)
    sink.start()
    try:
        assert sink.wait_first_attempt(10) and sink.failure() is None

        def unguarded(*_: Any) -> None:
            raise RuntimeError("a callback nobody guarded")

        sink.client.on_subscribe = unguarded  # paho lets this one end its thread, as an unguarded callback would
        sink.client.subscribe("anomaly/st-dead/x", qos=1)
        assert _wait(lambda: sink.failure() is not None, 10)
        assert "network thread" in (sink.failure() or "")
    finally:
        sink.stop()
        outbox.close()


def test_the_mqtt_sender_survives_an_outbox_error(tmp_path: Path, mosquitto: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path / "outbox.db", ["mqtt"], 2**26, 86400)
    sink = MqttSink(MqttConfig(url=mosquitto, client_id="edge-st-sender"), "st-sender", outbox)
    sink.start()
    try:
        assert sink.wait_first_attempt(10)
        # a record paho refuses to publish (a wildcard in its topic): the sender's work raises
        outbox.add_event("cam+0", lambda seq: {"event_id": EVENT_ID, "type": "start", "seq": seq})
        sink.wake()
        time.sleep(2.5)  # retried every second
        assert sink._sender.is_alive() and sink.failure() is None
        lines = [r.getMessage() for r in caplog.records if "sending from the outbox failed" in r.getMessage()]
        assert len(lines) == 1 and sink.counters()["callback_errors"] >= 1, lines
    finally:
        sink.stop()
        outbox.close()


# -- the whole station ----------------------------------------------------------------------------------
def _dropped_in_stats(message: Any) -> int:
    """Command messages a stats message (that satisfies the stats schema) counts as dropped: refused by the bounded
    check (reload) or ignored as unknown (label without collection, x); -1 for anything else."""
    if not message.topic.endswith("/stats"):
        return -1
    stats = json.loads(message.payload)
    assert payload_problem("stats", stats) is None, payload_problem("stats", stats)
    mqtt_stats = stats["sinks"]["mqtt"]
    if mqtt_stats.get("commands_refused", 0) < len(POISON):
        return -1
    return int(mqtt_stats["commands_refused"] + mqtt_stats["commands_ignored"])


def test_a_station_answers_and_publishes_after_poison_also_after_a_restart(tmp_path: Path, mosquitto_bin: str) -> None:
    """edge-run on a persistent session: poison on every command topic, then a reload and a defect; stopped
    and started again on the same session: it answers again, the poison does not come back."""
    broker = Mosquitto(tmp_path / "broker", free_port(), mosquitto_bin, persistent=True,
                       conf="message_size_limit 0\n")
    engines = tmp_path / "engines"
    make_toy_bundle(engines)
    fifo_video = write_video(tmp_path / "v.avi", [(40, 60)], 100, fps=10.0)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"station: st-pz\nstate_dir: {tmp_path / 'state'}\nengine:\n  engines_dir: {engines}\n"
                   f"  watch_interval_s: 0\ncameras:\n  - id: cam0\n    source: {fifo_video}\n    max_fps: 20\n"
                   f"mqtt:\n  stats_interval_s: 0.5\n  flush_timeout_s: 5\n", encoding="utf-8")
    base = "anomaly/st-pz"
    try:
        for run in range(2):
            with Collector(broker.url, [f"{base}/+/event", f"{base}/status", f"{base}/stats"]) as col:
                proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", "toy",
                                         "--mqtt", broker.url], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
                try:
                    assert col.wait_for(lambda ms: any(m.payload == b"online" for m in ms), timeout=30)
                    if run == 0:
                        _publish_all(broker.url, [(f"{base}/cmd/{cmd}", body) for cmd in ("reload", "label", "x")
                                                  for body in POISON.values()])
                    _publish_all(broker.url, [(f"{base}/cmd/reload", b"{}")])
                    assert col.wait_for(lambda ms: sum(m.topic.endswith("/event") for m in ms) >= 2, timeout=60)
                    if run == 0:  # the published stats count what was refused (and are valid stats)
                        assert col.wait_for(lambda ms: any(_dropped_in_stats(m) >= 3 * len(POISON) for m in ms),
                                            timeout=30)
                    _, err = proc.communicate(timeout=60)
                finally:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(10)
            assert proc.returncode == 0, err
            assert "Traceback" not in err and "not acknowledged" not in err, err
            assert "command reload received" in err, err
            refused = [ln for ln in err.splitlines() if "refused command" in ln]
            if run == 0:
                causes = {"too deep", "too large", "not UTF-8", "control character"}
                assert {c for c in causes if any(c in ln for ln in refused)} == causes, refused
                assert "x" * 100 not in err and all(len(ln) < 400 for ln in refused), "a payload was logged whole"
            else:
                assert not refused, refused  # acknowledged in the first run: never redelivered
            events = [json.loads(m.payload) for m in col.messages if m.topic.endswith("/event")]
            assert {e["type"] for e in events} == {"start", "end"}
    finally:
        broker.stop()
