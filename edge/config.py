"""Station configuration: the dataclasses that config/station.yaml is loaded into.

Loaded with :func:`core.configfile.load_config`, so an unknown key or a wrong type is reported as
``file:line: key ...``. Every key here is documented (with its default) in config/station.yaml.
``Optional[...]`` rather than ``X | None`` because the loader resolves the hints at run time on Python 3.9.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from core.configfile import load_config
from core.events import EventRule

# Credentials inside a source or URL: scheme://user:password@host (up to the LAST '@' before the path, so a
# password holding '@' goes whole; a proxy URL such as http_proxy's is one of these), query parameters and
# element properties that carry a secret (?pass=..&token=.., rtspsrc's user-pw=.. and proxy-pw=..).
_URL_CREDENTIALS_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_PROPERTY_SECRET_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:user|proxy)-pw|password|passwd|pass|pwd|secret|token|access_token|auth|api[_-]?key|key)"
    r"=(\"[^\"]*\"|'[^']*'|[^&;\s\"']+)", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """``text`` with credentials replaced by ``***``: camera, proxy and broker URLs reach logs and MQTT only so."""
    return _PROPERTY_SECRET_RE.sub(r"\1=***", _URL_CREDENTIALS_RE.sub(r"\1***@", text))


# An MQTT topic level: no wildcards, no separators, nothing invisible.
_TOPIC_LEVEL_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def check_topic_level(what: str, value: str) -> None:
    """Station and camera ids become MQTT topic levels, so '+', '#', '/' and spaces are refused."""
    if not _TOPIC_LEVEL_RE.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '_', '.', ':' or '-' "
                         "(it becomes an MQTT topic level)")


@dataclass
class EngineConfig:
    """Which bundle runs, on which backend, and how frames are batched across cameras."""

    model: str = ""
    engines_dir: str = "engines"
    backend: str = "auto"
    threshold: Optional[float] = None
    max_batch: int = 8
    auto_batch: bool = True
    max_wait_ms: float = 20.0
    intra_op_threads: int = 0
    intra_op_spinning: bool = False
    watch_interval_s: float = 2.0
    tensorrt_precision: str = "fp16"
    dla_core: Optional[int] = None

    def validate(self) -> None:
        from edge.backends import backend_names  # the registry: a new backend is a new file in edge/backends/

        if self.backend not in backend_names():
            raise ValueError(f"engine.backend must be one of {', '.join(backend_names())}, got {self.backend!r}")
        if self.tensorrt_precision not in ("fp16", "fp32"):
            raise ValueError(f"engine.tensorrt_precision must be fp16 or fp32, got {self.tensorrt_precision!r}")
        if self.dla_core is not None and (self.dla_core < 0 or self.tensorrt_precision != "fp16"):
            raise ValueError("engine.dla_core must be a DLA core index >= 0 (Jetson Orin: 0 or 1), with "
                             "engine.tensorrt_precision fp16")
        if self.max_batch < 1:
            raise ValueError("engine.max_batch must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("engine.max_wait_ms must not be negative")
        if self.intra_op_threads < 0:
            raise ValueError("engine.intra_op_threads must not be negative (0 = automatic)")
        if self.watch_interval_s < 0:
            raise ValueError("engine.watch_interval_s must not be negative (0 = only on cmd/reload)")


@dataclass
class CameraConfig:
    """One capture source; ``live`` decides drop-oldest + wall clock (camera) or block + file time (file)."""

    id: str = "cam0"
    source: str = "0"
    kind: Optional[str] = None
    live: Optional[bool] = None
    queue_size: int = 4
    stale_timeout_s: float = 5.0
    reopen_initial_s: float = 0.5
    reopen_max_s: float = 30.0
    wait_at_start: bool = True
    reduced_decode: bool = True
    max_fps: Optional[float] = None
    nice: int = 5

    @property
    def shown_source(self) -> str:
        """The source as logs and messages show it: credentials redacted."""
        return redact_secrets(self.source)

    def validate(self) -> None:
        check_topic_level("camera id", self.id)
        if not self.source:
            raise ValueError(f"camera {self.id!r}: source must not be empty")
        if self.kind is not None:
            from edge.sources.registry import source_kinds  # edge.sources imports this module

            if self.kind not in source_kinds():
                raise ValueError(f"camera {self.id!r}: kind must be one of {', '.join(source_kinds())}, "
                                 f"got {self.kind!r}")
        if self.queue_size < 1:
            raise ValueError(f"camera {self.id!r}: queue_size must be at least 1")
        if self.stale_timeout_s <= 0 or self.reopen_initial_s <= 0 or self.reopen_max_s < self.reopen_initial_s:
            raise ValueError(f"camera {self.id!r}: stale_timeout_s and reopen_initial_s must be > 0 and "
                             "reopen_max_s >= reopen_initial_s")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"camera {self.id!r}: nice must be 0..19 (how much lower than inference its capture "
                             "threads run)")
        if self.max_fps is not None and self.max_fps <= 0:
            raise ValueError(f"camera {self.id!r}: max_fps must be greater than 0 (or null: every frame)")


@dataclass
class EventsConfig:
    """Event rule per camera: k of the last n frames open, close_after frames below the close level close."""

    k: int = 3
    n: int = 5
    close_after: int = 10
    hysteresis: float = 0.9
    update_interval_s: float = 5.0
    cooldown_s: float = 2.0
    max_duration_s: Optional[float] = None

    def validate(self) -> None:
        """The event rule itself checks the values, so the config and the state machine never disagree."""
        try:
            EventRule(threshold=1.0, **dataclasses.asdict(self))
        except ValueError as exc:
            raise ValueError(f"events: {exc}") from None


@dataclass
class SiteCalibrationConfig:
    """``edge-run --calibrate N``: the bundle's calibration policy (core/thresholds.py), unless quantile, margin or
    sigmas are set: then the quantile rule of configs from before policies (quantile + margin, mean + sigmas x std)."""

    quantile: Optional[float] = None  # None: the bundle's policy; set (any of the three): the quantile rule
    margin: Optional[float] = None
    sigmas: Optional[float] = None
    warm_up_frames: int = 0  # > 0: a version without on-site calibration calibrates on its first N frames by itself

    def validate(self) -> None:
        if (self.quantile is not None and not 0.5 <= self.quantile <= 1.0) or (self.margin or 0.0) < 0 \
                or (self.sigmas or 0.0) < 0:
            raise ValueError("calibration.quantile must be in [0.5, 1], calibration.margin and calibration.sigmas >= 0")
        if self.warm_up_frames < 0 or self.warm_up_frames == 1:
            raise ValueError("calibration.warm_up_frames must be 0 (off) or at least 2 frames")


@dataclass
class DriftConfig:
    """Drift alarm: the median of the last ``window`` scores outside events, ``sigmas`` σ off for ``sustain_s``."""

    sigmas: float = 2.0
    sustain_s: float = 60.0
    window: int = 300

    def validate(self) -> None:
        if self.sigmas <= 0 or self.sustain_s < 0 or self.window < 1:
            raise ValueError("drift.sigmas must be > 0, drift.sustain_s >= 0 and drift.window at least 1")


@dataclass
class TlsConfig:
    """TLS for mqtts:// URLs; the key password may come from an environment variable."""

    ca_certs: Optional[str] = None
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    keyfile_password_env: Optional[str] = None
    insecure: bool = False


@dataclass
class MqttConfig:
    """Broker connection and what is published (see docs/mqtt.md, the MQTT contract)."""

    url: str = "mqtt://localhost:1883"
    prefix: str = "anomaly"
    client_id: str = ""
    username: Optional[str] = None
    password_env: Optional[str] = None
    password_file: Optional[str] = None
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 4
    refused_retry_s: int = 60
    session_expiry_s: int = 86400
    status_lease_s: int = 45
    max_inflight: int = 20
    tls: TlsConfig = field(default_factory=TlsConfig)
    snapshots: bool = False
    stats_interval_s: float = 10.0
    flush_timeout_s: float = 10.0
    consumer_ack: bool = False
    ack_timeout_s: float = 30.0

    def validate(self) -> None:
        if self.ack_timeout_s < 1:
            raise ValueError("mqtt.ack_timeout_s must be at least 1")
        for part in self.prefix.split("/"):
            check_topic_level("mqtt.prefix level", part)
        if self.keepalive_s < 5:
            raise ValueError("mqtt.keepalive_s must be at least 5")
        if self.reconnect_min_s < 1 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_min_s must be >= 1 and reconnect_max_s >= reconnect_min_s")
        if self.stats_interval_s <= 0 or self.flush_timeout_s < 0:
            raise ValueError("mqtt.stats_interval_s must be > 0 and mqtt.flush_timeout_s >= 0")
        if self.refused_retry_s < self.reconnect_min_s or self.session_expiry_s < 0:
            raise ValueError("mqtt.refused_retry_s must be >= reconnect_min_s and session_expiry_s >= 0")
        if self.status_lease_s < 3 or self.max_inflight < 1:
            raise ValueError("mqtt.status_lease_s must be at least 3 and max_inflight at least 1")


@dataclass
class WebhookConfig:
    """The webhook sink (edge/sinks/webhook.py): events POSTed as JSON to ``url``, retried until a 2xx."""

    url: str = ""
    token_env: Optional[str] = None
    ca_certs: Optional[str] = None
    timeout_s: float = 10.0
    snapshots: bool = False
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    max_refusals: int = 5
    flush_timeout_s: float = 10.0

    def validate(self) -> None:
        if self.url and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"webhook.url must be an http:// or https:// URL, got {redact_secrets(self.url)!r}")
        if self.timeout_s <= 0 or self.flush_timeout_s < 0:
            raise ValueError("webhook.timeout_s must be > 0 and webhook.flush_timeout_s >= 0")
        if self.retry_min_s <= 0 or self.retry_max_s < self.retry_min_s:
            raise ValueError("webhook.retry_min_s must be > 0 and webhook.retry_max_s >= retry_min_s")
        if self.max_refusals < 1:
            raise ValueError("webhook.max_refusals must be at least 1")


@dataclass
class SpoolConfig:
    """Bounds of the durable event spool in state_dir (oldest unsent messages are dropped first, counted)."""

    max_mb: float = 256.0
    max_age_days: float = 30.0

    def validate(self) -> None:
        if self.max_mb <= 0 or self.max_age_days <= 0:
            raise ValueError("spool.max_mb and spool.max_age_days must be greater than 0")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)

    @property
    def max_age_s(self) -> float:
        return self.max_age_days * 86400.0


@dataclass
class HealthConfig:
    """Operator-facing health besides the stats topic: a Prometheus endpoint (off when the port is 0)."""

    prometheus_port: int = 0
    prometheus_bind: str = "127.0.0.1"

    def validate(self) -> None:
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError("health.prometheus_port must be 0 (off) or a TCP port (1-65535)")


@dataclass
class LiveConfig:
    """The live page (edge/live.py, ``edge-run --http HOST:PORT``): what each camera sees, its score map, the open
    and last events, the station's stats; off when the port is 0, localhost unless told otherwise, read-only
    unless ``allow_commands``, basic auth when ``username`` is set (its password from ``password_env``), HTTPS
    with ``tls_cert``."""

    port: int = 0
    bind: str = "127.0.0.1"
    events: int = 20
    refresh_s: float = 1.0
    username: Optional[str] = None
    password_env: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    allow_commands: bool = False
    calibrate_frames: int = 300

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("live.port must be 0 (off) or a TCP port (1-65535)")
        if self.events < 0:
            raise ValueError("live.events must not be negative")
        if self.refresh_s <= 0:
            raise ValueError("live.refresh_s must be greater than 0")
        if bool(self.username) != bool(self.password_env):
            raise ValueError("live.username and live.password_env go together: the user name, and the environment "
                             "variable that holds its password")
        if self.tls_key and not self.tls_cert:
            raise ValueError("live.tls_key needs live.tls_cert (the certificate the key belongs to)")
        if self.calibrate_frames < 2:
            raise ValueError("live.calibrate_frames must be at least 2 (a few hundred good frames)")
        if self.port and self.allow_commands and not self.username and self.bind not in ("127.0.0.1", "::1",
                                                                                         "localhost"):
            raise ValueError(f"live.allow_commands on live.bind {self.bind} needs live.username: anyone on the "
                             "network could recalibrate the station")


@dataclass
class CollectConfig:
    """Frames kept for retraining (edge/collect.py): sampled normals, each event's frames; off by default."""

    enabled: bool = False
    dir: str = ""  # empty: <state_dir>/collect/<station>
    normal_every_s: float = 60.0
    guard_s: float = 5.0
    event_frames: int = 5
    max_mb: float = 2048.0
    queue_frames: int = 32
    retry_s: float = 60.0

    def validate(self) -> None:
        if self.normal_every_s <= 0 or self.guard_s < 0:
            raise ValueError("collect.normal_every_s must be > 0 and collect.guard_s >= 0")
        if not 1 <= self.event_frames <= 51:
            raise ValueError("collect.event_frames must be 1..51 (the peak and the frames around it)")
        if self.max_mb <= 0 or self.queue_frames < 1 or self.retry_s <= 0:
            raise ValueError("collect.max_mb and collect.retry_s must be > 0 and collect.queue_frames at least 1")


@dataclass
class LoggingConfig:
    """Log level of the station process (logs go to stderr)."""

    level: str = "INFO"

    def validate(self) -> None:
        if self.level.upper() not in LOG_LEVELS:
            raise ValueError(f"logging.level must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")


@dataclass
class StationConfig:
    """Everything one camera station needs; CLI flags override single keys."""

    station: str = "station1"
    state_dir: str = "state"
    engine: EngineConfig = field(default_factory=EngineConfig)
    cameras: List[CameraConfig] = field(default_factory=list)
    events: EventsConfig = field(default_factory=EventsConfig)
    sinks: List[str] = field(default_factory=lambda: ["mqtt"])
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    calibration: SiteCalibrationConfig = field(default_factory=SiteCalibrationConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        check_topic_level("station id", self.station)
        ids = [c.id for c in self.cameras]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"camera ids must be unique; repeated: {', '.join(dupes)}")
        self.check_sinks()

    @property
    def snapshots(self) -> bool:
        """A sink in use wants each event's peak frame as a JPEG (``mqtt.snapshots``, ``webhook.snapshots``)."""
        return ("mqtt" in self.sinks and self.mqtt.snapshots) or ("webhook" in self.sinks and self.webhook.snapshots)

    def check_sinks(self) -> None:
        """``sinks`` names registered sinks, each once; a webhook needs its URL."""
        from edge.sinks import sink_names  # the registry imports this module

        known = sink_names()
        if not self.sinks:
            raise ValueError(f"sinks must name at least one sink ({', '.join(known)})")
        for name in self.sinks:
            if name not in known:
                raise ValueError(f"sinks: unknown sink {name!r}; choose from {', '.join(known)}")
        if len(set(self.sinks)) != len(self.sinks):
            raise ValueError("sinks: each sink may be named once")
        if "webhook" in self.sinks and not self.webhook.url:
            raise ValueError("sinks names webhook but webhook.url is empty; set it to the receiver's http(s) URL")


def load_station_config(path: Optional[str | Path]) -> StationConfig:
    """The station config from ``path``, or all defaults when no file is given."""
    if path is None:
        return StationConfig()
    return load_config(path, StationConfig)
