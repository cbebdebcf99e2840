"""The sinks registry: a sink is one module with a registered factory; the config's ``sinks`` list picks them, and
each settles outbox records on its own."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from edge_helpers import run_cli, write_video
from paho.mqtt.enums import CallbackAPIVersion

import edge.sinks
from core.errors import UserError
from edge.config import StationConfig
from edge.mqtt import parse_mqtt_url
from edge.outbox import Outbox
from edge.sinks import SinkContext, create_sinks, sink_names

TOY_SINK = '''
from edge.sinks import SinkContext, register_sink


class ListSink:
    """Keeps what it is given: a sink in a dozen lines."""

    name = "list"
    flush_timeout_s = 1.0

    def __init__(self, ctx: SinkContext) -> None:
        self.outbox, self.got = ctx.outbox, []

    def start(self): pass
    def stop(self, timeout=2.0): pass
    def wait_first_attempt(self, timeout): return True
    def publish_stats(self, payload): pass
    def publish_health(self, payload): pass
    def describe(self): return "list"
    def failure(self): return None
    @property
    def connected(self): return True
    @property
    def pending(self): return self.outbox.waiting(self.name)
    def stats(self): return {"depth": self.pending, "delivered": len(self.got), "failed": 0, "connected": True}

    def wake(self):
        for record in self.outbox.pending(self.name, 0, 100):
            self.got.append(record.key)
            self.outbox.ack(record.id, self.name)

    def flush(self, timeout):
        self.wake()
        return self.pending


@register_sink("list")
def list_sink(ctx: SinkContext) -> ListSink:
    return ListSink(ctx)
'''


def test_the_built_in_sinks_are_registered() -> None:
    assert {"mqtt", "webhook"} <= set(sink_names())


def test_a_sink_in_one_new_module_is_chosen_by_the_config_and_settles_on_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink_names()  # the built-in ones discovered before the registry is copied
    monkeypatch.setattr(edge.sinks, "_SINKS", dict(edge.sinks._SINKS))  # the toy leaves no trace
    (tmp_path / "toy_sink_plugin.py").write_text(TOY_SINK, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="unknown sink 'list'"):
        StationConfig(sinks=["mqtt", "list"]).validate()
    importlib.import_module("toy_sink_plugin")
    monkeypatch.delitem(sys.modules, "toy_sink_plugin")
    cfg = StationConfig(sinks=["list", "webhook"])
    cfg.webhook.url = "http://127.0.0.1:9/unused"  # never started here
    cfg.validate()  # the config now knows it: no other edit
    box = Outbox(tmp_path / "s.sqlite", cfg.sinks, max_bytes=10**6, max_age_s=3600)
    toy, hook = create_sinks(SinkContext(cfg, box))
    assert toy.name == "list" and hook.name == "webhook"
    box.add_event("cam0", lambda seq: {"event_id": "e1", "type": "start", "seq": seq})
    assert toy.flush(1.0) == 0 and toy.got == ["e1:start:1"]  # ListSink's own list
    assert box.depth == 1 and hook.pending == 1  # still held for the webhook, which has not delivered it
    box.close()


def test_an_unknown_sink_is_one_line() -> None:
    cfg = StationConfig()
    cfg.sinks = ["kafka"]
    with pytest.raises(UserError, match="unknown sink 'kafka'; choose from .*mqtt"):
        create_sinks(SinkContext(cfg, None))  # type: ignore[arg-type]


def test_a_snapshot_carries_its_event_id_and_score_as_mqtt_user_properties(tmp_path: Path, mosquitto: str,
                                                                           toy_bundle: Path) -> None:
    """edge-run with snapshots: each snapshot's MQTT 5 user properties name its event (id, camera) and the
    peak (score, frame, ts), matching the event's end payload; the JPEG is the payload, unchanged."""
    defects = [(10, 20), (40, 50)]
    video = write_video(tmp_path / "v.avi", defects, 70, fps=10.0)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"station: st-snap\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  snapshots: true\n", encoding="utf-8")
    u = parse_mqtt_url(mosquitto)
    got: list[tuple[str, bytes, dict[str, str]]] = []
    lock = threading.Lock()
    subscribed = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="snap-reader",
                         protocol=mqtt.MQTTv5)

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        props = dict(getattr(msg.properties, "UserProperty", []) or [])
        with lock:
            got.append((msg.topic, bytes(msg.payload), props))

    client.on_connect = lambda c, *_: c.subscribe("anomaly/st-snap/+/+", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(u.host, u.port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", mosquitto],
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(t.endswith("/snapshot") for t, _, _ in got) < 2:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    ends = {e["event_id"]: e for e in (json.loads(p) for t, p, _ in got if t.endswith("/event"))
            if e["type"] == "end"}
    snaps = [(p, props) for t, p, props in got if t.endswith("/snapshot")]
    assert len(ends) == 2 and len(snaps) == 2, (ends, [s[1] for s in snaps])
    for jpeg, props in snaps:
        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"  # a bare JPEG, nothing before or after
        end = ends[props["event_id"]]
        assert props["camera"] == "cam0" == end["camera"]
        assert float(props["score"]) == end["peak_score"]
        a, b = next(d for d in defects if d[0] <= int(props["frame"]) < d[1])  # the peak lies in its defect
        assert a <= end["frame"] and props["ts"].endswith("Z")
