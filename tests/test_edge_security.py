"""TLS and passwords against a real Mosquitto configured for them, with certificates generated here: what
works works, and what fails is named (a certificate problem, a host-name mismatch, refused credentials) once,
with what to check; secrets never reach the logs."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest
from edge_helpers import Collector, Mosquitto, check_events, check_payloads, free_port, run_cli, write_video
from paho.mqtt.enums import CallbackAPIVersion
from pki import Pair, Pki

from edge.config import redact_secrets
from edge.mqtt import parse_mqtt_url

FPS = 10.0
DEFECTS = [(5, 15)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "v.avi", DEFECTS, 30, fps=FPS)


def tls_broker(folder: Path, mosquitto_bin: str, ca: Path, server: Pair, plain_port: int,
               require_client_cert: bool = True) -> Mosquitto:
    """TLS on its own port (the station's), plain MQTT on ``plain_port`` for the test's subscriber."""
    conf = (f"cafile {ca}\ncertfile {server.cert}\nkeyfile {server.key}\n"
            f"require_certificate {'true' if require_client_cert else 'false'}\n"
            f"listener {plain_port} 127.0.0.1\n")
    return Mosquitto(folder, free_port(), mosquitto_bin, conf=conf, host="localhost", scheme="mqtts")


def station(tmp_path: Path, name: str, mqtt: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"station: {name}\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  flush_timeout_s: 3\n"
                    f"  reconnect_min_s: 1\n  refused_retry_s: 1\n{mqtt}", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, mosquitto_bin: str, pki: Pki) -> Iterator[tuple[Mosquitto, str]]:
    plain = free_port()
    b = tls_broker(tmp_path_factory.mktemp("tls-broker"), mosquitto_bin, pki.ca.cert,
                   pki.server("broker", ["localhost"], ("127.0.0.1",)), plain)
    try:
        yield b, f"mqtt://127.0.0.1:{plain}"
    finally:
        b.stop()


def test_mutual_tls_delivers_events(tmp_path: Path, broker: tuple[Mosquitto, str], pki: Pki, video: Path,
                                    toy_bundle: Path) -> None:
    b, plain = broker
    client = pki.client("station")
    cfg = station(tmp_path, "st-tls", f"  tls:\n    ca_certs: {pki.ca.cert}\n    certfile: {client.cert}\n"
                                      f"    keyfile: {client.key}\n")
    with Collector(plain, ["anomaly/st-tls/+/event"]) as col:
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", b.url],
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"MQTT connected to {b.url}" in proc.stderr
        assert col.wait_for(lambda ms: len(ms) >= 2)
        check_events(check_payloads(col)["event"], DEFECTS, "cam0")


def _failure_lines(proc: subprocess.CompletedProcess, needle: str) -> list[str]:
    assert proc.returncode == 3, proc.stderr  # it kept running, and says the events stay in the spool
    assert "Traceback" not in proc.stderr and "unreachable" not in proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if needle in ln]


def test_a_wrong_ca_is_reported_as_a_certificate_problem_once(tmp_path: Path, broker: tuple[Mosquitto, str],
                                                              pki: Pki, video: Path, toy_bundle: Path) -> None:
    b, _ = broker
    wrong = Pki(tmp_path / "other", "some-other-ca")
    client = pki.client("station2")
    cfg = station(tmp_path, "st-wrong-ca", f"  tls:\n    ca_certs: {wrong.ca.cert}\n    certfile: {client.cert}\n"
                                           f"    keyfile: {client.key}\n")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", b.url],
                   cwd=tmp_path)
    lines = _failure_lines(proc, "certificate is not trusted")
    assert len(lines) == 1 and "mqtt.tls.ca_certs" in lines[0], proc.stderr


def test_a_host_name_mismatch_is_named(tmp_path: Path, mosquitto_bin: str, pki: Pki, video: Path,
                                       toy_bundle: Path) -> None:
    b = tls_broker(tmp_path / "broker", mosquitto_bin, pki.ca.cert, pki.server("plant", ["broker.plant"]),
                   free_port(), require_client_cert=False)
    try:
        cfg = station(tmp_path, "st-name", f"  tls:\n    ca_certs: {pki.ca.cert}\n")
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", b.url],
                       cwd=tmp_path)
    finally:
        b.stop()
    lines = _failure_lines(proc, "does not match the host name 'localhost'")
    assert len(lines) == 1, proc.stderr


def test_tls_files_that_do_not_exist_refuse_to_start(tmp_path: Path, pki: Pki, video: Path,
                                                     toy_bundle: Path) -> None:
    cfg = station(tmp_path, "st-nofile", f"  tls:\n    ca_certs: {tmp_path / 'missing-ca.crt'}\n")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle,
                                "--mqtt", "mqtts://localhost:8883"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"edge-run: error: mqtt.tls.ca_certs: {tmp_path / 'missing-ca.crt'} does not exist; the config asks for " \
        "TLS with it"


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory: pytest.TempPathFactory, mosquitto_bin: str) -> Iterator[Mosquitto]:
    folder = tmp_path_factory.mktemp("pw-broker")
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-c", "-b", str(folder / "passwords"), "station", "s3cret-pw"], check=True)
    subprocess.run([passwd, "-b", str(folder / "passwords"), "scada", "scada-pw"], check=True)
    b = Mosquitto(folder, free_port(), mosquitto_bin, anonymous=False, conf=f"password_file {folder / 'passwords'}\n")
    try:
        yield b
    finally:
        b.stop()


def test_right_password_from_the_environment_delivers(tmp_path: Path, password_broker: Mosquitto, video: Path,
                                                      toy_bundle: Path) -> None:
    cfg = station(tmp_path, "st-pw", "  username: station\n  password_env: EDGE_TEST_MQTT_PASSWORD\n")
    with Collector(password_broker.url, ["anomaly/st-pw/+/event"], auth=("scada", "scada-pw")) as col:
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle,
                                    "--mqtt", password_broker.url], cwd=tmp_path,
                       env={"EDGE_TEST_MQTT_PASSWORD": "s3cret-pw"})
        assert proc.returncode == 0, proc.stderr
        assert col.wait_for(lambda ms: len(ms) >= 2)
    assert "s3cret-pw" not in proc.stderr


def test_wrong_credentials_are_named_once_and_never_logged(tmp_path: Path, password_broker: Mosquitto,
                                                           video: Path, toy_bundle: Path) -> None:
    cfg = station(tmp_path, "st-badpw", "")
    url = password_broker.url.replace("mqtt://", "mqtt://station:not-the-pw@")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", url],
                   cwd=tmp_path)
    lines = _failure_lines(proc, "refused the connection")
    assert len(lines) == 1, proc.stderr  # said once, though it retried during the flush
    assert "Not authorized" in lines[0] and "check mqtt.username and the password" in lines[0]
    assert "not-the-pw" not in proc.stderr


@pytest.mark.parametrize(("source", "secrets"), [
    ("rtsp://admin:cam-secret@127.0.0.1:1/stream", ["cam-secret"]),
    ("rtsp://user:p@ss@127.0.0.1:1/stream", ["p@ss", "ss@"]),  # a password holding '@'
    ("http://127.0.0.1:1/video.mjpg?user=op&pass=hunter2&fps=5", ["hunter2"]),
    ("http://127.0.0.1:1/video.mjpg?password=hunter2", ["hunter2"]),
    ("http://127.0.0.1:1/video.mjpg?token=t0k3n&key=k3y", ["t0k3n", "k3y"]),
])
def test_camera_credentials_never_reach_the_log(tmp_path: Path, toy_bundle: Path, source: str,
                                                secrets: list[str]) -> None:
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"cameras:\n  - id: cam0\n    source: '{source}'\n    wait_at_start: false\n")
    proc = run_cli("edge-run", ["--config", cfg, "--engine", toy_bundle, "--state-dir", tmp_path / "state",
                                "--mqtt", "mqtt://127.0.0.1:1"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "127.0.0.1:1" in proc.stderr and not any(s in proc.stderr for s in secrets), proc.stderr
    if "@" in source:
        assert "rtsp://***@127.0.0.1:1/stream" in proc.stderr


@pytest.mark.parametrize(("text", "shown_as"), [
    ("rtsp://admin:cam-secret@cam1/stream", "rtsp://***@cam1/stream"),
    ("rtsp://user:p@ss@cam1/stream", "rtsp://***@cam1/stream"),
    ("http://cam1/v.mjpg?user=op&pass=s3c&fps=5", "http://cam1/v.mjpg?user=op&pass=***&fps=5"),
    ("http://cam1/v?password=s3c", "http://cam1/v?password=***"),
    ("https://cam1/v?token=T0K&key=K3Y&api_key=A", "https://cam1/v?token=***&key=***&api_key=***"),
    ("http_proxy=http://proxy-user:pr0xy@proxy:3128", "http_proxy=http://***@proxy:3128"),
    ("rtspsrc location=rtsp://cam1/s user-id=a user-pw=\"se cret\" proxy-id=b proxy-pw=pp ! appsink",
     "rtspsrc location=rtsp://cam1/s user-id=a user-pw=*** proxy-id=b proxy-pw=*** ! appsink"),
    ("/dev/video0", "/dev/video0"),
    ("x264enc key-int-max=30 ! monkey=1", "x264enc key-int-max=30 ! monkey=1"),
])
def test_redact_secrets_masks_each_form(text: str, shown_as: str) -> None:
    assert redact_secrets(text) == shown_as


def test_use_username_as_clientid_stops_a_client_id_takeover(tmp_path: Path, mosquitto_bin: str) -> None:
    """Station st-b, with its own good credentials, connects under st-a's client id: on a broker configured as
    the shipped example (use_username_as_clientid true), st-a stays connected; without it, st-a is kicked off
    (the takeover this guards against)."""
    repo = Path(__file__).resolve().parents[1]
    example = (repo / "config" / "mosquitto" / "mosquitto.conf.example").read_text(encoding="utf-8")
    assert "use_username_as_clientid true" in example.splitlines()
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-c", "-b", str(tmp_path / "passwords"), "st-a", "pw-a"], check=True)
    subprocess.run([passwd, "-b", str(tmp_path / "passwords"), "st-b", "pw-b"], check=True)
    acl = repo / "config" / "mosquitto" / "acl"
    kicked = {}
    for shipped in (True, False):
        conf = f"password_file {tmp_path / 'passwords'}\nacl_file {acl}\n"
        conf += "use_username_as_clientid true\n" if shipped else ""
        b = Mosquitto(tmp_path / f"broker-{shipped}", free_port(), mosquitto_bin, anonymous=False, conf=conf)
        try:
            a_lost = threading.Event()
            a = _client(b.url, "edge-st-a", ("st-a", "pw-a"))
            a.on_disconnect = lambda *_, lost=a_lost: lost.set()
            intruder = _client(b.url, "edge-st-a", ("st-b", "pw-b"))
            kicked[shipped] = a_lost.wait(2.0)
            for c in (a, intruder):
                c.disconnect()
                c.loop_stop()
        finally:
            b.stop()
    assert kicked == {True: False, False: True}, kicked


def _client(url: str, client_id: str, auth: tuple[str, str]) -> mqtt.Client:
    """A connected MQTT 5 client (connection accepted), its loop running."""
    u = parse_mqtt_url(url)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(*auth)
    up = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: up.set() if not rc.is_failure else None
    c.connect(u.host, u.port)
    c.loop_start()
    assert up.wait(5), f"{auth[0]} could not connect"
    return c


def test_a_missing_client_certificate_is_named(tmp_path: Path, broker: tuple[Mosquitto, str], pki: Pki,
                                               video: Path, toy_bundle: Path) -> None:
    b, _ = broker  # this broker requires a client certificate
    cfg = station(tmp_path, "st-nocert", f"  tls:\n    ca_certs: {pki.ca.cert}\n")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", b.url],
                   cwd=tmp_path)
    lines = _failure_lines(proc, "client certificate")
    assert len(lines) == 1 and "mqtt.tls.certfile" in lines[0], proc.stderr


def test_the_shipped_acl_lets_a_station_write_only_its_own_topics(tmp_path: Path, mosquitto_bin: str,
                                                                  video: Path, toy_bundle: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-c", "-b", str(tmp_path / "passwords"), "st-acl", "pw1"], check=True)
    subprocess.run([passwd, "-b", str(tmp_path / "passwords"), "scada", "pw2"], check=True)
    b = Mosquitto(tmp_path / "broker", free_port(), mosquitto_bin, anonymous=False,
                  conf=f"password_file {tmp_path / 'passwords'}\nacl_file {repo / 'config' / 'mosquitto' / 'acl'}\n")
    try:
        with Collector(b.url, ["anomaly/#"], auth=("scada", "pw2")) as col:
            own = station(tmp_path, "st-acl", "  username: st-acl\n  password_env: EDGE_ACL_PW\n")
            ok = run_cli("edge-run", ["--config", own, "--camera", video, "--engine", toy_bundle, "--mqtt", b.url],
                         cwd=tmp_path, env={"EDGE_ACL_PW": "pw1"})
            assert ok.returncode == 0, ok.stderr
            # The same credentials posing as another station: the broker refuses every message.
            other = station(tmp_path, "st-other", "  username: st-acl\n  password_env: EDGE_ACL_PW\n")
            bad = run_cli("edge-run", ["--config", other, "--camera", video, "--engine", toy_bundle,
                                       "--mqtt", b.url], cwd=tmp_path, env={"EDGE_ACL_PW": "pw1"})
            refused = [ln for ln in bad.stderr.splitlines() if "the broker refused a publish (Not authorized)" in ln]
            assert len(refused) == 1 and "ACL" in refused[0], bad.stderr  # counted; said once per cause
            col.wait_for(lambda ms: False, timeout=1.0)
            topics = {m.topic for m in col.messages}
    finally:
        b.stop()
    assert "anomaly/st-acl/cam0/event" in topics and "anomaly/st-acl/status" in topics
    assert not any(t.startswith("anomaly/st-other/") for t in topics), topics


def test_password_from_a_file_only_the_owner_can_read(tmp_path: Path, password_broker: Mosquitto, video: Path,
                                                      toy_bundle: Path) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o644)
    cfg = station(tmp_path, "st-pwfile", f"  username: station\n  password_file: {secret}\n")
    args = ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--mqtt", password_broker.url]
    proc = run_cli("edge-run", args, cwd=tmp_path)
    assert proc.returncode == 2 and "is readable by group or others (mode 644); chmod 600 it" in proc.stderr
    secret.chmod(0o600)
    proc = run_cli("edge-run", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "s3cret-pw" not in proc.stderr
