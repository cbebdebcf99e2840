"""MQTT side of the station (DESIGN.md, MQTT contract), on paho-mqtt 2.x with its network thread, MQTT 5.

Events and snapshots reach the broker through the durable spool (edge/spool.py): the station writes
them there, a sender thread hands at most ``max_inflight`` of them to paho while connected, and each is
deleted on its PUBACK. paho re-sends what is in flight after a reconnect; after a process restart the
spool re-sends everything unacknowledged, oldest first. Nothing waits in paho's memory during an outage.

Status is a lease: ``online`` (retained) carries an MQTT 5 message expiry of ``status_lease_s`` and is
renewed every third of it, and the last will says ``offline``. A broker that crashes loses the will of a
clean or even a persistent session (Mosquitto 2.0 does not keep wills across its own restart), so without
the lease a station that died meanwhile would stay ``online`` for ever.

Refusals (credentials, authorisation) and TLS failures are named once per cause, with what to check, and
retried every ``refused_retry_s`` rather than every second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.errors import UserError
from edge.config import MqttConfig, TlsConfig, redact_secrets
from edge.spool import Spool

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
    """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``; anything else is a one-line UserError
    (which never repeats the password)."""
    shown = redact_secrets(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UserError(f"bad MQTT URL {shown!r} ({exc}); expected mqtt://host:port or mqtts://host:port") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise UserError(f"bad MQTT URL {shown!r}; expected mqtt://host:port or mqtts://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UserError(f"bad MQTT URL {shown!r}: no path or query allowed; the topic prefix is mqtt.prefix")
    return MqttUrl(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme],
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


def read_secret_file(path: str, key: str) -> str:
    """A secret from a file only its owner may read (like ssh's keys): refused when group or others can."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise UserError(f"{key}: {path} is readable by group or others (mode {st.st_mode & 0o777:o}); "
                            f"chmod 600 it (owner: the service user)")
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise UserError(f"{key}: cannot read {path} ({exc.strerror})") from None


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS context the station connects with (and probes with when a handshake fails)."""
    key_password = os.environ.get(tls.keyfile_password_env) if tls.keyfile_password_env else None
    for what, path in (("ca_certs", tls.ca_certs), ("certfile", tls.certfile), ("keyfile", tls.keyfile)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"mqtt.tls.{what}: {path} does not exist; the config asks for TLS with it")
    if tls.keyfile and not tls.certfile:
        raise UserError("mqtt.tls.keyfile is set without mqtt.tls.certfile; give both for a client certificate")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certs)
        if tls.certfile:
            ctx.load_cert_chain(tls.certfile, tls.keyfile, password=key_password)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise UserError(f"mqtt.tls: cannot load certificates/keys ({exc})") from None
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


def new_client(client_id: str, url: MqttUrl, cfg: MqttConfig, will_topic: Optional[str] = None,
               context: Optional[ssl.SSLContext] = None) -> mqtt.Client:
    """A paho v2 MQTT 5 client with credentials and TLS from URL + config (password possibly from the env);
    ``context``: the TLS context to use (built from ``cfg.tls`` when not given)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    username = url.username or cfg.username
    password = url.password
    if password is None and cfg.password_env:
        password = os.environ.get(cfg.password_env)
        if password is None:
            raise UserError(f"mqtt.password_env names {cfg.password_env}, which is not set in the environment")
    if password is None and cfg.password_file:
        password = read_secret_file(cfg.password_file, "mqtt.password_file")
    if username:
        client.username_pw_set(username, password)
    if url.tls:
        client.tls_set_context(context or tls_context(cfg.tls))
    if will_topic:
        client.will_set(will_topic, "offline", qos=1, retain=True)
    return client


def describe_tls_failure(url: MqttUrl, ctx: ssl.SSLContext, timeout: float = 5.0) -> Optional[str]:
    """Repeat the TLS handshake to say WHY it fails (paho only says that the connection failed)."""
    try:
        with socket.create_connection((url.host, url.port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=url.host) as tls:
            # TLS 1.3: a server that rejects our certificate says so after the handshake, on the first read;
            # one that accepts it waits for our CONNECT, and the read times out.
            tls.settimeout(1.0)
            tls.recv(1)
    except ssl.SSLCertVerificationError as exc:
        code = getattr(exc, "verify_code", 0)
        message = getattr(exc, "verify_message", "") or str(exc)
        if code == 62 or "hostname" in message.lower():
            return (f"TLS: the broker's certificate does not match the host name {url.host!r} ({message}); "
                    "connect by the name in its certificate, or fix the certificate")
        if code == 10:
            return f"TLS: the broker's certificate has expired ({message}); renew it"
        return (f"TLS: the broker's certificate is not trusted ({message}); check mqtt.tls.ca_certs: it "
                "must be the CA that signed the broker's certificate")
    except ssl.SSLError as exc:
        text = str(exc).lower()
        if any(k in text for k in ("certificate required", "bad certificate", "unknown ca", "certificate unknown")):
            return (f"TLS: the broker rejected this station's client certificate ({exc.reason}); check "
                    "mqtt.tls.certfile / keyfile and that the broker trusts their CA")
        if "wrong version" in text or "record layer" in text:
            return f"TLS: {url.host}:{url.port} does not speak TLS ({exc.reason}); use mqtt:// or the TLS port"
        return f"TLS handshake failed ({exc.reason or exc})"
    except OSError:
        return None  # not a TLS problem: the broker is unreachable
    return None


def _is_json_object(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload), dict)
    except (ValueError, UnicodeDecodeError):
        return False


_REFUSAL_HINTS = {
    "Bad user name or password": "check mqtt.username and the password (mqtt.password_env or the URL)",
    # Mosquitto 2 answers a wrong password with "Not authorized" too
    "Not authorized": "check mqtt.username and the password (mqtt.password_env or the URL), and that the "
                      "broker's password file / ACL lets this user connect",
    "Client identifier not valid": "set mqtt.client_id to one the broker accepts",
    "Banned": "the broker banned this client; ask its administrator",
}


class StationPublisher:
    """status / event / snapshot / stats / health topics of one station; events and snapshots go through the spool."""

    # An ack that beats client.publish() back to us arrives within microseconds; one older than this is a
    # status/stats publish's, and must not match a later message that reuses its mid after the wrap.
    _EARLY_ACK_TTL_S = 5.0

    def __init__(self, cfg: MqttConfig, station: str, spool: Spool, url: Optional[str] = None) -> None:
        self.cfg = cfg
        self.station = station
        self.spool = spool
        self.url = parse_mqtt_url(url or cfg.url)
        self.base = f"{cfg.prefix}/{station}"
        self.status_topic = f"{self.base}/status"
        # built once: the connection and the probe that explains a failed handshake use the same one
        self._tls = tls_context(cfg.tls) if self.url.tls else None
        self.client = new_client(cfg.client_id or f"edge-{station}", self.url, cfg, will_topic=self.status_topic,
                                 context=self._tls)
        self.client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.client.max_inflight_messages_set(cfg.max_inflight)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.commands: dict[str, Callable[[bytes], None]] = {}  # cmd/<name> -> handler (network thread)
        self.commands_ignored = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inflight: dict[int, int] = {}  # paho mid -> spool id
        self._early: OrderedDict[int, float] = OrderedDict()
        self._handed = 0  # highest spool id handed to paho by this process
        self._connected = threading.Event()
        self._first_attempt = threading.Event()  # the first connection attempt has succeeded or failed
        self._stopping = threading.Event()
        self._outage_reported = False
        self._ever_connected = False
        self._refusal: Optional[str] = None  # the last refusal/TLS cause reported (each is said once)
        self._last_stats: Optional[bytes] = None
        self._last_health: Optional[bytes] = None
        self.reconnects = 0
        self.publish_seconds = 0.0  # time in client.publish on the sender thread (benchmarks/pipeline.py)
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-spool-sender", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried, never fatal."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        try:
            self.client.connect_async(self.url.host, self.url.port, keepalive=self.cfg.keepalive_s,
                                      clean_start=False, properties=props)
        except (OSError, ValueError) as exc:
            raise UserError(f"MQTT {self.url}: {exc}") from None
        self.client.loop_start()
        self._sender.start()

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first connection attempt has an outcome; True when connected."""
        self._first_attempt.wait(timeout)
        return self._connected.is_set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """Messages in the spool, not yet acknowledged by the broker (the stats' spool_depth)."""
        return self.spool.depth

    def topic(self, camera: str, kind: str) -> str:
        """``{prefix}/{station}/{camera}/{kind}`` (kind: event or snapshot)."""
        return f"{self.base}/{camera}/{kind}"

    def wake(self) -> None:
        """Something new is in the spool."""
        with self._wake:
            self._wake.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait (bounded) for every spooled message's PUBACK; returns how many are still in the spool."""
        deadline = time.monotonic() + timeout
        self.wake()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pending

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the retained ``stopped`` status and disconnect cleanly (so the will is not sent)."""
        self._stopping.set()
        self.wake()
        if self._sender.is_alive():
            self._sender.join(timeout)
        if self.connected:
            info = self.client.publish(self.status_topic, "stopped", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    # -- publishing ----------------------------------------------------------------------------
    def publish_stats(self, payload: bytes) -> None:
        """QoS 0 retained: a dashboard sees the latest health at once; missing one is harmless.
        The latest is re-published as soon as a connection comes back."""
        self._last_stats = payload
        if self.connected:
            self.client.publish(f"{self.base}/stats", payload, qos=0, retain=True)

    def publish_health(self, payload: bytes) -> None:
        """QoS 1 retained (edge.drift): an alarm stays visible until a later message clears it. Sent when it
        changes, and the latest again as soon as a connection comes back."""
        self._last_health = payload
        if self.connected:
            self.client.publish(f"{self.base}/health", payload, qos=1, retain=True)

    def _publish_online(self) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = self.cfg.status_lease_s
        self.client.publish(self.status_topic, "online", qos=1, retain=True, properties=props)

    def _send_loop(self) -> None:
        """Hand spooled messages to paho, oldest first, while connected; renew the status lease."""
        renew_every = self.cfg.status_lease_s / 3.0
        next_renew = time.monotonic() + renew_every
        next_expire = time.monotonic() + 60.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if self.connected and now >= next_renew:
                self._publish_online()
                next_renew = now + renew_every
            if now >= next_expire:
                self.spool.expire()
                next_expire = now + 60.0
            with self._wake:
                room = self.cfg.max_inflight - len(self._inflight)
                after = self._handed
            batch = self.spool.pending(after, room) if self.connected and room > 0 else []
            for msg in batch:
                t0 = time.perf_counter()
                info = self.client.publish(msg.topic, msg.payload, qos=1, retain=False)
                self.publish_seconds += time.perf_counter() - t0
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    log.error("MQTT: message on %s not queued (%s); kept in the spool", msg.topic,
                              mqtt.error_string(info.rc))
                    break
                # on_publish may already have run on the network thread (it runs under paho's own lock,
                # so we never hold ours across client.publish).
                with self._wake:
                    self._handed = msg.id
                    acked_at = self._early.pop(info.mid, None)
                    acked_already = acked_at is not None and time.monotonic() - acked_at < self._EARLY_ACK_TTL_S
                    if not acked_already:
                        self._inflight[info.mid] = msg.id
                if acked_already:
                    self.spool.ack(msg.id)
            if not batch:
                with self._wake:
                    self._wake.wait(0.25)

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._refused(str(reason_code))
            return
        self._publish_online()
        client.subscribe(f"{self.base}/cmd/#", qos=1)
        if self._last_stats is not None:
            client.publish(f"{self.base}/stats", self._last_stats, qos=0, retain=True)
        if self._last_health is not None:
            client.publish(f"{self.base}/health", self._last_health, qos=1, retain=True)
        client.reconnect_delay_set(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        with self._lock:
            was_out = self._outage_reported
            self._outage_reported = False
            self._refusal = None
        held = self.spool.depth
        self._connected.set()
        self._first_attempt.set()
        if was_out or not self._ever_connected:
            extra = f"; sending {held} spooled messages" if held else ""
            log.info("MQTT connected to %s as station '%s'%s", self.url, self.station, extra)
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.wake()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        had_session = self._connected.is_set()
        self._connected.clear()
        if reason_code == 0 or self._stopping.is_set():  # our own disconnect()
            return
        if not had_session and self.url.tls:  # dropped before any CONNACK: how TLS 1.3 rejects a client cert
            self._on_connect_fail(client, userdata)
            return
        with self._lock:
            self._report_outage(f"disconnected ({reason_code})")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        why = describe_tls_failure(self.url, self._tls) if self._tls is not None else None
        if why:
            self._refused(why)
        else:
            with self._lock:
                self._report_outage("is unreachable")
        self._first_attempt.set()

    def _refused(self, cause: str) -> None:
        """Credentials, authorisation or TLS: say it once per cause, then retry slowly."""
        self.client.reconnect_delay_set(self.cfg.refused_retry_s, self.cfg.refused_retry_s)
        self._first_attempt.set()
        with self._lock:
            if self._refusal == cause:
                return
            self._refusal = cause
            self._outage_reported = True
        hint = next((h for key, h in _REFUSAL_HINTS.items() if key.lower() in cause.lower()), None)
        text = f"MQTT broker {self.url} refused the connection: {cause}; {hint}" if hint else \
            f"MQTT broker {self.url}: {cause}"
        log.error("%s; retrying every %d s; events are kept in the spool", text, self.cfg.refused_retry_s)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """``{base}/cmd/<name>``: known commands with a valid payload (empty or a JSON object) run; anything
        else is ignored and counted."""
        name = msg.topic[len(self.base) + len("/cmd/"):] if msg.topic.startswith(f"{self.base}/cmd/") else ""
        handler = self.commands.get(name)
        payload = bytes(msg.payload)
        valid = handler is not None and (not payload.strip() or _is_json_object(payload))
        if not valid or handler is None:
            self.commands_ignored += 1
            log.warning("MQTT: ignored command on %s (%s)", msg.topic,
                        "unknown command" if handler is None else "payload is not empty or a JSON object")
            return
        log.info("MQTT: command %s received", name)
        handler(payload)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        with self._wake:
            spool_id = self._inflight.pop(mid, None)
            if spool_id is None:  # not ours yet (or a status/stats publish): remember it briefly
                now = time.monotonic()
                self._early[mid] = now
                while self._early and next(iter(self._early.values())) < now - self._EARLY_ACK_TTL_S:
                    self._early.popitem(last=False)
                return
            self._wake.notify_all()
        if getattr(reason_code, "is_failure", False):
            log.error("MQTT: the broker refused a message (%s); dropped from the spool", reason_code)
        self.spool.ack(spool_id)

    def _report_outage(self, why: str) -> None:
        """One plain line per outage (caller holds the lock)."""
        if self._outage_reported:
            return
        self._outage_reported = True
        log.warning("MQTT broker %s %s; still processing and retrying; events are kept in the spool "
                    "(%d now) and sent when it is back", self.url, why, self.spool.depth)
