"""TLS and passwords against a real Mosquitto configured for them, with certificates generated here: what
works works, and what fails is named (a certificate problem, a host-name mismatch, refused credentials) once,
with what to check; secrets never reach the logs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from edge_helpers import Collector, Mosquitto, check_events, check_payloads, free_port, run_cli, write_video
from pki import Pair, Pki

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


def test_camera_credentials_never_reach_the_log(tmp_path: Path, toy_bundle: Path) -> None:
    cfg = tmp_path / "st.yaml"
    cfg.write_text("cameras:\n  - id: cam0\n    source: rtsp://admin:cam-secret@127.0.0.1:1/stream\n"
                   "    wait_at_start: false\n")
    proc = run_cli("edge-run", ["--config", cfg, "--engine", toy_bundle, "--state-dir", tmp_path / "state",
                                "--mqtt", "mqtt://127.0.0.1:1"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "cam-secret" not in proc.stderr
    assert "rtsp://***@127.0.0.1:1/stream" in proc.stderr


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
            assert "refused a message (Not authorized)" in bad.stderr, bad.stderr
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
