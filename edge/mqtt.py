"""Connecting to an MQTT broker (paho-mqtt 2.x, MQTT 5): the broker URL, TLS, credentials, and why a
handshake failed. Shared by the station's MQTT sink (edge/sinks/mqtt.py) and ``edge-events``; the URL parser
carries its default ports with it.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from core.errors import UserError
from edge.config import MqttConfig, TlsConfig, redact_secrets

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
