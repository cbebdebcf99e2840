"""``edge-run`` (the station) and ``edge-events`` (a subscriber that prints events as JSON lines).

Every problem a user can fix ends as one line ``edge-run: error: ...`` and exit 2, never a traceback.
Exit codes of edge-run: 0 clean stop, 2 bad input, 3 events not delivered before the flush timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Optional, Sequence

from core.cli import OneLineArgumentParser, positive_float, positive_int
from core.errors import UserError
from core.logs import setup_logging

if TYPE_CHECKING:  # the station's modules load only when edge-run runs (edge-events needs none of them)
    from edge.config import StationConfig
    from edge.pipeline import Station

log = logging.getLogger("edge")

EXIT_UNDELIVERED = 3
_CAMERA_ID_RE = re.compile(r"^([A-Za-z0-9_.:-]+)=(.+)$")


# Examples: after `make demo` (demo-out/ and a model folder under engines/ exist) with the shipped config; each
# line must parse with its parser (tests/test_cli_help.py). The station knows no model by name: MODEL is a note.
RUN_EXAMPLES = """examples (MODEL: a model folder under engines/, the one `make demo` trained: ls engines):
  edge-run --camera demo-out/clip.avi --engine MODEL --max-frames 100
  edge-run --config config/station.yaml --engine MODEL --camera 0 --station line3-press
  edge-run --camera demo-out/clip.avi --engine MODEL --http 127.0.0.1:8090"""
LABEL_EXAMPLES = """examples (EVENT_ID: the event_id of the station's event messages):
  edge-run label --config config/station.yaml EVENT_ID defect --kind scratch
  edge-run label --config config/station.yaml EVENT_ID good"""
EVENTS_EXAMPLES = """examples:
  edge-events --mqtt mqtt://127.0.0.1:1884 --station quickstart
  edge-events --config config/station.yaml --count 1 --timeout 60 --ack"""


def _config_default(key: str) -> str:
    """'the config's KEY, else VALUE': what an option that overrides a station.yaml key falls back to."""
    from edge.config import StationConfig

    value: Any = StationConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return f"the config's {key}, else {value}"


def run_parser() -> argparse.ArgumentParser:
    from edge.backends import backend_names

    p = OneLineArgumentParser(prog="edge-run", description="Run a camera station: capture, score with a "
                              "bundle, publish anomaly events over MQTT.",
                              epilog="edge-run label EVENT_ID good|defect [--kind KIND] [--config FILE]: an "
                              "operator's verdict on a collected event (see edge-run label --help).\n\n"
                              + RUN_EXAMPLES)
    p.add_version()
    p.add_argument("--camera", action="append", metavar="SOURCE",
                   help="camera index (0), video file, folder of images, rtsp:// or http:// URL, or a "
                        "GStreamer pipeline (contains '!'); ID=SOURCE names the camera; repeat for several "
                        "cameras; replaces the config's camera list (default: the config's cameras)")
    p.add_argument("--config", metavar="FILE", help="station config (YAML, see config/station.yaml); "
                   "without it every key has its default")
    p.add_argument("--engine", metavar="BUNDLE_DIR|MODEL_NAME",
                   help="bundle folder, model folder (its 'current' version) or model name under engine.engines_dir "
                        "(default: the config's engine.model)")
    p.add_argument("--mqtt", metavar="URL", help="broker, mqtt://host:port or mqtts://host:port "
                   f"(default: {_config_default('mqtt.url')})")
    p.add_argument("--station", metavar="ID", help="station id (an MQTT topic level) "
                   f"(default: {_config_default('station')})")
    p.add_argument("--backend", choices=backend_names(), help="inference backend (auto: the best that runs here) "
                   f"(default: {_config_default('engine.backend')})")
    p.add_argument("--max-frames", type=positive_int, metavar="N",
                   help="stop after N processed frames per camera, close open events, flush, exit "
                        "(default: run until stopped or the sources end)")
    p.add_argument("--calibrate", type=positive_int, metavar="N",
                   help="on-site calibration: the first N frames scored (all cameras) are good parts; they set "
                        "this station's threshold for the running bundle version (kept in state_dir), no events "
                        "until done")
    p.add_argument("--http", type=http_address, metavar="HOST:PORT",
                   help="serve the live page (frames, heat map, scores, events, stats) on HOST:PORT, e.g. "
                        "127.0.0.1:8090; 'off' turns it off; overrides live.bind and live.port, see "
                        "config/station.yaml for auth and TLS (default: the config's live.bind and live.port, else "
                        "off)")
    p.add_argument("--state-dir", metavar="DIR", help="where the event spool (and the event seq) is kept "
                   f"(default: {_config_default('state_dir')})")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="overrides logging.level "
                   f"(default: {_config_default('logging.level')})")
    return p


def http_address(text: str) -> tuple[str, int]:
    """``--http HOST:PORT`` (``[::1]:8090`` for IPv6) as (host, port); ``off`` as ("", 0)."""
    if text == "off":
        return "", 0
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8090) or off, got {text!r}")
    return host, int(port)


def _cameras_from_cli(specs: Sequence[str], configured: list) -> list:
    """``--camera`` replaces the config's list; camera i inherits settings (and id) of config camera i,
    except ``live`` and ``kind``, which are decided again from the new source string."""
    from dataclasses import replace

    from edge.config import CameraConfig

    cams = []
    for i, spec in enumerate(specs):
        m = _CAMERA_ID_RE.match(spec)
        cam_id, source = (m.group(1), m.group(2)) if m and "!" not in spec else (None, spec)
        base = configured[i] if i < len(configured) else CameraConfig(id=f"cam{i}")
        cams.append(replace(base, id=cam_id or base.id, source=source, kind=None, live=None))
    return cams


def station_config(args: argparse.Namespace) -> StationConfig:
    """The config file with the command line's overrides, checked; logging set up at its level."""
    from edge.config import load_station_config

    cfg = load_station_config(args.config)
    if args.station:
        cfg.station = args.station
    if args.camera:
        cfg.cameras = _cameras_from_cli(args.camera, cfg.cameras)
    if args.mqtt:
        cfg.mqtt.url = args.mqtt
    if args.backend:
        cfg.engine.backend = args.backend
    if args.state_dir:
        cfg.state_dir = args.state_dir
    if args.log_level:
        cfg.logging.level = args.log_level
    if args.http:
        host, cfg.live.port = args.http
        cfg.live.bind = host or cfg.live.bind
    where = f"{args.config}: " if args.config else ""
    try:
        cfg.validate()
        cfg.live.validate()
        for cam in cfg.cameras:
            cam.validate()
    except ValueError as exc:
        raise UserError(f"{where}{exc}") from None
    setup_logging(cfg.logging.level)
    return cfg


def build_from_args(args: argparse.Namespace) -> Station:
    """edge-run's station from its parsed arguments (edge.assembly.build_station); every failure is a UserError."""
    from edge.assembly import StationOptions, build_station

    cfg = station_config(args)
    return build_station(cfg, StationOptions(engine=args.engine, max_frames=args.max_frames,
                                             calibrate=args.calibrate))


def _run(args: argparse.Namespace) -> int:
    station = build_from_args(args)
    cfg = station.cfg
    signals_seen = 0

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            raise KeyboardInterrupt
        log.info("%s received: stopping cleanly", signal.Signals(signum).name)
        station.request_stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    for sink in station.sinks:
        sink.start()
    for sink in station.sinks:
        sink.wait_first_attempt(5.0)  # so MQTT's 'online' normally precedes the first event; never fatal
    if station.watcher is not None:
        station.watcher.start()
    station.notifier.ready(f"station {cfg.station}: {len(cfg.cameras)} camera(s), model "
                           f"{station.bundle.model_name} {station.bundle.version}")
    try:
        result = station.run()
    finally:
        station.notifier.stopping()
        if station.watcher is not None:
            station.watcher.stop()
        waiting = [f"{sink.describe()} within {sink.flush_timeout_s:g} s" for sink in station.sinks if sink.pending]
        for sink in station.sinks:
            sink.stop()
        station.backend.close()
        station.outbox.close()
    log.info("stopped after %d frames, %d events", result.frames, result.events)
    if station.site.calibrating and station.site.warming_up:
        log.info("warm-up calibration incomplete: nothing stored; the next start warms up again")
    elif station.site.calibrating:
        cal = station.site.calibrator
        assert cal is not None  # calibrating means a calibrator
        print(f"edge-run: error: on-site calibration incomplete: {len(cal.scores)} of the {cal.frames} frames "
              "asked for were scored before the run ended; nothing stored (give a longer stream or a smaller "
              "--calibrate N)", file=sys.stderr)
        return 2
    if result.undelivered:
        by = " and ".join(waiting) or "every sink"
        print(f"edge-run: {result.undelivered} message(s) not acknowledged by {by}; kept in the "
              f"spool ({station.outbox.path}), the next run sends them first", file=sys.stderr)
        return EXIT_UNDELIVERED
    return 0


def label_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="edge-run label", description="An operator's verdict on an event the station "
                              "collected: move its frames from <collect.dir>/events/<event_id> to test/good (a "
                              "false alarm) or test/<kind> (a defect), recording the verdict in their sidecars.",
                              epilog=LABEL_EXAMPLES)
    p.add_argument("event_id", metavar="EVENT_ID", help="the event_id of the station's event messages")
    p.add_argument("verdict", choices=("good", "defect"), help="good: a false alarm; defect: a real defect")
    p.add_argument("--kind", metavar="KIND", help="the defect kind (a-z, 0-9, _ and -), with verdict defect")
    p.add_argument("--config", metavar="FILE", help="the station's config (collect.dir, state_dir, station); "
                   "without it every key has its default")
    p.add_argument("--station", metavar="ID", help="station id (as edge-run --station) "
                   f"(default: {_config_default('station')})")
    p.add_argument("--state-dir", metavar="DIR", help="as edge-run --state-dir "
                   f"(default: {_config_default('state_dir')})")
    return p


def _label(args: argparse.Namespace) -> int:
    from edge.collect import collect_root
    from edge.config import load_station_config
    from edge.labels import label_event

    cfg = load_station_config(args.config)
    if args.station:
        cfg.station = args.station
    if args.state_dir:
        cfg.state_dir = args.state_dir
    root = collect_root(cfg)
    if not root.is_dir():
        raise UserError(f"no collected frames at {root} (collect.dir); check --config / --station / --state-dir, "
                        "and that the station runs with collect.enabled true")
    result = label_event(root, args.event_id, args.verdict, args.kind)
    print(f"edge-run label: event {args.event_id} labelled {args.kind or args.verdict}: {result.frames} frame(s) "
          f"moved to {result.folder}")
    return 0


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``edge-run`` (``edge-run label ...``: an operator's verdict on a collected event)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["label"]:
        largs = label_parser().parse_args(argv[1:])
        try:
            return _label(largs)
        except UserError as exc:
            print(f"edge-run label: error: {exc}", file=sys.stderr)
            return exc.exit_code
    args = run_parser().parse_args(argv)
    try:
        code = _run(args)
    except UserError as exc:
        print(f"edge-run: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("edge-run: interrupted twice; exiting without flushing", file=sys.stderr)
        code = 130
    return leave_past_blocked_captures(code)


def leave_past_blocked_captures(code: int, grace_s: float = 1.0) -> int:
    """Return ``code``, or exit with it at once when a capture thread is still blocked inside OpenCV.

    Everything that matters (events, spool, SQLite, MQTT) is flushed and closed by now. Left to finalise, the
    interpreter would unwind such a thread the moment its read returns, and OpenCV's ``catch (...)`` turns that
    into "FATAL: exception not rethrown" and SIGABRT: a clean stop reported as a crash to systemd.
    """
    if "edge.sources" not in sys.modules:  # no camera was ever opened
        return code
    from edge.sources import threads_in_opencv

    blocked = threads_in_opencv(grace_s)
    if not blocked:
        return code
    log.info("%d capture thread(s) still blocked in OpenCV; exiting without waiting for them", blocked)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- edge-events ------------------------------------------------------------------------------------
def events_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="edge-events", description="Print a station's anomaly events as JSON lines, "
                              "each checked against the event schema (a failing one is reported on stderr).",
                              epilog=EVENTS_EXAMPLES)
    p.add_version()
    p.add_argument("--mqtt", metavar="URL", help="broker (default: the config's mqtt.url, else mqtt://localhost:1883)")
    p.add_argument("--station", metavar="ID", help="only this station (default: all)")
    p.add_argument("--prefix", metavar="P", help="topic prefix (default: the config's mqtt.prefix, else 'anomaly')")
    p.add_argument("--config", metavar="FILE", help="station config, for credentials / TLS / prefix")
    p.add_argument("--count", type=positive_int, metavar="N", help="exit 0 after N events (default: run until "
                   "stopped)")
    p.add_argument("--timeout", type=positive_float, metavar="S",
                   help="exit after S seconds (non-zero when --count events had not arrived) "
                        "(default: no time limit)")
    p.add_argument("--ack", action="store_true",
                   help="acknowledge each event on {prefix}/{station}/ack once it is printed (for stations with "
                        "mqtt.consumer_ack: they keep and re-send an event until then); an event printed already "
                        "in this run is acknowledged again but not printed twice")
    return p


def _events(args: argparse.Namespace) -> int:
    from core.payloads import PayloadRefused, parse_network_json, payload_problem, shown
    from edge.config import check_topic_level, load_station_config
    from edge.mqtt import new_client, parse_mqtt_url

    cfg = load_station_config(args.config).mqtt
    url = parse_mqtt_url(args.mqtt or cfg.url)
    prefix = args.prefix or cfg.prefix
    if args.station:
        try:
            check_topic_level("station id", args.station)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    topic = f"{prefix}/{args.station or '+'}/+/event"
    client = new_client(f"edge-events-{os.getpid()}", url, cfg)
    done = threading.Event()
    lock = threading.Lock()
    seen = invalid = 0
    printed: set[str] = set()  # --ack: keys printed in this run (a station re-sends until it has the ack)
    acks: list[Any] = []  # --ack: the publishes, waited for before exiting

    def on_connect(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            print(f"edge-events: broker {url} refused the connection ({reason_code})", file=sys.stderr)
            return
        c.subscribe(topic, qos=1)

    def on_subscribe(c: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        print(f"edge-events: subscribed to {topic} on {url}", file=sys.stderr, flush=True)

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        nonlocal seen, invalid
        with lock:
            if done.is_set():
                return
            try:  # bounded: whatever is on the topic, it costs at most a scan of MAX_MESSAGE_BYTES
                payload = parse_network_json(bytes(msg.payload))
                problem = payload_problem("event", payload)
                line = json.dumps(payload, separators=(",", ":"))
            except PayloadRefused as exc:
                payload, problem = None, exc.cause if exc.cause == "not JSON" else str(exc)
            if problem is None and args.ack:
                key = f"{payload['event_id']}:{payload['type']}:{payload['seq']}"
                ack = json.dumps({"keys": [key]}).encode()
                if key in printed:
                    acks.append(c.publish(f"{prefix}/{payload['station']}/ack", ack, qos=1))
                    return
            if problem is not None:  # shown, never dropped silently: a SCADA integrator needs to see it
                invalid += 1
                problem = shown(problem, 200)
                print(f"edge-events: invalid event on {shown(msg.topic)}: {problem}", file=sys.stderr, flush=True)
                line = json.dumps({"topic": shown(msg.topic, 200),
                                   "invalid_payload": shown(bytes(msg.payload).decode("utf-8", "replace"), 1000),
                                   "error": problem})
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            if problem is None and args.ack:  # printed (and flushed): only now is it acknowledged
                printed.add(key)
                acks.append(c.publish(f"{prefix}/{payload['station']}/ack", ack, qos=1))
            seen += 1
            if args.count is not None and seen >= args.count:
                done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(url.host, url.port, keepalive=cfg.keepalive_s)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot connect to MQTT broker {url} ({exc})") from None
    client.loop_start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while not done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            done.wait(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        for info in list(acks):  # the acks reach the broker before we go
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        client.disconnect()
        client.loop_stop()
    if invalid:
        print(f"edge-events: {invalid} of {seen} events did not match the event schema", file=sys.stderr)
    if args.count is not None and seen < args.count and deadline is not None and time.monotonic() >= deadline:
        print(f"edge-events: timeout after {args.timeout:g} s with {seen} of {args.count} events", file=sys.stderr)
        return 1
    return 0


def events_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``edge-events``."""
    args = events_parser().parse_args(argv)
    try:
        return _events(args)
    except UserError as exc:
        print(f"edge-events: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(run_main())
