"""The webhook sink: each event POSTed as JSON to ``webhook.url``, retried from the outbox until a 2xx.

One record at a time, oldest first, on its own thread (a receiver sees events in seq order). Each POST carries
``Idempotency-Key: <event_id>:<type>:<seq>`` (a snapshot: ``<event_id>:snapshot``): delivery is at least once,
so the receiver de-duplicates on it, as an MQTT subscriber does on (event_id, type, seq).

What an answer means:
- 2xx: delivered; the record is settled for this sink.
- 408, 429, 5xx, no answer (refused connection, timeout, TLS failure): the receiver is away; the same record is
  tried again after a back-off that doubles from ``retry_min_s`` up to ``retry_max_s`` (a ``Retry-After`` in
  seconds is honoured within that cap). Nothing is dropped: records wait in the outbox (bounded by ``spool:``).
- any other answer (400, 401, 403, 404, 413, 3xx, …): refused. It is retried with the same back-off, since a
  receiver being redeployed answers 404 for a while; after ``max_refusals`` refusals of one record that record
  is dropped for this sink (settled ``refused``, counted in the stats' ``sinks.webhook.failed``) so one payload
  the receiver will never take cannot block every later event. Each cause (status and reason) is logged once.

Secrets never reach a log: a user and password in the URL become a basic-auth header and are cut from the URL
that logs show (so is a query string); a bearer token comes from the environment variable ``token_env``. TLS
follows the URL's scheme (https), verified against the system CAs or ``ca_certs``. Stdlib only (http.client).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from core.errors import UserError
from edge.config import StationConfig, WebhookConfig, redact_secrets
from edge.outbox import Outbox
from edge.outbox_file import Record, split_snapshot
from edge.sinks import SinkContext, register_sink

log = logging.getLogger("edge.webhook")

RETRIED_STATUSES = (408, 429)  # besides 5xx: "try again later"
BATCH = 32  # records read from the outbox at a time


@dataclass(frozen=True)
class WebhookUrl:
    """Where to POST, without the credentials the URL may carry."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, as sent
    username: Optional[str] = None
    password: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:  # what logs show: no credentials, no query
        return f"{self.scheme}://{self.host}:{self.port}{self.target.split('?', 1)[0]}"


def parse_webhook_url(url: str) -> WebhookUrl:
    """``http(s)://[user:password@]host[:port]/path``; anything else is a one-line UserError without secrets."""
    shown = redact_secrets(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UserError(f"webhook.url {shown!r}: {exc}; expected http(s)://host[:port]/path") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"webhook.url {shown!r}: expected http(s)://host[:port]/path")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookUrl(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), target,
                      unquote(parts.username) if parts.username else None,
                      unquote(parts.password) if parts.password else None)


def check_settings(cfg: StationConfig) -> None:
    """URL, token variable and CA file, before anything heavy is loaded."""
    w = cfg.webhook
    parse_webhook_url(w.url)
    if w.token_env and os.environ.get(w.token_env) is None:
        raise UserError(f"webhook.token_env names {w.token_env}, which is not set in the environment")
    if w.ca_certs and not os.path.isfile(w.ca_certs):
        raise UserError(f"webhook.ca_certs: {w.ca_certs} does not exist")


class WebhookSink:
    """POSTs outbox records to one URL (see the module docstring for what each answer means)."""

    name = "webhook"

    def __init__(self, cfg: WebhookConfig, station: str, outbox: Outbox) -> None:
        self.cfg = cfg
        self.station = station
        self.outbox = outbox
        self.flush_timeout_s = cfg.flush_timeout_s
        self.url = parse_webhook_url(cfg.url)
        self._headers = {"Content-Type": "application/json", "User-Agent": f"edge-anomaly-station/{station}"}
        if self.url.username is not None:
            pair = f"{self.url.username}:{self.url.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if token is None:
                raise UserError(f"webhook.token_env names {cfg.token_env}, which is not set in the environment")
            self._headers["Authorization"] = f"Bearer {token}"
        self._tls: Optional[ssl.SSLContext] = None
        if self.url.tls:
            try:
                self._tls = ssl.create_default_context(cafile=cfg.ca_certs)
            except (OSError, ssl.SSLError) as exc:
                raise UserError(f"webhook.ca_certs: cannot load {cfg.ca_certs} ({exc})") from None
        self.delivered = 0
        self.failed = 0
        self._connected = False
        self._refusals: dict[int, int] = {}  # record id -> refusals so far
        self._causes_said: set[str] = set()
        self._away_since: Optional[float] = None  # an outage is under way (said once)
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._sender_error: Optional[str] = None
        self._sender = threading.Thread(target=self._send_loop, name="webhook-sender", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._sender.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        self.wake()
        if self._sender.is_alive():
            self._sender.join(timeout + self.cfg.timeout_s)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def wait_first_attempt(self, timeout: float) -> bool:
        return True  # HTTP has no session to open first

    def flush(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        self.wake()
        while self.pending and time.monotonic() < deadline and self._sender.is_alive():
            time.sleep(0.02)
        return self.pending

    @property
    def pending(self) -> int:
        return self.outbox.waiting(self.name)

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict[str, Any]:
        return {"depth": self.pending, "delivered": self.delivered, "failed": self.failed,
                "connected": self.connected}

    def publish_stats(self, payload: bytes) -> None:
        """Stats stay MQTT's."""

    def publish_health(self, payload: bytes) -> None:
        """Health stays MQTT's."""

    def describe(self) -> str:
        return f"webhook {self.url}"

    def failure(self) -> Optional[str]:
        """None while the sender thread runs (or the sink was stopped), else why it does not."""
        if self._stopping.is_set() or not self._sender.ident or self._sender.is_alive():
            return None
        return f"webhook sink: the sender thread has died ({self._sender_error or 'unknown cause'})"

    # -- sending ------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        """The sender thread: survives what the outbox or a record can raise (said once per cause, tried again
        after the back-off); ``failure()`` names a cause only if it dies anyway."""
        while not self._stopping.is_set():
            try:
                self._send()
            except Exception as exc:  # noqa: BLE001 (the sender must outlive one bad record or a full disk)
                self._sender_error = f"{exc.__class__.__name__}: {exc}"
                cause = exc.__class__.__name__
                if cause not in self._causes_said:
                    self._causes_said.add(cause)
                    log.error("webhook %s: sending from the outbox failed (%s); retrying; further errors of "
                              "this kind are not logged", self.url, self._sender_error)
                self._stopping.wait(self.cfg.retry_min_s)

    def _send(self) -> None:
        delay = self.cfg.retry_min_s
        while not self._stopping.is_set():
            batch = self.outbox.pending(self.name, 0, BATCH)
            if not batch:
                with self._wake:
                    self._wake.wait(0.25)
                continue
            for record in batch:
                if self._stopping.is_set():
                    return
                if record.kind == "snapshot" and not self.cfg.snapshots:
                    self.outbox.settle(record.id, self.name, "skipped")
                    continue
                wait = self._deliver(record)
                if wait is None:
                    delay = self.cfg.retry_min_s
                    continue
                self._stopping.wait(min(max(wait, delay), self.cfg.retry_max_s))
                delay = min(delay * 2.0, self.cfg.retry_max_s)
                break  # start again from the oldest record this sink has not settled

    def _deliver(self, record: Record) -> Optional[float]:
        """POST one record; None when it is settled (delivered or finally refused), else the seconds the
        receiver asked to wait (0: the back-off decides)."""
        try:
            status, reason, retry_after = self._post(record)
        except (OSError, http.client.HTTPException) as exc:
            self._away(f"is unreachable ({exc.__class__.__name__}: {exc})")
            return 0.0
        if 200 <= status < 300:
            self._back(record)
            return None
        if status in RETRIED_STATUSES or status >= 500:
            self._away(f"answered {status} {reason}")
            return retry_after
        self._connected = True
        refusals = self._refusals.get(record.id, 0) + 1
        self._refusals[record.id] = refusals
        cause = f"{status} {reason}"
        if cause not in self._causes_said:
            self._causes_said.add(cause)
            log.error("webhook %s refused a record (HTTP %s); retried up to %d times, then dropped for this sink "
                      "and counted in stats (sinks.webhook.failed); check the receiver and webhook.url / "
                      "token_env", self.url, cause, self.cfg.max_refusals)
        if refusals >= self.cfg.max_refusals:
            del self._refusals[record.id]
            self.outbox.settle(record.id, self.name, "refused")
            self.failed += 1
            log.warning("webhook %s: dropped %s record %s after %d refusals (HTTP %s)", self.url, record.kind,
                        record.key, refusals, cause)
            return None
        return 0.0

    def _post(self, record: Record) -> tuple[int, str, float]:
        """(status, reason, Retry-After seconds or 0) of one POST; a new connection each time."""
        body = record.payload if record.kind == "event" else self._snapshot_body(record)
        headers = {**self._headers, "Idempotency-Key": record.key}
        conn: http.client.HTTPConnection
        if self._tls is not None:
            conn = http.client.HTTPSConnection(self.url.host, self.url.port, timeout=self.cfg.timeout_s,
                                               context=self._tls)
        else:
            conn = http.client.HTTPConnection(self.url.host, self.url.port, timeout=self.cfg.timeout_s)
        try:
            conn.request("POST", self.url.target, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            retry_after = resp.getheader("Retry-After") or ""
            return resp.status, resp.reason, float(retry_after) if retry_after.isdigit() else 0.0
        finally:
            conn.close()

    def _snapshot_body(self, record: Record) -> bytes:
        """The snapshot as JSON: the JPEG in base64, with what matches it to its event (event_id, and the peak's
        score, frame and ts when the record has them)."""
        meta, jpeg = split_snapshot(record.payload)
        body: dict[str, Any] = {"schema": 1, "type": "snapshot", "station": self.station, "camera": record.camera,
                                "event_id": meta.get("event_id", record.key.rsplit(":", 1)[0])}
        body.update({key: meta[key] for key in ("score", "frame", "ts") if key in meta})
        body.update(content_type="image/jpeg", data_base64=base64.b64encode(jpeg).decode())
        return json.dumps(body).encode()

    def _away(self, why: str) -> None:
        self._connected = False
        if self._away_since is None:
            self._away_since = time.monotonic()
            log.warning("webhook %s %s; still processing and retrying with back-off; events are kept in the spool "
                        "(%d now) and sent when it answers", self.url, why, self.pending)

    def _back(self, record: Record) -> None:
        self.outbox.ack(record.id, self.name)
        self.delivered += 1
        self._refusals.pop(record.id, None)
        self._connected = True
        if self._away_since is not None:
            log.info("webhook %s answers again after %.0f s; sending %d held record(s)", self.url,
                     time.monotonic() - self._away_since, self.pending)
            self._away_since = None


@register_sink("webhook", check=check_settings)
def webhook_sink(ctx: SinkContext) -> WebhookSink:
    """The webhook sink of ``ctx.cfg.webhook``."""
    return WebhookSink(ctx.cfg.webhook, ctx.cfg.station, ctx.outbox)
