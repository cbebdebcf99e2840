"""Health numbers for the stats topic: counters, rates and latency percentiles over recent frames.

Percentiles come from a ring of the most recent samples, so they describe the station now rather than
averaged over its whole uptime.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import numpy as np

from edge.batchsize import BatchSize

STATS_SCHEMA_VERSION = 5  # 2: spool_dropped, mqtt_reconnects, cameras.*.stalled; 3: calibration, cameras.*.scores;
# 4: sinks; 5: spool, spool_problem, spool_not_kept, workers, cameras.*.undecodable, cameras.*.refits


class Reservoir:
    """The last ``size`` samples; p50/p99 over them (None when empty)."""

    def __init__(self, size: int = 2048) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(float(value))

    def percentiles(self, *qs: float) -> list[Optional[float]]:
        with self._lock:
            if not self._values:
                return [None for _ in qs]
            arr = np.fromiter(self._values, dtype=np.float64)
        return [round(float(np.percentile(arr, q)), 3) for q in qs]

    def __len__(self) -> int:
        return len(self._values)


class StageClock:
    """Seconds spent per pipeline stage (decode, resize, queue wait, inference, events, spool, publish), summed
    over the run; read by benchmarks/pipeline.py to show where a frame's time goes and what overlaps."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


class Rate:
    """Events per second between two ``snapshot`` calls (the stats interval)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count
        self._last_n = count()
        self._last_t = time.monotonic()

    def snapshot(self) -> float:
        n, t = self._count(), time.monotonic()
        dt = t - self._last_t
        rate = (n - self._last_n) / dt if dt > 0 else 0.0
        self._last_n, self._last_t = n, t
        return round(rate, 2)


class CameraStats:
    """Counters of one camera; capture counters are read from its source."""

    def __init__(self, camera: str, captured: Callable[[], int], dropped: Callable[[], int],
                 reconnects: Callable[[], int], connected: Callable[[], bool], stalled: Callable[[], bool],
                 undecodable: Callable[[], int] = lambda: 0, refits: Callable[[], int] = lambda: 0) -> None:
        self.camera = camera
        self.processed = 0
        self.captured = captured
        self.dropped = dropped
        self.reconnects = reconnects
        self.connected = connected
        self.stalled = stalled
        self.undecodable = undecodable  # frames read but not decodable (skipped)
        self.refits = refits  # times the frame size changed mid-stream
        self._capture_rate = Rate(captured)
        self._processed_rate = Rate(lambda: self.processed)
        # recent scores outside events and the drift alarm (edge.drift.DriftMonitor.stats, set by the station)
        self.scores: Callable[[], dict[str, Any]] = lambda: {"p50": None, "p99": None, "frames": 0, "drift": False}

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": bool(self.connected()),
            "stalled": bool(self.stalled()),
            "capture_fps": self._capture_rate.snapshot(),
            "processed_fps": self._processed_rate.snapshot(),
            "frames_captured": int(self.captured()),
            "frames_processed": int(self.processed),
            "dropped": int(self.dropped()),
            "reconnects": int(self.reconnects()),
            "undecodable": int(self.undecodable()),
            "refits": int(self.refits()),
            "scores": self.scores(),
        }


class StationStats:
    """Everything the stats topic carries (core/schemas/stats.schema.json)."""

    def __init__(self, station: str, backend: str, model: str, model_version: str, batch: BatchSize) -> None:
        self.station = station
        self.backend = backend
        self.model = model
        self.model_version = model_version
        self.batch = batch  # the station's; read, never set here
        self.started = time.monotonic()
        self.cameras: dict[str, CameraStats] = {}
        self.inference_ms = Reservoir()
        self.latency_ms = Reservoir()
        self.batch_sizes = Reservoir(512)
        self.batches = 0
        self.events_published = 0
        self.calibration: dict[str, Any] = {}  # the threshold in force and why (edge.calibration.ThresholdChoice)
        self.failed_workers: list[str] = []  # "<worker>: <cause>" of each worker thread that died (the station stops)

    def add_batch(self, size: int, inference_ms: float) -> None:
        self.batches += 1
        self.batch_sizes.add(size)
        self.inference_ms.add(inference_ms)

    def as_dict(self, ts_iso: str, spool_depth: int, spool_dropped: int, mqtt_connected: bool,
                mqtt_reconnects: int, sinks: Optional[dict[str, dict[str, Any]]] = None,
                spool: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """``sinks``: each sink's depth, delivered, failed and connected (edge.sinks.Sink.stats); ``spool``: the
        outbox's state, problem and not_kept (edge.outbox.Outbox.health)."""
        spool = spool or {"state": "ok", "problem": None, "not_kept": 0}
        inf50, inf99 = self.inference_ms.percentiles(50, 99)
        lat50, lat99 = self.latency_ms.percentiles(50, 99)
        (batch50,) = self.batch_sizes.percentiles(50)
        return {
            "schema": STATS_SCHEMA_VERSION,
            "station": self.station,
            "ts": ts_iso,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "backend": self.backend,
            "model": self.model,
            "model_version": self.model_version,
            "batch_size": {"p50": batch50, "max": self.batch.size, "batches": self.batches},
            "inference_ms": {"p50": inf50, "p99": inf99},
            "latency_ms": {"p50": lat50, "p99": lat99},
            "spool_depth": int(spool_depth),
            "spool_dropped": int(spool_dropped),
            "spool": spool["state"],
            "spool_problem": spool["problem"],
            "spool_not_kept": int(spool["not_kept"]),
            "events_published": self.events_published,
            "mqtt_connected": bool(mqtt_connected),
            "mqtt_reconnects": int(mqtt_reconnects),
            "sinks": dict(sinks or {}),
            "calibration": self.calibration,
            "workers": {"failed": list(self.failed_workers)},
            "cameras": {cid: c.as_dict() for cid, c in self.cameras.items()},
        }
