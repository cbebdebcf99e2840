"""The live page through the real edge-run: a video with a planted defect, the page, its JSON and each camera's
frame fetched over a real socket while the station scores; the heat map lies where the defect is and nowhere
else; a model with a score only shows the plain frame; a port in use is one line. The overlay's geometry is
checked against core.preprocess.resize_frame for every resize mode."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import onnx
import pytest
from edge_helpers import (
    BRIGHT,
    REPO,
    assert_one_line_error,
    cli_command,
    free_port,
    run_cli,
    stop_station,
    toy_model,
    write_video,
)

from core.bundle import new_version_dir, write_manifest
from core.preprocess import RESIZE_MODES, resize_frame
from edge.config import StationConfig, load_station_config
from edge.live import JPEG_QUALITY, heat_overlay, heat_strength

FRAME_HW = (96, 128)  # the camera's frames; the toy model takes 32x32
DEFECT_ROWS, DEFECT_COLS = (24, 72), (32, 96)  # edge_helpers.make_frame's bright square: the middle quarter


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def clip_frames(clip: Path) -> list[np.ndarray]:
    """The clip's frames as the page would show them without a heat map: decoded, then JPEG'd as the page does."""
    cap = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1],
                                   cv2.IMREAD_COLOR))
    cap.release()
    return frames


def start_station(tmp_path: Path, clip: Path, engine: Path, broker: str, port: int) -> subprocess.Popen:
    """edge-run on ``clip`` read at 10 frames/s (as a camera delivers it), the live page on ``port``."""
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-livepage
state_dir: {tmp_path / 'state'}
cameras:
  - {{id: cam0, source: '{clip}', max_fps: 10}}
events: {{cooldown_s: 0.1}}
live: {{port: {port}}}
""", encoding="utf-8")
    return subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", engine, "--mqtt", broker],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)


def fetch_frame(port: int) -> Optional[tuple[int, np.ndarray]]:
    """The camera's latest overlaid frame and its index, or None before the first one."""
    code, headers, body = get(f"http://127.0.0.1:{port}/cam/cam0.jpg")
    if code == 503:
        return None
    assert code == 200 and headers["Content-Type"] == "image/jpeg", (code, headers, body[:200])
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "the page's frame is not a JPEG"
    return int(headers["X-Frame-Index"]), image


def test_the_live_page_shows_the_frame_its_heat_map_the_score_and_the_events(
        tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    clip = write_video(tmp_path / "line.avi", [(40, 100)], 140, size=FRAME_HW, fps=10.0, seed=1)
    raw = clip_frames(clip)
    port = free_port()
    proc = start_station(tmp_path, clip, toy_bundle, mosquitto, port)
    page = b""
    statuses: list[dict[str, Any]] = []
    good: Optional[tuple[int, np.ndarray]] = None
    defect: Optional[tuple[int, np.ndarray]] = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            try:
                if not page:
                    page = get(f"http://127.0.0.1:{port}/")[2]
                statuses.append(json.loads(get(f"http://127.0.0.1:{port}/api/status")[2]))
                got = fetch_frame(port)
            except OSError:  # not listening yet
                continue
            if got is not None and (got[0] < 40 or got[0] >= 100):
                good = good or got
            elif got is not None and 44 <= got[0] < 96:  # well inside the defect stretch: an event is open
                defect = defect or got
            if good and defect and any(s["events"] and s["cameras"][0]["state"] == "event" for s in statuses):
                break
    finally:
        err = stop_station(proc)
    assert proc.returncode in (0, 3), err  # 3: stopped before the broker acknowledged every event
    assert b"<script>" in page and b"api/status" in page and b"src=\"http" not in page  # works offline
    assert statuses, err
    last = statuses[-1]
    assert last["station"] == "st-livepage" and last["model"] == "toy" and last["model_version"] == toy_bundle.name
    assert last["threshold"] == pytest.approx(0.1)
    cam = last["cameras"][0]
    assert cam["id"] == "cam0" and isinstance(cam["score"], float) and cam["map"] is True
    assert cam["size"] == {"height": FRAME_HW[0], "width": FRAME_HW[1]}
    in_event = next((s for s in statuses if s["cameras"][0]["state"] == "event" and s["events"]), None)
    assert in_event is not None, [s["cameras"][0]["state"] for s in statuses]
    start = in_event["events"][0]
    assert start["type"] == "start" and start["camera"] == "cam0" and 40 <= start["frame"] < 100
    assert in_event["cameras"][0]["score"] >= in_event["threshold"]

    assert good is not None and defect is not None, (good, defect)
    for _, image in (good, defect):
        assert image.shape == (*FRAME_HW, 3)  # the camera's own size, not the model's 32x32
    good_diff = np.abs(good[1].astype(int) - raw[good[0]].astype(int)).mean(axis=2)
    assert good_diff.mean() < 5, good_diff.mean()  # no heat: two JPEG decoders differ by a few levels, no more
    diff = np.abs(defect[1].astype(int) - raw[defect[0]].astype(int)).mean(axis=2)
    (r0, r1), (c0, c1) = DEFECT_ROWS, DEFECT_COLS
    margin = 8  # the map is 32x32, scaled up 3x/4x linearly: its edge blurs over a few pixels
    inside = diff[r0 + margin:r1 - margin, c0 + margin:c1 - margin]
    outside = np.ones(FRAME_HW, bool)
    outside[r0 - margin:r1 + margin, c0 - margin:c1 + margin] = False
    assert inside.mean() > 60, inside.mean()  # the heat is drawn over the defect ...
    assert diff[outside].mean() < good_diff.mean() + 2, (diff[outside].mean(), good_diff.mean())  # ... only there
    b, _, r = (defect[1][r0 + margin:r1 - margin, c0 + margin:c1 - margin].astype(int)[..., k].mean() for k in range(3))
    assert r - b > 60, (r, b)  # hot (red) where the white defect was


def score_only_bundle(engines: Path) -> Path:
    """The toy model without its anomaly_map output: a bundle that gives a score only."""
    model = toy_model((32, 32))
    kept = [o for o in model.graph.output if o.name == "score"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.checker.check_model(model)
    bundle = new_version_dir(engines, "toy-score")
    onnx.save(model, str(bundle / "model.onnx"))
    write_manifest(bundle, model_name="toy-score", input_spec={"height": 32, "width": 32},
                   outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]}],
                   calibration={"threshold": 0.1, "method": "fixed (toy)"},
                   training_data={"count": 0, "hash": "none"}, metrics={})
    return bundle


def test_a_model_with_a_score_only_shows_the_plain_frame(tmp_path: Path, mosquitto: str) -> None:
    clip = write_video(tmp_path / "line.avi", [(0, 80)], 80, size=FRAME_HW, fps=10.0, seed=2)
    raw = clip_frames(clip)
    port = free_port()
    proc = start_station(tmp_path, clip, score_only_bundle(tmp_path / "engines"), mosquitto, port)
    got = None
    status: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and got is None:
            time.sleep(0.1)
            try:
                status = json.loads(get(f"http://127.0.0.1:{port}/api/status")[2])
                got = fetch_frame(port)
            except OSError:
                continue
    finally:
        err = stop_station(proc)
    assert got is not None, err
    index, image = got
    assert status["cameras"][0]["map"] is False
    assert image.shape == (*FRAME_HW, 3)
    diff = np.abs(image.astype(int) - raw[index].astype(int)).mean(axis=2)
    assert diff.mean() < 5, diff.mean()  # a defect frame (score above the threshold), drawn plain: no map


def test_a_live_port_in_use_is_one_line(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    clip = write_video(tmp_path / "line.avi", [], 10, size=FRAME_HW)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "st.yaml"
        cfg.write_text(f"station: st-busy\nstate_dir: {tmp_path / 'state'}\nlive: {{port: {port}}}\n",
                       encoding="utf-8")
        proc = run_cli("edge-run", ["--config", cfg, "--camera", clip, "--engine", toy_bundle, "--mqtt", mosquitto],
                       cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", f"live.port {port}", "cannot listen", "set it to 0 (off)")


def test_station_yaml_documents_the_live_defaults() -> None:
    assert load_station_config(REPO / "config" / "station.yaml").live == StationConfig().live
    assert StationConfig().live.port == 0 and StationConfig().live.bind == "127.0.0.1"  # off, localhost


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_the_heat_map_lands_where_the_model_saw_the_defect(mode: str) -> None:
    """A bright square in a camera frame, fitted to the model like the station fits it; the toy model's map on
    that input (the fraction of bright channels) drawn back on the frame covers the square and nothing else."""
    frame = np.full((*FRAME_HW, 3), 60, np.uint8)
    (r0, r1), (c0, c1) = DEFECT_ROWS, DEFECT_COLS
    frame[r0:r1, c0:c1] = 255
    fitted = resize_frame(frame, (32, 32), mode)
    amap = (fitted > BRIGHT).mean(axis=2).astype(np.float32)
    drawn = heat_overlay(frame, amap, 1.0, (32, 32), mode)
    changed = np.abs(drawn.astype(int) - frame.astype(int)).max(axis=2) > 0
    margin = 6
    assert changed[r0 + margin:r1 - margin, c0 + margin:c1 - margin].all()
    away = np.ones(FRAME_HW, bool)
    away[r0 - margin:r1 + margin, c0 - margin:c1 + margin] = False
    assert not changed[away].any()  # the map at its floor leaves the camera's pixels as they were


def test_heat_is_faint_for_a_good_part_and_full_at_the_threshold() -> None:
    frame = np.full((*FRAME_HW, 3), 60, np.uint8)
    amap = np.zeros((32, 32), np.float32)
    amap[8:16, 8:16] = 1.0
    assert heat_strength(0.5, threshold=1.0, baseline=0.5) == 0.0
    assert heat_strength(0.75, threshold=1.0, baseline=0.5) == pytest.approx(0.5)
    assert heat_strength(3.0, threshold=1.0, baseline=0.5) == 1.0
    assert heat_strength(float("nan"), threshold=1.0, baseline=0.5) == 0.0
    assert heat_overlay(frame, amap, 0.0, (32, 32), "stretch") is frame
    assert heat_overlay(frame, np.zeros((32, 32), np.float32), 1.0, (32, 32), "stretch") is frame  # a flat map
    half = heat_overlay(frame, amap, 0.5, (32, 32), "stretch").astype(int)
    full = heat_overlay(frame, amap, 1.0, (32, 32), "stretch").astype(int)
    spot = (slice(30, 40), slice(40, 56))  # the map's hot cell on the frame
    assert 0 < np.abs(half[spot] - 60).mean() < np.abs(full[spot] - 60).mean()


def read_part(stream: Any, boundary: bytes) -> tuple[dict[str, str], bytes]:
    """The next part of a multipart/x-mixed-replace stream: its headers and its body."""
    line = stream.readline()
    while line.strip() != b"--" + boundary:
        assert line, "the stream ended"
        line = stream.readline()
    headers = {}
    while (line := stream.readline().strip()):
        key, _, value = line.decode().partition(":")
        headers[key.strip()] = value.strip()
    return headers, stream.read(int(headers["Content-Length"]))


def test_three_mjpeg_viewers_over_https_with_basic_auth(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    """Three MJPEG streams at once over TLS, each sent newer frames; no credentials or plain HTTP get nothing."""
    from pki import Pki

    pki = Pki(tmp_path / "pki")
    server = pki.server("live", ["localhost"], ips=("127.0.0.1",))
    clip = write_video(tmp_path / "line.avi", [(40, 60)], 200, size=FRAME_HW, fps=10.0, seed=4)
    port = free_port()
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-tls
state_dir: {tmp_path / 'state'}
cameras:
  - {{id: cam0, source: '{clip}', max_fps: 10}}
live: {{port: {port}, refresh_s: 0.3, username: op, password_env: LIVE_PW, tls_cert: '{server.cert}',
        tls_key: '{server.key}'}}
""", encoding="utf-8")
    proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle, "--mqtt", mosquitto],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ, "LIVE_PW": "pw-1"})
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    auth = {"Authorization": "Basic " + base64.b64encode(b"op:pw-1").decode()}
    url = f"https://127.0.0.1:{port}/cam/cam0.mjpg"
    parts: dict[int, list[tuple[dict[str, str], bytes]]] = {}

    def view(i: int) -> None:
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=20, context=ctx) as resp:
            boundary = resp.headers["Content-Type"].split("boundary=")[1].encode()
            parts[i] = [read_part(resp, boundary) for _ in range(2)]

    denied: Optional[int] = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/", timeout=5, context=ctx)
            except urllib.error.HTTPError as exc:
                denied = exc.code
                break
            except OSError:
                time.sleep(0.1)
        viewers = [threading.Thread(target=view, args=(i,)) for i in range(3)]
        for v in viewers:
            v.start()
        for v in viewers:
            v.join(40)
        plain: Optional[int] = None
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)
        except urllib.error.HTTPError as exc:
            plain = exc.code
        except OSError:
            plain = -1  # no HTTP answer on the TLS port
    finally:
        err = stop_station(proc)
    assert proc.returncode in (0, 3), err
    assert denied == 401
    assert plain in (-1, 400), plain
    assert sorted(parts) == [0, 1, 2], err
    for got in parts.values():
        (h1, jpeg1), (h2, jpeg2) = got
        assert h1["Content-Type"] == "image/jpeg" and jpeg1[:2] == b"\xff\xd8" and jpeg2[:2] == b"\xff\xd8"
        assert int(h2["X-Frame-Index"]) > int(h1["X-Frame-Index"]), (h1, h2)  # a new part: a newer frame
        image = cv2.imdecode(np.frombuffer(jpeg2, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (*FRAME_HW, 3)
    assert "live page on https://127.0.0.1:" in err and "basic auth as 'op'" in err, err


@pytest.mark.parametrize("live, args, env, needles", [
    ("{port: PORT, username: op, password_env: LIVE_PW_UNSET}", [], {}, ["live.password_env names LIVE_PW_UNSET"]),
    ("{port: PORT, tls_cert: /nonexistent/live.crt}", [], {}, ["live.tls_cert /nonexistent/live.crt",
                                                              "cannot load"]),
    ("{port: PORT, bind: 0.0.0.0, allow_commands: true}", [], {}, ["live.allow_commands", "needs live.username"]),
    ("{port: 0}", ["--http", "localhost"], {}, ["--http", "HOST:PORT"]),
    ("{port: 0}", ["--http", "127.0.0.1:PORT"], {}, []),  # fine: --http turns the page on
], ids=["password-unset", "cert-unreadable", "commands-on-the-lan-without-a-user", "http-malformed", "http-ok"])
def test_live_page_settings_that_cannot_work_are_one_line(tmp_path: Path, mosquitto: str, toy_bundle: Path,
                                                          live: str, args: list[str], env: dict[str, str],
                                                          needles: list[str]) -> None:
    clip = write_video(tmp_path / "line.avi", [], 10, size=FRAME_HW)
    port = free_port()
    cfg = tmp_path / "st.yaml"
    settings = live.replace("PORT", str(port))
    cfg.write_text(f"station: st-live-settings\nstate_dir: {tmp_path / 'state'}\nlive: {settings}\n", encoding="utf-8")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", clip, "--engine", toy_bundle, "--mqtt", mosquitto,
                                "--max-frames", "5", *[a.replace("PORT", str(port)) for a in args]],
                   cwd=tmp_path, env=env)
    if needles:
        assert_one_line_error(proc, "edge-run", *needles)
    else:
        assert proc.returncode == 0, proc.stderr
        assert f"live page on http://127.0.0.1:{port}/ (no authentication, read-only)" in proc.stderr


def test_a_page_on_the_network_without_a_user_is_warned_about(tmp_path: Path, mosquitto: str,
                                                               toy_bundle: Path) -> None:
    clip = write_video(tmp_path / "line.avi", [], 10, size=FRAME_HW)
    proc = run_cli("edge-run", ["--camera", clip, "--engine", toy_bundle, "--mqtt", mosquitto, "--max-frames", "5",
                                "--state-dir", tmp_path / "state", "--http", f"0.0.0.0:{free_port()}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln and "without authentication" in ln]
    assert len(warned) == 1 and "live.username" in warned[0], proc.stderr
