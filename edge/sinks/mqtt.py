"""The MQTT sink (docs/mqtt.md, the MQTT contract), on paho-mqtt 2.x with its network thread, MQTT 5.

Events and snapshots reach the broker from the durable outbox (edge/outbox.py): the station writes them there,
a sender thread hands at most ``max_inflight`` of them to paho while connected, each on the topic
``{prefix}/{station}/{camera}/{kind}`` derived from its record when it is sent, and each is settled on its
PUBACK. paho re-sends what is in flight after a reconnect; after a process restart the outbox hands over
everything this sink had not settled, oldest first. Nothing waits in paho's memory during an outage.

Status, stats, health and commands are MQTT's alone: status is a lease: ``online`` (retained) carries an MQTT 5
message expiry of ``status_lease_s`` and is renewed every third of it, and the last will says ``offline``. A
broker that crashes loses the will of a clean or even a persistent session (Mosquitto 2.0 does not keep wills
across its own restart), so without the lease a station that died meanwhile would stay ``online`` for ever.

Refusals (credentials, authorisation) and TLS failures are named once per cause, with what to check, and
retried every ``refused_retry_s`` rather than every second. A publish the broker refuses (a PUBACK reason code
>= 0x80, e.g. its ACL's "Not authorized") is counted and named once per cause.

Nothing from the network may stop paho's network thread: every callback is guarded (an exception is counted
and logged once per cause), and a command's payload passes core.payloads.parse_network_json (size, nesting,
UTF-8, control characters, string lengths: bounded cost) before any handler sees it. A poison message is
acknowledged (returning from on_message acks a QoS 1 message) and dropped with a count, so a persistent
session does not bring it back at every start. Should paho's thread or the sender die anyway, ``failure()``
says so and the station reports it.

A PUBACK is the broker's word, not SCADA's: a broker that crashes before it saved the event loses it. With
``mqtt.consumer_ack`` an event stays in the outbox until the consumer acknowledges it on ``{prefix}/{station}/ack``
(core/schemas/ack.schema.json: ``{"keys": ["<event_id>:<type>:<seq>", ...]}``; ``edge-events --ack`` sends it),
and is published again ``ack_timeout_s`` after its PUBACK and after every reconnect until then (the consumer
de-duplicates on the key, as it must anyway). Snapshots leave on their PUBACK.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Mapping, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.errors import UserError
from core.payloads import PayloadRefused, parse_network_json, payload_problem, shown
from edge.config import MqttConfig, StationConfig
from edge.mqtt import describe_tls_failure, new_client, parse_mqtt_url, tls_context
from edge.outbox import Outbox
from edge.outbox_file import Record, split_snapshot
from edge.sinks import CommandHandler, SinkContext, register_sink

log = logging.getLogger("edge.mqtt")

SNAPSHOT_PROPERTIES = ("event_id", "score", "camera", "frame", "ts")  # a snapshot's MQTT 5 user properties


_REFUSAL_HINTS = {
    "Bad user name or password": "check mqtt.username and the password (mqtt.password_env or the URL)",
    # Mosquitto 2 answers a wrong password with "Not authorized" too
    "Not authorized": "check mqtt.username and the password (mqtt.password_env or the URL), and that the "
                      "broker's password file / ACL lets this user connect",
    "Client identifier not valid": "set mqtt.client_id to one the broker accepts",
    "Banned": "the broker banned this client; ask its administrator",
}


class MqttSink:
    """status / event / snapshot / stats / health topics of one station; events and snapshots come from the outbox."""

    name = "mqtt"

    # An ack that beats client.publish() back to us arrives within microseconds; one older than this is a
    # status/stats publish's, and must not match a later message that reuses its mid after the wrap.
    _EARLY_ACK_TTL_S = 5.0
    _ACKED_EARLY_MAX = 10_000  # consumer acks kept for events whose PUBACK has not come yet

    def __init__(self, cfg: MqttConfig, station: str, outbox: Outbox,
                 commands: Optional[Mapping[str, CommandHandler]] = None, url: Optional[str] = None) -> None:
        self.cfg = cfg
        self.station = station
        self.outbox = outbox
        self.flush_timeout_s = cfg.flush_timeout_s
        self.url = parse_mqtt_url(url or cfg.url)
        self.base = f"{cfg.prefix}/{station}"
        self.status_topic = f"{self.base}/status"
        # built once: the connection and the probe that explains a failed handshake use the same one
        self._tls = tls_context(cfg.tls) if self.url.tls else None
        self.client = new_client(cfg.client_id or f"edge-{station}", self.url, cfg, will_topic=self.status_topic,
                                 context=self._tls)
        self.client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.client.max_inflight_messages_set(cfg.max_inflight)
        self.client.on_connect = self._guarded(self._on_connect)
        self.client.on_disconnect = self._guarded(self._on_disconnect)
        self.client.on_connect_fail = self._guarded(self._on_connect_fail)
        self.client.on_publish = self._guarded(self._on_publish)
        self.client.on_message = self._guarded(self._on_message)
        self.commands: dict[str, CommandHandler] = dict(commands or {})  # cmd/<name> -> handler (network thread)
        self.commands_ignored = 0  # unknown command, or a payload that is not empty or a JSON object
        self.commands_refused = 0  # poison: too large, too deep, not UTF-8, control characters, long strings
        self.delivered = 0  # records the broker acknowledged in this run
        self.failed = 0  # records the broker refused (a PUBACK with a failure reason code)
        self.publish_refused: Counter[str] = Counter()  # PUBACK failure reason -> publishes refused (any topic)
        self.callback_errors: Counter[str] = Counter()  # "<callback>: <exception type>" -> count
        self._said: set[str] = set()  # causes logged already (each once)
        self._said_lock = threading.Lock()
        self._sender_error: Optional[str] = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inflight: dict[int, int] = {}  # paho mid -> record id
        self._record_keys: dict[int, tuple[str, str]] = {}  # record id handed to paho -> (key, kind)
        # mqtt.consumer_ack: events the broker has, each waiting for the consumer's ack
        self.ack_topic = f"{self.base}/ack"
        self._awaiting: dict[str, tuple[int, float]] = {}  # key -> (record id, when the broker acknowledged it)
        self._acked_early: OrderedDict[str, None] = OrderedDict()  # consumer acks of keys not awaiting (yet)
        self.acks_refused = 0
        self._resend_said = False
        self._early: OrderedDict[int, float] = OrderedDict()
        self._handed = 0  # highest record id handed to paho by this process
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

    def failure(self) -> Optional[str]:
        """None while paho's network thread and the sender thread run (or the sink was stopped), else why not."""
        if self._stopping.is_set() or not self._sender.ident:
            return None
        network = getattr(self.client, "_thread", None)  # paho's loop_start() thread
        if network is None or not network.is_alive():
            return f"MQTT sink: paho's network thread has stopped{self._last_error()}; no command or PUBACK is read"
        if not self._sender.is_alive():
            return f"MQTT sink: the sender thread has died ({self._sender_error or 'unknown cause'})"
        return None

    def _last_error(self) -> str:
        return f" (last callback error: {next(reversed(self.callback_errors))})" if self.callback_errors else ""

    def counters(self) -> dict[str, Any]:
        """What the sink refused or survived in this run (commands, publishes, callback errors)."""
        return {"commands_ignored": self.commands_ignored, "commands_refused": self.commands_refused,
                "publish_refused": sum(self.publish_refused.values()),
                "callback_errors": sum(self.callback_errors.values()),
                "awaiting_consumer_ack": len(self._awaiting), "acks_refused": self.acks_refused}

    def _say_once(self, cause: str, level: int, text: str, *args: Any) -> None:
        """Log ``text`` the first time ``cause`` happens in this run (a flood of one cause is one line)."""
        with self._said_lock:
            if cause in self._said:
                return
            self._said.add(cause)
        log.log(level, text, *args)

    def _guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` as paho calls it, but an exception is counted and logged once per cause instead of
        ending paho's network thread (and with it every command and PUBACK)."""
        name = callback.__name__

        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as exc:  # noqa: BLE001 (anything, or the network thread dies)
                cause = f"{name}: {exc.__class__.__name__}"
                self.callback_errors[cause] += 1
                self._say_once(f"callback {cause}", logging.ERROR, "MQTT: %s failed (%s: %s); the connection "
                               "carries on; further %s errors are counted, not logged", name,
                               exc.__class__.__name__, shown(str(exc)), cause)

        guarded.__name__ = name
        return guarded

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first connection attempt has an outcome; True when connected."""
        self._first_attempt.wait(timeout)
        return self._connected.is_set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """Records in the outbox not yet acknowledged by the broker."""
        return self.outbox.waiting(self.name)

    def stats(self) -> dict[str, Any]:
        return {"depth": self.pending, "delivered": self.delivered, "failed": self.failed,
                "connected": self.connected, **self.counters()}

    def describe(self) -> str:
        ack = f" (events kept until the consumer acknowledges them on {self.ack_topic})" if self.cfg.consumer_ack \
            else ""
        return f"mqtt {self.url}{ack}"

    def topic(self, camera: str, kind: str) -> str:
        """``{prefix}/{station}/{camera}/{kind}`` (kind: event or snapshot)."""
        return f"{self.base}/{camera}/{kind}"

    def wake(self) -> None:
        """Something new is in the outbox."""
        with self._wake:
            self._wake.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait (bounded) for the PUBACK of every record; returns how many this sink has not settled."""
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
        """The sender thread: ``_send`` survives what the outbox or paho can raise (counted, said once, then
        tried again a second later); ``failure()`` names a cause only if the thread dies anyway."""
        while not self._stopping.is_set():
            try:
                self._send()
            except Exception as exc:  # noqa: BLE001 (the sender must outlive one bad record or a full disk)
                cause = f"sender: {exc.__class__.__name__}"
                self.callback_errors[cause] += 1
                self._sender_error = f"{exc.__class__.__name__}: {shown(str(exc))}"
                self._say_once(cause, logging.ERROR, "MQTT: sending from the outbox failed (%s); retrying every "
                               "second; further errors of this kind are counted, not logged", self._sender_error)
                self._stopping.wait(1.0)

    def _send(self) -> None:
        """Hand outbox records to paho, oldest first, while connected; renew the status lease."""
        renew_every = self.cfg.status_lease_s / 3.0
        next_renew = time.monotonic() + renew_every
        while not self._stopping.is_set():
            now = time.monotonic()
            if self.connected and now >= next_renew:
                self._publish_online()
                next_renew = now + renew_every
            if self.cfg.consumer_ack:
                self._resend_unacknowledged(now)
            with self._wake:
                room = self.cfg.max_inflight - len(self._inflight)
                after = self._handed
                in_hand = set(self._record_keys) | {rid for rid, _ in self._awaiting.values()} \
                    if self.cfg.consumer_ack else set()
            batch = self.outbox.pending(self.name, after, room) if self.connected and room > 0 else []
            for msg in batch:
                if msg.id in in_hand:  # in flight, or waiting for the consumer's ack and not due yet
                    with self._wake:
                        self._handed = msg.id
                    continue
                if msg.kind == "snapshot" and not self.cfg.snapshots:  # rendered for another sink only
                    with self._wake:
                        self._handed = msg.id
                    self.outbox.settle(msg.id, self.name, "skipped")
                    continue
                topic = self.topic(msg.camera, msg.kind)
                payload, props = (msg.payload, None) if msg.kind != "snapshot" else self._snapshot_message(msg)
                t0 = time.perf_counter()
                info = self.client.publish(topic, payload, qos=1, retain=False, properties=props)
                self.publish_seconds += time.perf_counter() - t0
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    log.error("MQTT: message on %s not queued (%s); kept in the spool", topic,
                              mqtt.error_string(info.rc))
                    break
                # on_publish may already have run on the network thread (it runs under paho's own lock,
                # so we never hold ours across client.publish).
                with self._wake:
                    self._handed = msg.id
                    self._record_keys[msg.id] = (msg.key, msg.kind)
                    acked_at = self._early.pop(info.mid, None)
                    acked_already = acked_at is not None and time.monotonic() - acked_at < self._EARLY_ACK_TTL_S
                    if not acked_already:
                        self._inflight[info.mid] = msg.id
                if acked_already:
                    self._broker_has(msg.id)
            if not batch:
                with self._wake:
                    self._wake.wait(0.25)

    def _broker_has(self, record_id: int) -> None:
        """The broker acknowledged a record: delivered, or (consumer_ack, an event) waiting for the consumer."""
        with self._wake:
            key, kind = self._record_keys.pop(record_id, ("", ""))
            wait = self.cfg.consumer_ack and kind == "event"
            if wait and key in self._acked_early:  # the consumer was quicker than the PUBACK
                del self._acked_early[key]
                wait = False
            elif wait:
                self._awaiting[key] = (record_id, time.monotonic())
        if not wait:
            self.outbox.ack(record_id, self.name)
            self.delivered += 1

    def _resend_unacknowledged(self, now: float) -> None:
        """Events the consumer has not acknowledged ``ack_timeout_s`` after their PUBACK go out again."""
        with self._wake:
            due = [key for key, (_, at) in self._awaiting.items() if now - at >= self.cfg.ack_timeout_s]
            if not due:
                return
            first = min(self._awaiting.pop(key)[0] for key in due)
            self._handed = min(self._handed, first - 1)
            said, self._resend_said = self._resend_said, True
        if not said:
            log.info("MQTT: %d event(s) not acknowledged by the consumer on %s within %g s; publishing them again "
                     "until it does (mqtt.consumer_ack)", len(due), self.ack_topic, self.cfg.ack_timeout_s)

    def _on_ack(self, payload: bytes) -> None:
        """``{base}/ack`` (consumer_ack): each key named settles its event for this sink; unknown keys are
        remembered briefly (the ack may beat the PUBACK) and otherwise ignored."""
        try:
            value = parse_network_json(payload)
            problem = payload_problem("ack", value)
        except PayloadRefused as exc:
            problem = str(exc)
        if problem is not None:
            self.acks_refused += 1
            self._say_once("ack refused", logging.WARNING, "MQTT: refused an ack on %s (%s); expected %s; further "
                           "ones are counted, not logged", self.ack_topic, shown(problem, 200),
                           '{"keys": ["<event_id>:<type>:<seq>", ...]}')
            return
        settled = []
        with self._wake:
            for key in value["keys"]:
                entry = self._awaiting.pop(key, None)
                if entry is not None:
                    settled.append(entry[0])
                else:
                    self._acked_early[key] = None
                    while len(self._acked_early) > self._ACKED_EARLY_MAX:
                        self._acked_early.popitem(last=False)
            if settled:
                self._resend_said = False
        for record_id in settled:
            self.outbox.ack(record_id, self.name)
            self.delivered += 1

    @staticmethod
    def _snapshot_message(record: Record) -> tuple[bytes, Properties]:
        """The JPEG as it is, with MQTT 5 user properties (event_id, score, camera, frame, ts) that match it to
        its event without opening it."""
        meta, jpeg = split_snapshot(record.payload)
        meta.setdefault("event_id", record.key.rsplit(":", 1)[0])
        meta.setdefault("camera", record.camera)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [(key, str(meta[key])) for key in SNAPSHOT_PROPERTIES if key in meta]
        return jpeg, props

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._refused(str(reason_code))
            return
        # Subscribe before saying online: the broker handles a client's packets in order, so a SCADA that sends a
        # command as soon as it sees "online" finds the subscription in place (said first, a loaded station lost
        # the first commands sent after it).
        client.subscribe(f"{self.base}/cmd/#", qos=1)
        if self.cfg.consumer_ack:
            client.subscribe(self.ack_topic, qos=1)
            with self._wake:  # the broker may have lost what it had acknowledged: publish it again now
                self._awaiting = {key: (rid, -math.inf) for key, (rid, _) in self._awaiting.items()}
        self._publish_online()
        if self._last_stats is not None:
            client.publish(f"{self.base}/stats", self._last_stats, qos=0, retain=True)
        if self._last_health is not None:
            client.publish(f"{self.base}/health", self._last_health, qos=1, retain=True)
        client.reconnect_delay_set(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        with self._lock:
            was_out = self._outage_reported
            self._outage_reported = False
            self._refusal = None
        held = self.pending
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
        else is ignored (unknown, not an object) or refused (poison), counted and logged once per command and
        cause. Returning normally acknowledges the message, so the broker does not send it again."""
        topic = msg.topic
        if self.cfg.consumer_ack and topic == self.ack_topic:
            self._on_ack(bytes(msg.payload))
            return
        name = topic[len(self.base) + len("/cmd/"):] if topic.startswith(f"{self.base}/cmd/") else ""
        handler = self.commands.get(name)
        if handler is None:
            self.commands_ignored += 1
            self._say_once("unknown command", logging.WARNING, "MQTT: ignored command on %s (unknown command); "
                           "further unknown commands are counted, not logged", shown(topic))
            return
        payload = bytes(msg.payload)
        if payload.strip():
            try:
                value = parse_network_json(payload)
            except PayloadRefused as exc:
                if exc.cause == "not JSON":
                    self._ignored(name, topic)
                    return
                self.commands_refused += 1
                self._say_once(f"{name}: {exc.cause}", logging.WARNING, "MQTT: refused command on %s (%s); "
                               "acknowledged and dropped; further ones are counted, not logged", shown(topic), exc)
                return
            if not isinstance(value, dict):
                self._ignored(name, topic)
                return
        log.info("MQTT: command %s received", name)
        handler(payload)

    def _ignored(self, name: str, topic: str) -> None:
        self.commands_ignored += 1
        self._say_once(f"{name}: not an object", logging.WARNING, "MQTT: ignored command on %s (payload is not "
                       "empty or a JSON object)", shown(topic))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        with self._wake:
            record_id = self._inflight.pop(mid, None)
            if record_id is None:  # not ours yet (or a status/stats publish): remember it briefly
                if getattr(reason_code, "is_failure", False):
                    self._publish_was_refused(str(reason_code), "a status, stats or health message")
                now = time.monotonic()
                self._early[mid] = now
                while self._early and next(iter(self._early.values())) < now - self._EARLY_ACK_TTL_S:
                    self._early.popitem(last=False)
                return
            self._wake.notify_all()
        if getattr(reason_code, "is_failure", False):
            with self._wake:
                self._record_keys.pop(record_id, None)
            self._publish_was_refused(str(reason_code), "an event or snapshot; dropped from the spool")
            self.outbox.settle(record_id, self.name, "refused")
            self.failed += 1
            return
        self._broker_has(record_id)

    def _publish_was_refused(self, cause: str, what: str) -> None:
        """A PUBACK >= 0x80 (an ACL's "Not authorized", a quota): counted, and logged once per cause."""
        self.publish_refused[cause] += 1
        hint = " (check the broker's ACL: this station may write only under its own topics)" \
            if "authori" in cause.lower() else ""
        self._say_once(f"publish refused: {cause}", logging.ERROR, "MQTT: the broker refused a publish (%s)%s: %s; "
                       "further refusals are counted, not logged", cause, hint, what)

    def _report_outage(self, why: str) -> None:
        """One plain line per outage (caller holds the lock)."""
        if self._outage_reported:
            return
        self._outage_reported = True
        log.warning("MQTT broker %s %s; still processing and retrying; events are kept in the spool "
                    "(%d now) and sent when it is back", self.url, why, self.pending)


def check_url(cfg: StationConfig) -> None:
    """A bad broker URL is a one-line error before anything heavy is loaded."""
    parse_mqtt_url(cfg.mqtt.url)


@register_sink("mqtt", check=check_url)
def mqtt_sink(ctx: SinkContext) -> MqttSink:
    """The MQTT sink of ``ctx.cfg.mqtt``; the commands arrive on ``{prefix}/{station}/cmd/<name>``."""
    return MqttSink(ctx.cfg.mqtt, ctx.cfg.station, ctx.outbox, ctx.commands)
