"""Health for operators beyond the stats topic: a Prometheus endpoint (prometheus-client) and systemd
notifications (sdnotify: READY, STATUS, and WATCHDOG only while frames flow, so a station whose cameras all
stopped delivering is restarted by systemd's WatchdogSec=).

Counters and gauges are read from the station's own stats at scrape time (one source of truth, nothing
counted twice); the two latency histograms are observed as frames are processed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import sdnotify
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from core.errors import UserError
from edge.stats import StationStats

log = logging.getLogger("edge.health")

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class StationGauges:
    """What the metrics read from outside StationStats (the spool and the MQTT link)."""

    spool_depth: Callable[[], int]
    spool_dropped: Callable[[], int]
    mqtt_connected: Callable[[], bool]
    mqtt_reconnects: Callable[[], int]
    spool_degraded: Callable[[], bool] = lambda: False
    spool_not_kept: Callable[[], int] = lambda: 0


def spool_alarm(spool: dict[str, Any], since_iso: str) -> dict[str, Any]:
    """The health topic's ``spool_degraded`` alarm from ``Outbox.health()`` (core/schemas/health.schema.json)."""
    return {"kind": "spool_degraded", "since": since_iso, "problem": str(spool["problem"]),
            "not_kept": int(spool["not_kept"]),
            "message": f"the spool cannot store ({spool['problem']}): events still go out from memory but are not "
                       "kept across a restart; free space in state_dir (it recovers by itself)"}


def worker_alarm(failure: str, since_iso: str) -> dict[str, Any]:
    """The health topic's ``worker_failed`` alarm; ``failure`` is ``"<worker>: <cause>"``."""
    worker = failure.split(":", 1)[0]
    return {"kind": "worker_failed", "worker": worker, "since": since_iso,
            "message": f"{failure}; the station stops (exit code 4) so that systemd restarts it"}


class _StationCollector(Collector):
    def __init__(self, stats: StationStats, gauges: StationGauges) -> None:
        self.stats = stats
        self.gauges = gauges

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        cams = s.cameras.items()
        per_camera = [
            ("edge_frames_captured", "Frames read from the camera", lambda c: c.captured()),
            ("edge_frames_processed", "Frames scored", lambda c: c.processed),
            ("edge_frames_dropped", "Oldest frames dropped because inference lagged", lambda c: c.dropped()),
            ("edge_camera_reconnects", "Times the camera was reopened", lambda c: c.reconnects()),
            ("edge_frames_undecodable", "Frames read but not decodable (skipped)", lambda c: c.undecodable()),
            ("edge_camera_refits", "Times the camera's frame size changed mid-stream", lambda c: c.refits()),
        ]
        for name, doc, read in per_camera:
            family = CounterMetricFamily(name, doc, labels=["camera"])
            for cam_id, cam in cams:
                family.add_metric([cam_id], float(read(cam)))
            yield family
        for name, doc, flag in (("edge_camera_connected", "1 while the camera delivers frames", "connected"),
                                ("edge_camera_stalled", "1 while the camera is being recovered", "stalled")):
            gauge = GaugeMetricFamily(name, doc, labels=["camera"])
            for cam_id, cam in cams:
                gauge.add_metric([cam_id], 1.0 if getattr(cam, flag)() else 0.0)
            yield gauge
        g = self.gauges
        yield GaugeMetricFamily("edge_spool_depth", "Messages in the durable spool, not yet acknowledged",
                                value=float(g.spool_depth()))
        yield CounterMetricFamily("edge_spool_dropped", "Unsent messages dropped by the spool's bounds",
                                  value=float(g.spool_dropped()))
        yield GaugeMetricFamily("edge_spool_degraded", "1 while the spool cannot store (full or read-only disk)",
                                value=1.0 if g.spool_degraded() else 0.0)
        yield CounterMetricFamily("edge_spool_not_kept", "Records sent from memory because the spool could not "
                                  "store them", value=float(g.spool_not_kept()))
        yield GaugeMetricFamily("edge_workers_failed", "Worker threads that died (the station then stops)",
                                value=float(len(s.failed_workers)))
        yield GaugeMetricFamily("edge_mqtt_connected", "1 while connected to the broker",
                                value=1.0 if g.mqtt_connected() else 0.0)
        yield CounterMetricFamily("edge_mqtt_reconnects", "Times the broker connection came back",
                                  value=float(g.mqtt_reconnects()))
        yield InfoMetricFamily("edge_model", "The bundle scoring now",
                               value={"model": s.model, "version": s.model_version, "backend": s.backend,
                                      "station": s.station})


class Metrics:
    """The station's Prometheus registry; ``serve`` exposes it over HTTP (localhost unless told otherwise)."""

    def __init__(self, stats: StationStats, gauges: StationGauges) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StationCollector(stats, gauges))
        self.inference_seconds = Histogram("edge_inference_seconds", "Time of one inference call (a batch)",
                                           buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency_seconds = Histogram("edge_capture_to_decision_seconds",
                                         "From a frame's capture to its event decision",
                                         buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.events = Counter("edge_events", "Event messages written to the spool", ["camera", "type"],
                              registry=self.registry)

    def serve(self, bind: str, port: int) -> None:
        try:
            start_http_server(port, addr=bind, registry=self.registry)
        except OSError as exc:
            raise UserError(f"health.prometheus_port {port} on {bind}: cannot listen ({exc.strerror}); choose "
                            "another port or set it to 0 (off)") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", bind, port)


class SystemdNotifier:
    """sd_notify when run by systemd (NOTIFY_SOCKET set); nothing otherwise. WATCHDOG=1 goes out every half
    of WatchdogSec, and only when frames were processed since the previous one."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.interval_s: Optional[float] = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        self._next = 0.0
        self._frames_at_last_ping = -1

    def _send(self, text: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(text)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def tick(self, frames_processed: int) -> None:
        """Called from the station loop; pings the watchdog while frames flow."""
        if self.interval_s is None or not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        if frames_processed > self._frames_at_last_ping:
            self._frames_at_last_ping = frames_processed
            self._send("WATCHDOG=1")
