"""Delivery to SCADA end to end (issue 21, item 3): a PUBACK is the broker's word, and a broker that is SIGKILLed
before it saved its store loses what it had acknowledged while the consumer was offline. With
``mqtt.consumer_ack`` the station keeps every event until the consumer acknowledges it (``edge-events --ack``)
and publishes it again meanwhile, so every event arrives; without it, the same crash loses them (the control)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from edge_helpers import Collector, Mosquitto, cli_command, free_port, run_cli, write_video

from core.payloads import payload_problem, validator
from edge.config import MqttConfig
from edge.outbox import Outbox
from edge.sinks.mqtt import MqttSink

DEFECTS = [(5, 15), (45, 55)]


@pytest.mark.parametrize("consumer_ack", [True, False])
def test_a_broker_crash_while_scada_is_offline_loses_nothing_with_consumer_ack(
        tmp_path: Path, mosquitto_bin: str, toy_bundle: Path, consumer_ack: bool) -> None:
    # persistence as many brokers run it: saved now and then, so a crash loses what came since
    broker = Mosquitto(tmp_path / "broker", free_port(), mosquitto_bin,
                       conf=f"persistence true\npersistence_location {tmp_path / 'broker'}/\nautosave_interval 3600\n")
    video = write_video(tmp_path / "v.avi", DEFECTS, 70, fps=10.0)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"station: st-ack\nstate_dir: {tmp_path / 'state'}\nmqtt:\n"
                   f"  consumer_ack: {str(consumer_ack).lower()}\n  ack_timeout_s: 1\n  flush_timeout_s: 60\n"
                   "  reconnect_min_s: 1\n  reconnect_max_s: 1\n",
                   encoding="utf-8")
    try:
        # SCADA subscribed with a persistent session, then went offline: the broker queues the events for it
        Collector(broker.url, ["anomaly/+/+/event"], session="scada").close()
        with Collector(broker.url, ["anomaly/st-ack/+/event"]) as observer:
            station = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--camera", video,
                                        "--engine", toy_bundle, "--mqtt", broker.url], cwd=tmp_path,
                                       stderr=subprocess.PIPE, text=True)
            try:
                def keys() -> set[tuple[str, str, int]]:  # (a station with consumer_ack publishes again)
                    return {(e["event_id"], e["type"], e["seq"]) for e in observer.events()}

                assert observer.wait_for(lambda ms: len(keys()) >= 4, timeout=60), "the station published no events"
                sent = keys()
                broker.kill()  # SIGKILL: the queued events were never saved
                broker.start()
                consumer = run_cli("edge-events", ["--mqtt", broker.url, "--station", "st-ack", "--ack",
                                                   "--count", "4", "--timeout", "20" if consumer_ack else "4"])
                _, err = station.communicate(timeout=90)
            finally:
                if station.poll() is None:
                    station.kill()
    finally:
        broker.stop()
    got = [json.loads(line) for line in consumer.stdout.splitlines()]
    if not consumer_ack:  # the control: PUBACK alone, and the crash lost every event SCADA had not fetched
        assert got == [] and station.returncode == 0, (got, err)
        return
    assert consumer.returncode == 0, consumer.stderr + err
    assert {(e["event_id"], e["type"], e["seq"]) for e in got} == sent and len(got) == 4  # each once
    assert station.returncode == 0 and "Traceback" not in err, err  # 0: nothing left unacknowledged
    assert "events kept until the consumer acknowledges them" in err


def test_an_ack_is_checked_before_it_settles_anything(tmp_path: Path, mosquitto: str) -> None:
    good = "6f1c0000-0000-4000-8000-000000000000:end:12"
    assert payload_problem("ack", {"keys": [good]}) is None
    for bad in ({"keys": []}, {"keys": [good + "\n"]}, {"keys": ["x" * 100]}, {"keys": [good] * 501},
                {"keys": [good], "more": 1}, {"keys": "6f1c"}):
        assert payload_problem("ack", bad) is not None, bad
    validator("ack")
    outbox = Outbox(tmp_path / "o.db", ["mqtt"], 2**20, 3600)
    sink = MqttSink(MqttConfig(url=mosquitto, consumer_ack=True), "st-x", outbox)
    sink._on_ack(b"[" * 5000)
    sink._on_ack(b'{"keys": ["nope"]}')
    assert sink.acks_refused == 2
    outbox.close()
