"""One place builds the station from its config: bundle, backend, batch size, outbox, sinks, collection,
metrics, the live page, bundle watcher and the commands operators may send, each handed to the constructor that
needs it.

``edge-run`` (edge/cli.py) parses its arguments into a config and :class:`StationOptions`, calls
:func:`build_station`, and runs the result; benchmarks/pipeline.py does the same in-process. Every failure a
user can fix is a one-line UserError, and the cheap checks (config, sink URLs) come before anything heavy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.backend import Backend
from core.bundle import Bundle, load_bundle
from core.errors import UserError
from core.site_calibration import calibration_path
from edge.backends import create_backend
from edge.batchsize import BatchSize, fastest_batch
from edge.calibration import SiteThreshold
from edge.collect import Collection, collect_root, open_collection
from edge.config import StationConfig
from edge.health import Metrics, StationGauges
from edge.live import LiveFeed, LiveServer
from edge.outbox import Outbox, open_outbox
from edge.pipeline import Station
from edge.sinks import CommandHandler, Sink, SinkContext, check_sink_settings, create_sinks
from edge.stats import StationStats
from edge.swap import BundleWatcher

log = logging.getLogger("edge")


@dataclass
class StationOptions:
    """What the command line adds to the config for one run."""

    engine: Optional[str] = None  # bundle folder, model folder or model name; else the config's engine.model
    max_frames: Optional[int] = None  # stop after this many processed frames per camera
    calibrate: Optional[int] = None  # on-site calibration on the first N scored frames


class BackendMaker:
    """Builds the backend for a bundle at the station's batch size (the start, and every swapped-in bundle)."""

    def __init__(self, cfg: StationConfig, batch: BatchSize) -> None:
        self.cfg = cfg
        self.batch = batch

    def __call__(self, bundle: Bundle) -> Backend:
        e = self.cfg.engine
        return create_backend(e.backend, bundle, max_batch=min(self.batch.size, bundle.max_batch or 1 << 30),
                              intra_op_threads=e.intra_op_threads, spinning=e.intra_op_spinning,
                              need_map=self.cfg.snapshots or bool(self.cfg.live.port),  # the page draws the map
                              precision=e.tensorrt_precision, dla_core=e.dla_core)


def build_station(cfg: StationConfig, options: StationOptions) -> Station:
    """The station ``cfg`` describes, cameras opened and batch size chosen, ready to ``run()``; its sinks are
    built but not started."""
    if not cfg.cameras:
        raise UserError("no camera: pass --camera SOURCE or list cameras in the config")
    check_sink_settings(cfg)
    ref = options.engine or cfg.engine.model
    if not ref:
        raise UserError("no model: pass --engine BUNDLE_DIR|MODEL_NAME or set engine.model in the config")
    bundle = load_bundle(ref, Path(cfg.engine.engines_dir))
    batch = BatchSize(_batch_limit(cfg, bundle))
    c = cfg.calibration
    site = SiteThreshold(calibration_path(cfg.state_dir, cfg.station), cfg.engine.threshold, c.quantile, c.margin,
                         c.sigmas, calibrate_frames=options.calibrate, warm_up_frames=c.warm_up_frames,
                         labels_dir=collect_root(cfg))  # operators' labelled events, wherever collect.dir puts them
    make_backend = BackendMaker(cfg, batch)
    backend = make_backend(bundle)
    outbox = open_outbox(cfg.state_dir, cfg.station, cfg.sinks, cfg.spool.max_bytes, cfg.spool.max_age_s)
    live: Optional[LiveServer] = None
    try:
        live = _live_page(cfg)
        collection = open_collection(cfg, cfg.events.n)
        watcher = None
        if Path(ref).resolve() != bundle.path.resolve():  # a model folder or name: follow its `current`
            watcher = BundleWatcher(bundle.path.parent, bundle.version, make_backend, cfg.engine.watch_interval_s)
        sinks = create_sinks(SinkContext(cfg, outbox, _commands(collection, watcher)))
        stats = StationStats(cfg.station, backend.name, bundle.model_name, bundle.version, batch)
        station = Station(cfg, bundle, backend, outbox, sinks, site, batch, stats, collection=collection,
                          metrics=_metrics(cfg, stats, outbox, sinks), watcher=watcher, max_frames=options.max_frames,
                          live=live)
        if live is not None:
            live.start(station)  # from here on: the cameras' states while they open
        if outbox.depth:
            log.info("spool: %d message(s) from earlier runs not yet acknowledged; they are sent first",
                     outbox.depth)
        station.end_events_left_open()
        station.open_cameras()
        if cfg.engine.auto_batch and batch.size > 1:  # after the cheap checks: bad input fails at once
            station.use_batch(fastest_batch(backend, bundle.input_hw, batch.size))
    except BaseException:
        if live is not None:
            live.close()
        outbox.close()
        raise
    _log_startup(station)
    station.site.tell()
    return station


def _batch_limit(cfg: StationConfig, bundle: Bundle) -> int:
    """engine.max_batch, within what the bundle was exported for."""
    if bundle.max_batch is not None and cfg.engine.max_batch > bundle.max_batch:
        log.warning("engine.max_batch %d is above the %d frames this bundle was exported for; using %d",
                    cfg.engine.max_batch, bundle.max_batch, bundle.max_batch)
        return bundle.max_batch
    return cfg.engine.max_batch


def _commands(collection: Optional[Collection], watcher: Optional[BundleWatcher]) -> dict[str, CommandHandler]:
    """What operators may ask of the station (``cmd/<name>`` on MQTT): a verdict on a collected event, a reload."""
    commands: dict[str, CommandHandler] = {}
    if collection is not None:
        commands["label"] = collection.on_label_message
    if watcher is not None:
        commands["reload"] = lambda payload: watcher.request_reload()
    return commands


def _metrics(cfg: StationConfig, stats: StationStats, outbox: Outbox, sinks: list[Sink]) -> Optional[Metrics]:
    """The Prometheus endpoint, serving, when health.prometheus_port is set."""
    if not cfg.health.prometheus_port:
        return None
    mqtt = next((s for s in sinks if s.name == "mqtt"), None)
    metrics = Metrics(stats, StationGauges(
        spool_depth=lambda: outbox.depth, spool_dropped=lambda: outbox.dropped_total,
        mqtt_connected=lambda: mqtt is not None and mqtt.connected,
        mqtt_reconnects=lambda: int(getattr(mqtt, "reconnects", 0)),
        spool_degraded=lambda: outbox.state != "ok", spool_not_kept=lambda: outbox.not_kept))
    metrics.serve(cfg.health.prometheus_bind, cfg.health.prometheus_port)
    return metrics


def _live_page(cfg: StationConfig) -> Optional[LiveServer]:
    """The live page's server, its port bound and its certificate loaded (not serving yet), when live.port (or
    edge-run --http) is set."""
    if not cfg.live.port:
        return None
    return LiveServer(cfg.live, LiveFeed(cfg.live.events))


def _log_startup(station: Station) -> None:
    cfg, bundle, backend = station.cfg, station.bundle, station.backend
    selection = getattr(backend, "selection", "")
    graph = getattr(backend, "path", None)  # ONNX Runtime: the score-only graph or the full one
    log.info("station '%s': %d camera(s), model %s %s, backend %s%s%s, %s, %s%s",
             cfg.station, len(cfg.cameras), bundle.model_name, bundle.version, backend.name,
             f" ({selection})" if selection else "", f" on {Path(graph).name}" if graph else "",
             station.site.startup_text(station.choice), ", ".join(s.describe() for s in station.sinks),
             f", {station.collection.describe()}" if station.collection is not None else "")
