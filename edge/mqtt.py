"""MQTT side of the station (DESIGN.md, MQTT contract), on paho-mqtt 2.x with its network thread.

Events go out QoS 1 and are tracked in an in-memory outbox until the broker's PUBACK; paho itself
re-sends unacknowledged QoS 1 messages after a reconnect. Until the durable disk spool exists,
events held while the broker is away are lost if the process stops, and the log says so plainly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import MqttConfig
from edge.errors import UserError

log = logging.getLogger("edge.mqtt")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttUrl:
    scheme: str
    host: str
    port: int
    username: Optional[str] = None
    password: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:  # never print a password
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``; anything else is a one-line UserError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UserError(f"bad MQTT URL {url!r} ({exc}); expected mqtt://host:port or mqtts://host:port") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise UserError(f"bad MQTT URL {url!r}; expected mqtt://host:port or mqtts://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UserError(f"bad MQTT URL {url!r}: no path or query allowed; the topic prefix is mqtt.prefix")
    return MqttUrl(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme],
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


def new_client(client_id: str, url: MqttUrl, cfg: MqttConfig) -> mqtt.Client:
    """A paho v2 client with credentials and TLS from URL + config (password possibly from the env)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=True)
    username = url.username or cfg.username
    password = url.password
    if password is None and cfg.password_env:
        password = os.environ.get(cfg.password_env)
        if password is None:
            raise UserError(f"mqtt.password_env names {cfg.password_env}, which is not set in the environment")
    if username:
        client.username_pw_set(username, password)
    if url.tls:
        tls = cfg.tls
        key_password = os.environ.get(tls.keyfile_password_env) if tls.keyfile_password_env else None
        try:
            client.tls_set(ca_certs=tls.ca_certs, certfile=tls.certfile, keyfile=tls.keyfile,
                           keyfile_password=key_password, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise UserError(f"mqtt.tls: cannot load certificates/keys ({exc})") from None
        if tls.insecure:
            client.tls_insecure_set(True)
    return client


class StationPublisher:
    """status / event / snapshot / stats topics of one station, with an outbox of unacknowledged events."""

    _EARLY_ACKS_KEPT = 1000  # far below the 65535 mid wrap, so a stale ack can never match a new event

    def __init__(self, cfg: MqttConfig, station: str, url: Optional[str] = None) -> None:
        self.cfg = cfg
        self.station = station
        self.url = parse_mqtt_url(url or cfg.url)
        self.base = f"{cfg.prefix}/{station}"
        self.status_topic = f"{self.base}/status"
        self.client = new_client(cfg.client_id or f"edge-{station}-{os.getpid()}", self.url, cfg)
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        self._lock = threading.Lock()
        self._outbox: dict[int, tuple[str, bytes]] = {}
        self._early: OrderedDict[int, None] = OrderedDict()
        self._connected = threading.Event()
        self._first_attempt = threading.Event()  # the first connection attempt has succeeded or failed
        self._outage_reported = False
        self._ever_connected = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried, never fatal."""
        try:
            self.client.connect_async(self.url.host, self.url.port, keepalive=self.cfg.keepalive_s)
        except (OSError, ValueError) as exc:
            raise UserError(f"MQTT {self.url}: {exc}") from None
        self.client.loop_start()

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first connection attempt has an outcome; True when connected."""
        self._first_attempt.wait(timeout)
        return self._connected.is_set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """Events published but not yet acknowledged by the broker (the stats' spool_depth)."""
        with self._lock:
            return len(self._outbox)

    def flush(self, timeout: float) -> int:
        """Wait (bounded) for every event's PUBACK; returns how many are still unacknowledged."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pending

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the retained ``stopped`` status and disconnect cleanly (so the will is not sent)."""
        if self.connected:
            info = self.client.publish(self.status_topic, "stopped", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    # -- publishing ----------------------------------------------------------------------------
    def publish_event(self, camera: str, payload: bytes) -> None:
        """QoS 1, not retained; held in the outbox until PUBACK."""
        topic = f"{self.base}/{camera}/event"
        info = self.client.publish(topic, payload, qos=1, retain=False)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("MQTT: event on %s not queued (%s)", topic, mqtt.error_string(info.rc))
            return
        # on_publish may already have run on the network thread (it runs under paho's own lock,
        # so we never hold ours across client.publish).
        with self._lock:
            if info.mid in self._early:
                del self._early[info.mid]
                return
            self._outbox[info.mid] = (topic, payload)
            if not self._connected.is_set():
                self._report_outage("is not connected")

    def publish_snapshot(self, camera: str, jpeg: bytes) -> None:
        self.client.publish(f"{self.base}/{camera}/snapshot", jpeg, qos=1, retain=False)

    def publish_stats(self, payload: bytes) -> None:
        """QoS 0 retained: a dashboard sees the latest health at once; missing one is harmless."""
        self.client.publish(f"{self.base}/stats", payload, qos=0, retain=True)

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT %s refused the connection (%s); retrying", self.url, reason_code)
            return
        client.publish(self.status_topic, "online", qos=1, retain=True)
        with self._lock:
            held = len(self._outbox)
            was_out = self._outage_reported
            self._outage_reported = False
        self._connected.set()
        self._first_attempt.set()
        if was_out or not self._ever_connected:
            extra = f"; re-sending {held} held events" if held else ""
            log.info("MQTT connected to %s as station '%s'%s", self.url, self.station, extra)
        self._ever_connected = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if reason_code == 0:  # our own disconnect()
            return
        with self._lock:
            self._report_outage(f"disconnected ({reason_code})")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        with self._lock:
            self._report_outage("is unreachable")
        self._first_attempt.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        with self._lock:
            if self._outbox.pop(mid, None) is None:
                self._early[mid] = None
                while len(self._early) > self._EARLY_ACKS_KEPT:
                    self._early.popitem(last=False)

    def _report_outage(self, why: str) -> None:
        """One plain line per outage (caller holds the lock)."""
        if self._outage_reported:
            return
        self._outage_reported = True
        held = f" ({len(self._outbox)} now)" if self._outbox else ""
        log.warning("MQTT broker %s %s; still processing and retrying; events are held in memory%s "
                    "and will be lost if the process stops", self.url, why, held)
