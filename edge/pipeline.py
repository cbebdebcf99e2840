"""The station loop: capture threads → batcher → backend → per-camera events → outbox → sinks, plus stats.

Inference and event logic run on the calling (main) thread; each camera captures on its own thread;
each sink (MQTT, webhook, …) sends from the outbox on its own threads. ``max_frames`` counts processed frames
PER CAMERA. Every event is committed to the durable outbox (with its seq) before any sink sees it; when the disk
refuses, the outbox hands it to the sinks from memory and the station goes on scoring (spool ``degraded``).

The loop also watches the station's own health every tick: the spool's state (an alarm on the health topic while
it is degraded) and its worker threads (the sinks', the bundle watcher, the collection writer, a live camera's
capture). A worker that died is said in one line, in stats (``workers.failed``) and as a health alarm, and the
station stops cleanly and raises WorkerDied (exit code 4), so that systemd's Restart=on-failure starts it afresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import cv2
import numpy as np

from core.backend import Backend
from core.bundle import Bundle
from core.errors import UserError
from core.events import EventDetector, EventRule, Transition, event_payload
from core.payloads import iso_utc
from core.preprocess import map_on_frame, resize_frame
from edge.batcher import Batcher
from edge.batchsize import BatchSize
from edge.calibration import SiteThreshold, ThresholdChoice
from edge.collect import Collection
from edge.config import StationConfig
from edge.drift import DriftMonitor, health_payload
from edge.health import Metrics, SystemdNotifier, spool_alarm, worker_alarm
from edge.live import LiveServer
from edge.outbox import Outbox
from edge.sinks import Sink
from edge.sources import CameraSource, Frame, FrameQueue, describe_open_failure
from edge.stats import CameraStats, StageClock, StationStats
from edge.swap import BundleWatcher

log = logging.getLogger("edge.pipeline")

EXIT_WORKER_DIED = 4  # edge-run's exit code when a worker thread died (deploy/edge-run.service restarts it)
WORKER_CHECK_S = 0.5  # how often the loop looks at its worker threads


class WorkerDied(UserError):
    """A worker thread of the station died: the run was stopped cleanly; exit non-zero so systemd restarts it."""

    exit_code = EXIT_WORKER_DIED


@dataclass
class _Camera:
    source: CameraSource
    detector: EventDetector
    stats: CameraStats
    drift: DriftMonitor
    recent: deque = field(default_factory=lambda: deque(maxlen=16))  # (index, frame, map) for snapshots
    peak: Optional[tuple[int, Frame, Optional[np.ndarray]]] = None
    done: bool = False
    bad_scores: int = 0


@dataclass
class RunResult:
    frames: int
    events: int
    undelivered: int


def render_snapshot(image: np.ndarray, amap: Optional[np.ndarray], input_hw: tuple[int, int],
                    mode: str) -> bytes:
    """JPEG of the peak frame, with the anomaly map as a heat overlay when the model gives one: placed on the
    frame as the bundle's ``input.resize`` (``mode``) fitted the frame to the model's ``input_hw`` (a letterboxed
    or cropped frame's map stretched over the whole frame would point beside the defect)."""
    if amap is not None and amap.size:
        m = np.asarray(amap, dtype=np.float32)
        m = map_on_frame(m.reshape(m.shape[-2:]) if m.ndim > 2 else m, image.shape[:2], input_hw, mode)
        top = float(m.max())
        scaled = np.clip(m * (255.0 / top), 0, 255).astype(np.uint8) if top > 0 else np.zeros(m.shape, np.uint8)
        heat = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
        image = cv2.addWeighted(image, 0.6, heat, 0.4, 0)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else b""


class Station:
    """One station run, built from its parts (edge/assembly.py builds them from the config); ``open_cameras()``,
    then ``run()``. Optional parts: ``collection`` (frames kept for retraining), ``metrics`` (the Prometheus
    endpoint, reading ``stats``), ``watcher`` (follows a model's ``current`` and hands over new bundles), ``live``
    (the live page, edge/live.py: it is handed each camera's latest scored frame and the events)."""

    def __init__(self, cfg: StationConfig, bundle: Bundle, backend: Backend, outbox: Outbox, sinks: list[Sink],
                 site: SiteThreshold, batch: BatchSize, stats: StationStats, *,
                 collection: Optional[Collection] = None, metrics: Optional[Metrics] = None,
                 watcher: Optional[BundleWatcher] = None, max_frames: Optional[int] = None,
                 live: Optional[LiveServer] = None) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.backend = backend
        self.outbox = outbox
        self.sinks = sinks
        self.site = site
        self.batch = batch  # the one holder of the batch size; use_batch() is its only writer
        self.collection = collection
        self.metrics = metrics
        self.watcher = watcher
        self.live = live
        self.keep_peaks = cfg.snapshots or live is not None  # each event's peak frame: its snapshot, on the page
        self.choice = site.choose(bundle)
        self.threshold = self.choice.threshold
        self.max_frames = max_frames
        self.stop_event = threading.Event()
        self.stats = stats
        self.clock = StageClock()
        self.stats.calibration = {**self.choice.stats(), "calibrating": site.calibrating}
        self.rule = EventRule(threshold=self.threshold, baseline=self.choice.baseline,
                              **dataclasses.asdict(cfg.events))
        cond = threading.Condition()
        self.cameras: dict[str, _Camera] = {}
        for cam_cfg in cfg.cameras:
            queue = FrameQueue(cam_cfg.queue_size, cond)
            keep = cfg.snapshots or cfg.collect.enabled or live is not None  # they show or save captured frames
            src = CameraSource(cam_cfg, bundle.input_hw, queue, keep_original=keep,
                               resize=bundle.input_resize, clock=self.clock)
            if not src.live:
                src.max_frames = max_frames  # a file reads exactly what will be processed
            cam_stats = CameraStats(cam_cfg.id, captured=partial(getattr, src, "captured"),
                                    dropped=partial(getattr, queue, "dropped"),
                                    reconnects=partial(getattr, src, "reconnects"),
                                    connected=partial(getattr, src, "connected"),
                                    stalled=partial(getattr, src, "stalled"),
                                    undecodable=partial(getattr, src, "undecodable", 0),
                                    refits=partial(getattr, src, "refits", 0))
            self.stats.cameras[cam_cfg.id] = cam_stats
            drift = self._drift_monitor(cam_cfg.id)
            cam_stats.scores = drift.stats
            self.cameras[cam_cfg.id] = _Camera(src, EventDetector(self.rule), cam_stats, drift)
        self.batcher = Batcher([c.source.queue for c in self.cameras.values()], batch, cfg.engine.max_wait_ms)
        self.use_batch(batch.size)
        self.notifier = SystemdNotifier()
        self.frames = 0
        self.events = 0
        self.first_scored_at: Optional[float] = None  # time.monotonic() of the first scored frame (start-up time)
        self.first_batch_frames = 0  # frames in that first batch
        self.last_scored_at: Optional[float] = None  # of the latest batch: steady-state rate between the two
        self._spool_state = "ok"  # as last published on the health topic
        self._failures: dict[str, float] = {}  # "<worker>: <cause>" -> when it was seen (wall clock)
        self._next_worker_check = 0.0

    def open_cameras(self) -> None:
        """Open every camera now. A video file that does not open is fatal (a typo); a live camera that is down
        is waited for with back-off in its thread, or fatal when its ``wait_at_start`` is false. All are opened
        at once, so a camera that hangs in its open costs its own stale_timeout_s, not the others' start."""
        opened: dict[str, bool] = {}
        threads = [threading.Thread(target=lambda c=cam: opened.__setitem__(c.source.cam.id, c.source.open()),
                                    daemon=True) for cam in self.cameras.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for cam in self.cameras.values():
            src = cam.source
            if opened.get(src.cam.id):
                log.info("camera '%s': opened %s (%s)", src.cam.id, src.cam.shown_source,
                         "live" if src.live else "file")
                continue
            if not src.live or not src.cam.wait_at_start:
                raise UserError(describe_open_failure(src.cam) + ("" if not src.live else
                                "; cameras[].wait_at_start is false"))
            log.warning("%s; waiting for it (retrying with back-off)", describe_open_failure(src.cam))

    def use_batch(self, size: int) -> None:
        """Score in batches of up to ``size`` frames: the only writer of the BatchSize the batcher and the stats
        read. The cameras' queues then hold at least one full batch between them, and a video file's queue two
        batches: with less, the chosen size never forms (one camera with queue_size 4 ran every batch of 8 at 4
        frames, the slower size), and a file's reader would wait while the engine scores instead of filling the
        next batch. A live camera's share stays as small as that allows: what a lagging station queues beyond it
        is only older frames (8 cameras holding 8 each: p99 320 ms)."""
        self.batch.size = size  # the batcher and the stats read it from there
        share = math.ceil(size / len(self.cameras))
        for cam in self.cameras.values():
            src = cam.source
            src.queue.maxsize = max(src.cam.queue_size, share if src.live else 2 * size)

    def end_events_left_open(self) -> int:
        """Events the previous run had open when it died: end them now (reason ``restart``), so SCADA never
        holds a start without an end. Frame, ts and scores are the last the event reported."""
        left = self.outbox.open_events()
        for camera, last in left:
            def make(seq: int, last: dict = last) -> dict:
                return {**last, "type": "end", "seq": seq, "reason": "restart"}
            payload = self.outbox.add_event(camera, make)
            log.info("event end (restart) camera '%s' seq %d: event %s was open when the last run stopped",
                     camera, payload["seq"], payload["event_id"])
        if left:
            self._wake_sinks()
        return len(left)

    def _wake_sinks(self) -> None:
        for sink in self.sinks:
            sink.wake()

    def request_stop(self) -> None:
        self.stop_event.set()

    def calibrate_now(self, frames: int) -> None:
        """The live page's "calibrate now", between two batches: the on-site calibration --calibrate N runs, on the
        next ``frames`` frames. Not while an event is open (its frames are no good parts; the page refuses too)."""
        open_on = [cam_id for cam_id, cam in self.cameras.items() if cam.detector.is_open]
        if open_on or self.site.calibrating:
            log.warning("calibrate now (live page): not started: %s", f"an event is open on {', '.join(open_on)}"
                        if open_on else "a calibration is already running")
            return
        self.site.start(frames)
        self.stats.calibration = {**self.choice.stats(), "calibrating": True}
        log.info("calibrate now (live page): on-site calibration on the next %d frames (declared good: no events "
                 "until it is done)", frames)

    def _drift_monitor(self, camera: str) -> DriftMonitor:
        d = self.cfg.drift
        return DriftMonitor(camera, self.choice.baseline, self.choice.sigma, d.sigmas, d.sustain_s, d.window)

    def _use(self, choice: ThresholdChoice) -> None:
        """Score against ``choice`` from now on: a new event rule, and drift measured from its baseline (an alarm
        raised against the old one is cleared). Open events must have been ended by the caller."""
        self.choice, self.threshold = choice, choice.threshold
        self.stats.calibration = {**choice.stats(), "calibrating": self.site.calibrating}
        self.rule = EventRule(threshold=choice.threshold, baseline=choice.baseline,
                              **dataclasses.asdict(self.cfg.events))
        had_alarm = any(cam.drift.alarm is not None for cam in self.cameras.values())
        for cam_id, cam in self.cameras.items():
            cam.detector = EventDetector(self.rule)
            cam.drift = self._drift_monitor(cam_id)
            cam.stats.scores = cam.drift.stats
        if self.collection is not None:  # sidecars record the threshold in force (a calibration just finished)
            self.collection.set_model(self.bundle.model_name, self.bundle.version, choice.threshold)
        if had_alarm:
            self._publish_health()

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._publish_health()  # replaces an earlier run's retained alarm: this run has not seen drift yet
        if self.collection is not None:
            self.collection.set_model(self.bundle.model_name, self.bundle.version, self.threshold)
            self.collection.start()
        for cam in self.cameras.values():
            cam.source.start()
        next_stats = time.monotonic() + self.cfg.mqtt.stats_interval_s
        try:
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                batch = self.batcher.next_batch(self.stop_event)
                self.clock.add("queue_wait", time.perf_counter() - t0)
                if batch:
                    self._process(batch)
                ready = self.watcher.take_ready() if self.watcher is not None else None
                if ready is not None:
                    self._swap(*ready)
                if self.live is not None and (asked := self.live.feed.take_calibration()) is not None:
                    self.calibrate_now(asked)
                self.notifier.tick(self.frames)
                now = time.monotonic()
                self._check_health(now)
                if now >= next_stats:
                    self._publish_stats()
                    next_stats = now + self.cfg.mqtt.stats_interval_s
                if self._all_finished(now):
                    break
        finally:
            for cam in self.cameras.values():
                cam.source.stop()
        if self.stop_event.is_set():
            log.info("stop requested: closing open events and flushing")
        for cam_id, cam in self.cameras.items():
            for t in cam.detector.finish("shutdown"):
                self._emit(cam_id, cam, t)
        for cam in self.cameras.values():
            cam.source.join(2.0)
        if self.collection is not None:
            self.collection.close()  # writes what it was handed, bounded
        for sink in self.sinks:  # they deliver side by side: the waits overlap
            sink.flush(0.0 if _sink_failure(sink) else sink.flush_timeout_s)
        undelivered = self.outbox.depth
        self._publish_stats()
        if self.live is not None:
            self.live.close()  # open streams end, the port is released
        if self._failures:
            raise WorkerDied(f"{'; '.join(self._failures)}; stopped after {self.frames} frames and {self.events} "
                             f"events so that systemd restarts the station (exit code {EXIT_WORKER_DIED})")
        return RunResult(frames=self.frames, events=self.events, undelivered=undelivered)

    # -- the station's own health ------------------------------------------------------------------
    def _check_health(self, now: float) -> None:
        """Each tick: the spool's state (cheap: an attribute); twice a second, the worker threads."""
        if self.outbox.state != self._spool_state:
            self._spool_state = self.outbox.state
            self._publish_health()
        if now < self._next_worker_check:
            return
        self._next_worker_check = now + WORKER_CHECK_S
        fresh = [f for f in self.dead_workers() if f not in self._failures]
        if not fresh:
            return
        for failure in fresh:
            self._failures[failure] = time.time()
            log.error("worker died: %s; stopping the station so that systemd restarts it (exit code %d)", failure,
                      EXIT_WORKER_DIED)
        self.stats.failed_workers = list(self._failures)
        self._publish_health()
        self._publish_stats()
        self.request_stop()

    def dead_workers(self) -> list[str]:
        """``"<worker>: <cause>"`` of each worker thread that died; a thread that ended as it should (a video
        file read to its end, a stopped part) is not one."""
        dead = [f"sink {sink.name}: {cause}" for sink in self.sinks if (cause := _sink_failure(sink))]
        if self.watcher is not None and _died(getattr(self.watcher, "_thread", None)):
            dead.append("bundle-watcher: its thread ended (see the log above for why)")
        if self.collection is not None and _died(getattr(self.collection.writer, "_thread", None)):
            dead.append("collect-writer: its thread ended (see the log above for why)")
        for cam_id, cam in self.cameras.items():
            src = cam.source
            if src.live and not cam.done and not self.stop_event.is_set() \
                    and _died(getattr(src, "_thread", None)):
                dead.append(f"capture-{cam_id}: the capture thread of a live camera ended (see the log above)")
        return dead

    def _swap(self, bundle: Bundle, backend: Backend) -> None:
        """Between two batches: end open events (reason model_swap: the threshold changes), then score with the
        new bundle. Frames already captured at the old input size are refitted, never dropped."""
        old = self.bundle
        for cam_id, cam in self.cameras.items():
            for t in cam.detector.finish("model_swap"):
                self._emit(cam_id, cam, t)
        self.backend.close()
        self.bundle, self.backend = bundle, backend
        self._use(self.site.swapped(bundle))
        self.use_batch(min(self.batch.size, backend.max_batch))  # the new backend's capacity may be lower
        for cam in self.cameras.values():
            cam.source.input_hw, cam.source.resize = bundle.input_hw, bundle.input_resize
        self.stats.model, self.stats.model_version = bundle.model_name, bundle.version
        log.info("model swapped: %s %s -> %s %s, %s", old.model_name, old.version, bundle.model_name,
                 bundle.version, self.site.startup_text(self.choice))
        self.site.tell()

    def _process(self, batch: list[Frame]) -> None:
        hw = self.bundle.input_hw
        frames = np.stack([f.image if f.image.shape[:2] == hw else resize_frame(f.image, hw, self.bundle.input_resize)
                           for f in batch])
        t0 = time.perf_counter()
        out = self.backend.infer(frames)
        elapsed = time.perf_counter() - t0
        self.clock.add("inference", elapsed)
        t_events = time.perf_counter()
        self.stats.add_batch(len(batch), elapsed * 1000.0)
        if self.metrics is not None:
            self.metrics.inference_seconds.observe(elapsed)
        scores = out["score"]
        maps = out.get("anomaly_map")
        self.last_scored_at = time.monotonic()
        if self.first_scored_at is None:
            self.first_scored_at, self.first_batch_frames = self.last_scored_at, len(batch)
        for i, f in enumerate(batch):
            cam = self.cameras[f.camera]
            if cam.done:
                continue
            cam.stats.processed += 1
            self.frames += 1
            score = float(scores[i])
            if self.live is not None:  # a reference only: the page draws and encodes it when asked
                self.live.feed.frame(f.camera, f, score, None if maps is None else maps[i])
            if not math.isfinite(score):
                cam.bad_scores += 1
                if cam.bad_scores == 1:
                    log.warning("camera '%s': the model returned a non-finite score at frame %d; such frames "
                                "are skipped", f.camera, f.index)
            elif self.site.calibrating:  # frames the operator declared good: they set the threshold, no events
                choice = self.site.add(score, self.bundle)
                if choice is not None:
                    self._use(choice)
            else:
                if self.keep_peaks:
                    cam.recent.append((f.index, f, None if maps is None else maps[i]))
                was_open = cam.detector.is_open
                transitions = cam.detector.feed(f.index, f.ts, score)
                if self.collection is not None:
                    self.collection.on_frame(f.camera, f, score, cam.detector, transitions)
                if self.keep_peaks and cam.detector.is_open:
                    self._track_peak(cam, was_open)
                for t in transitions:
                    self._emit(f.camera, cam, t)
                if not (was_open or cam.detector.is_open) and cam.drift.feed(f.ts, score):
                    self._drift_changed(cam)
            latency = time.monotonic() - f.t_capture
            self.stats.latency_ms.add(latency * 1000.0)
            if self.metrics is not None:
                self.metrics.latency_seconds.observe(latency)
            if self.max_frames is not None and cam.stats.processed >= self.max_frames:
                cam.done = True
                cam.source.stop()
        self.clock.add("events", time.perf_counter() - t_events)  # event logic, spool writes included

    def _track_peak(self, cam: _Camera, was_open: bool) -> None:
        peak_frame = cam.detector.peak_frame
        if was_open and cam.peak is not None and cam.peak[0] == peak_frame:
            return
        for item in cam.recent:
            if item[0] == peak_frame:
                cam.peak = item
                return

    def _emit(self, cam_id: str, cam: _Camera, t: Transition) -> None:
        def make(seq: int) -> dict:
            return event_payload(t, seq=seq, station=self.cfg.station, camera=cam_id, ts_iso=iso_utc(t.ts),
                                 threshold=self.threshold, model=self.bundle.model_name,
                                 model_version=self.bundle.version, backend=self.backend.name)

        if self.collection is not None and t.type == "end":  # before it is published: a label may follow at once
            self.collection.on_event_end(cam_id, t)
        t0 = time.perf_counter()
        payload = self.outbox.add_event(cam_id, make)
        self.clock.add("spool", time.perf_counter() - t0)
        self._wake_sinks()
        if self.live is not None:
            self.live.feed.event(payload, None if cam.peak is None else (cam.peak[1], t.peak_score, cam.peak[2]))
        if self.metrics is not None:
            self.metrics.events.labels(cam_id, t.type).inc()
        self.events += 1
        self.stats.events_published += 1
        log.info("event %s camera '%s' seq %d frame %d score %.4f peak %.4f", t.type, cam_id, payload["seq"],
                 t.frame, t.score, t.peak_score)
        if t.type == "end" and self.keep_peaks:
            if cam.peak is not None and self.cfg.snapshots:
                _, frame, amap = cam.peak
                jpeg = render_snapshot(frame.snapshot_image(), amap, self.bundle.input_hw, self.bundle.input_resize)
                if jpeg:  # meta: what lets an operator match the picture to its event
                    self.outbox.add_snapshot(cam_id, payload["event_id"], jpeg, {
                        "score": payload["peak_score"], "frame": frame.index, "ts": iso_utc(frame.ts)})
                    self._wake_sinks()
            cam.peak = None

    def _drift_changed(self, cam: _Camera) -> None:
        alarm = cam.drift.alarm
        if alarm is not None:
            log.warning("health: %s", alarm.payload(iso_utc(alarm.since))["message"])
        else:
            log.info("health: camera '%s': score drift cleared (median of recent good frames back within %g σ of "
                     "the calibrated %.4g)", cam.drift.camera, cam.drift.sigmas, cam.drift.baseline)
        self._publish_health()

    def _publish_health(self) -> None:
        alarms = [c.drift.alarm.payload(iso_utc(c.drift.alarm.since)) for c in self.cameras.values()
                  if c.drift.alarm is not None]
        spool = self.outbox.health()
        if spool["state"] != "ok":
            alarms.append(spool_alarm(spool, iso_utc(spool["since"] or time.time())))
        alarms += [worker_alarm(failure, iso_utc(at)) for failure, at in self._failures.items()]
        data = json.dumps(health_payload(self.cfg.station, iso_utc(time.time()), alarms)).encode()
        for sink in self.sinks:
            sink.publish_health(data)

    def _publish_stats(self) -> None:
        mqtt = next((s for s in self.sinks if s.name == "mqtt"), None)  # the stats' mqtt_* fields are its own
        payload = self.stats.as_dict(iso_utc(time.time()), self.outbox.depth, self.outbox.dropped_total,
                                     mqtt is not None and mqtt.connected, getattr(mqtt, "reconnects", 0),
                                     {s.name: s.stats() for s in self.sinks}, spool=self.outbox.health())
        if self.collection is not None:
            payload["collect"] = self.collection.stats()
        data = json.dumps(payload).encode()
        for sink in self.sinks:
            sink.publish_stats(data)

    def _all_finished(self, now: float) -> bool:
        """Every camera reached --max-frames or its file's end, or, once one has, is not delivering (down for
        longer than its stale timeout): one dead camera never keeps the others' run from finishing."""
        running = [c for c in self.cameras.values() if not (c.done or c.source.queue.finished)]
        if not running:
            return True
        if len(running) == len(self.cameras):
            return False
        for c in running:
            down = c.source.down_since
            if down is None or now - down <= c.source.cam.stale_timeout_s:
                return False
        for c in running:
            log.warning("camera '%s': not delivering while the others have finished; ending the run without it "
                        "(%d frames processed)", c.source.cam.id, c.stats.processed)
        return True


def _sink_failure(sink: Sink) -> Optional[str]:
    """The sink's own word on its worker threads (Sink.failure: None while healthy, else a one-line cause)."""
    failure = getattr(sink, "failure", None)
    return failure() if callable(failure) else None


def _died(thread: Optional[threading.Thread]) -> bool:
    """A thread that was started and is no longer alive."""
    return thread is not None and thread.ident is not None and not thread.is_alive()
