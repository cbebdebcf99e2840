"""A worker thread that dies is never silent: the station says so in one log line, in stats (``workers.failed``)
and as a health alarm, stops cleanly and exits with code 4, so that systemd's Restart=on-failure restarts it
(deploy/edge-run.service). The worker here is a real sink thread, registered by a plugin module, that raises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edge_helpers import Collector, validate, write_video
from test_edge_faults import live_station

from edge.pipeline import EXIT_WORKER_DIED

DYING_SINK = '''
import threading

from edge.sinks import SinkContext, register_sink


class DyingSink:
    """Takes the first record, then its thread raises, as a bug in a sink's sender would."""

    name = "dying"
    flush_timeout_s = 1.0

    def __init__(self, ctx: SinkContext) -> None:
        self.outbox = ctx.outbox
        self.thread = threading.Thread(target=self._run, name="dying-sender", daemon=True)
        self.error = None
        self.seen = threading.Event()

    def _run(self):
        try:
            while not self.outbox.pending(self.name, 0, 1):
                self.seen.wait(0.05)
            raise RuntimeError("the receiver answered something this sink cannot parse")
        except RuntimeError as exc:
            self.error = exc
            raise

    def failure(self):
        if self.thread.ident is not None and not self.thread.is_alive():
            return f"its sender thread died ({self.error})"
        return None

    def start(self): self.thread.start()
    def stop(self, timeout=2.0): pass
    def wake(self): pass
    def wait_first_attempt(self, timeout): return True
    def flush(self, timeout): return self.pending
    def publish_stats(self, payload): pass
    def publish_health(self, payload): pass
    def describe(self): return "dying"
    @property
    def connected(self): return True
    @property
    def pending(self): return self.outbox.waiting(self.name)
    def stats(self): return {"depth": self.pending, "delivered": 0, "failed": 0, "connected": True}


@register_sink("dying")
def dying_sink(ctx: SinkContext) -> DyingSink:
    return DyingSink(ctx)
'''


def test_a_sink_whose_thread_dies_stops_the_station_with_exit_4(tmp_path: Path, mosquitto: str,
                                                                 toy_bundle: Path) -> None:
    (tmp_path / "dying_sink_plugin.py").write_text(DYING_SINK, encoding="utf-8")
    video = write_video(tmp_path / "clip.avi", [(5, 15)], 30, fps=10.0)
    cfg = live_station(tmp_path, "st-dies", video)
    cfg.write_text(cfg.read_text() + "sinks: [mqtt, dying]\n")
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import dying_sink_plugin; "
              "from edge.cli import run_main; sys.exit(run_main(sys.argv[1:]))")
    with Collector(mosquitto, ["anomaly/st-dies/#"]) as col:
        run = subprocess.run([sys.executable, "-c", script, "--config", str(cfg), "--engine", str(toy_bundle),
                              "--mqtt", mosquitto], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert col.wait_for(lambda ms: any(m.topic.endswith("/status") and m.payload == b"stopped" for m in ms),
                            timeout=15)
        messages = list(col.messages)
    err = run.stderr
    assert run.returncode == EXIT_WORKER_DIED == 4, err
    died = [line for line in err.splitlines() if "worker died: sink dying" in line]
    assert len(died) == 1 and "cannot parse" in died[0], err  # one line, with the cause
    final = [line for line in err.splitlines() if line.startswith("edge-run: error:")]
    assert len(final) == 1 and "exit code 4" in final[0], err
    stats = [json.loads(m.payload) for m in messages if m.topic.endswith("/stats")]
    for s in stats:
        validate("stats", s)
    assert any(any("sink dying" in f for f in s["workers"]["failed"]) for s in stats), stats[-1]["workers"]
    health = [json.loads(m.payload) for m in messages if m.topic.endswith("/health")]
    for h in health:
        validate("health", h)
    alarms = [a for h in health for a in h["alarms"] if a["kind"] == "worker_failed"]
    assert alarms and alarms[-1]["worker"] == "sink dying"
    events = [json.loads(m.payload) for m in messages if m.topic.endswith("/event")]
    assert events and events[-1]["type"] == "end"  # stopped cleanly: the open event was ended


def test_a_healthy_run_reports_no_failed_worker(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.avi", [(5, 15)], 30, fps=10.0)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"station: st-ok\nstate_dir: {tmp_path / 'state'}\ncameras:\n  - {{id: cam0, source: {video}}}\n"
                   "mqtt: {stats_interval_s: 0.2}\n", encoding="utf-8")
    with Collector(mosquitto, ["anomaly/st-ok/stats"]) as col:
        run = subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(cfg), "--engine", str(toy_bundle),
                              "--mqtt", mosquitto], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert col.wait_for(lambda ms: len(ms) >= 1, timeout=10)
        last = json.loads(col.messages[-1].payload)
    assert run.returncode == 0, run.stderr
    assert "worker died" not in run.stderr and last["workers"] == {"failed": []}
    assert last["spool"] == "ok" and last["spool_not_kept"] == 0
    assert last["cameras"]["cam0"]["undecodable"] == 0 and last["cameras"]["cam0"]["refits"] == 0


def test_paho_network_thread_that_dies_stops_the_station_with_exit_4(tmp_path: Path, mosquitto: str,
                                                                     toy_engines: Path) -> None:
    """A command handler raising what the MQTT callbacks' guard (Exception) cannot catch kills paho's network
    thread: the station says so, stops and exits 4, and SCADA sees the station go away (the will, 'offline',
    since nothing more reaches the broker)."""
    import paho.mqtt.publish as mqtt_publish

    from edge.mqtt import parse_mqtt_url

    video = write_video(tmp_path / "clip.avi", [(5, 15)], 30, fps=10.0)
    cfg = live_station(tmp_path, "st-deaf", video)
    script = ("import sys; import edge.swap; "
              "edge.swap.BundleWatcher.request_reload = lambda self: (_ for _ in ()).throw(SystemExit('bye')); "
              "from edge.cli import run_main; sys.exit(run_main(sys.argv[1:]))")
    url = parse_mqtt_url(mosquitto)
    with Collector(mosquitto, ["anomaly/st-deaf/status"]) as col:
        proc = subprocess.Popen([sys.executable, "-c", script, "--config", str(cfg), "--engine",
                                 str(toy_engines / "toy"), "--mqtt", mosquitto], cwd=tmp_path,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: any(m.payload == b"online" for m in ms), timeout=30)
            mqtt_publish.single("anomaly/st-deaf/cmd/reload", b"{}", qos=1, hostname=url.host, port=url.port)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert col.wait_for(lambda ms: ms[-1].payload in (b"offline", b"stopped"), timeout=30), \
            [m.payload for m in col.messages]
    assert proc.returncode == EXIT_WORKER_DIED, err
    died = [line for line in err.splitlines() if "worker died: sink mqtt" in line]
    assert len(died) == 1 and "network thread" in died[0], err
