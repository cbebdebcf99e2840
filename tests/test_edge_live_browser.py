"""The live page in a real browser: Debian's Chromium, headless, driven through its chromedriver by Selenium, on a
real edge-run (``--http``) scoring a generated clip with a defect stretch and publishing to a real Mosquitto.

The browser sees a camera frame arrive (the MJPEG stream), the score against the threshold and the defect's event
with its snapshot; the event snapshot endpoint serves nothing but the events the page lists. With live.username
set, every endpoint answers 401 without the right credentials, the page loads with them, and "calibrate now"
(allowed by live.allow_commands) starts the on-site calibration; from another site's page it is refused.

Chromium and chromedriver come from ``make browser`` (a dependency of ``make test``); without them these tests
fail, saying so, rather than skip."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from edge_helpers import cli_command, free_port, stop_station, write_lit_video, write_video
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

FRAME_HW = (96, 128)
DEFECT = (30, 70)  # frames of the clip that carry the planted defect
WAIT_S = 30.0  # the deadline of each wait in the browser (a loaded machine is slow; a broken page never gets there)


def find_binary(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}",) if Path(p).exists()), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver_path = find_binary("chromium"), find_binary("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("Chromium or chromedriver is not installed: `make browser` installs them (Debian's chromium and "
                    "chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def request(url: str, method: str = "GET", headers: Optional[dict[str, str]] = None,
            body: Optional[bytes] = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def start_station(tmp_path: Path, clip: Path, engine: Path, broker: str, port: int, live: str = "",
                  env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """edge-run on ``clip`` read at 10 frames/s (as a camera delivers it), the page on --http 127.0.0.1:port."""
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-browser
state_dir: {tmp_path / 'state'}
cameras:
  - {{id: cam0, source: '{clip}', max_fps: 10}}
events: {{cooldown_s: 0.1}}
live: {{refresh_s: 0.5{live}}}
""", encoding="utf-8")
    return subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", engine, "--mqtt", broker,
                             "--http", f"127.0.0.1:{port}"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    """Until the page's port answers (any status): edge-run binds it before the cameras open."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            request(f"http://127.0.0.1:{port}/api/status")
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"edge-run's page never listened on {port} (exit {proc.poll()})")


def js(driver: WebDriver, script: str) -> Any:
    return driver.execute_script(script)


FRAME_SHOWN = "const i = document.querySelector('img.frame'); return !!i && i.naturalWidth > 0;"
SCORE_TEXT = "const s = document.querySelector('.score-text'); return s ? s.textContent : '';"
SCORE_RE = re.compile(r"score (\d[\d.e+-]*) / threshold (0\.1000)")  # the toy bundle's threshold: 0.1
START_ROW = """const r = document.querySelector('#events tr.start'); if (!r) return null;
const img = r.querySelector('img.snap'); if (!img || img.naturalWidth === 0) return null;
return {event: r.dataset.event, cells: [...r.cells].map(c => c.textContent)};"""
OPEN_SNAPSHOT = "const i = document.querySelector('#open .open img'); return !!i && i.naturalWidth > 0;"


def test_the_browser_sees_the_frame_the_score_and_the_defects_event(
        tmp_path: Path, mosquitto: str, toy_bundle: Path, browser: WebDriver) -> None:
    clip = write_video(tmp_path / "line.avi", [DEFECT], 110, size=FRAME_HW, fps=10.0, seed=1)
    port = free_port()
    proc = start_station(tmp_path, clip, toy_bundle, mosquitto, port)
    try:
        wait_listening(proc, port)
        url = f"http://127.0.0.1:{port}/"
        browser.get(url)
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)
        assert browser.title == "edge-run live"
        wait.until(lambda d: js(d, FRAME_SHOWN), "no camera frame shown")
        wait.until(lambda d: SCORE_RE.search(js(d, SCORE_TEXT)), "no score against the threshold shown")
        start = wait.until(lambda d: js(d, START_ROW), "no event with its snapshot listed")
        open_shown = wait.until(lambda d: js(d, OPEN_SNAPSHOT) or js(d, "return document.querySelector("
                                                                        "'#events tr.end') !== null"))
        stats = js(browser, "return document.getElementById('stats').textContent")
        button = js(browser, "const b = document.getElementById('calibrate'); return [b.disabled, "
                             "document.getElementById('calibrate-why').textContent];")

        # the snapshot endpoint: the listed event's peak frame; nothing else, whatever the path says
        code, headers, body = request(f"{url}events/{start['event']}.jpg")
        assert code == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8", (code, headers)
        for path in ("/events/..%2F..%2F..%2F..%2Fetc%2Fpasswd.jpg", "/events/%2E%2E.jpg",
                     f"/events/{start['event']}%2F..%2F..%2Fst.yaml.jpg", "/events/nosuchevent.jpg"):
            code, _, body = request(f"http://127.0.0.1:{port}{path}")
            assert code == 404 and b"root:" not in body and b"station:" not in body, (path, code, body[:200])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a raw path, not normalised by a client
        conn.request("GET", "/events/../../../../etc/passwd")
        raw = conn.getresponse()
        assert raw.status == 404 and b"root:" not in raw.read()
        conn.close()
        code, _, body = request(f"{url}api/calibrate", "POST", {"Content-Type": "application/json"}, b"{}")
        assert code == 403 and b"read-only" in body, (code, body)  # live.allow_commands is off by default
    finally:
        err = stop_station(proc)
    assert proc.returncode in (0, 3), err
    cells = start["cells"]  # snapshot, time, camera, type, frame, score, peak, reason
    assert cells[2] == "cam0" and cells[3] == "start" and DEFECT[0] <= int(cells[4]) < DEFECT[1], cells
    assert open_shown is True, "the open event's card never showed its snapshot"
    assert "frames scored" in stats and "spool" in stats and "camera cam0" in stats, stats
    assert button[0] is True and "read-only" in button[1], button  # shown disabled, with the reason
    assert "live page on http://127.0.0.1:" in err and "Traceback" not in err, err


def test_with_a_user_set_the_page_needs_its_credentials_and_may_calibrate_now(
        tmp_path: Path, mosquitto: str, toy_bundle: Path, browser: WebDriver) -> None:
    clip = write_lit_video(tmp_path / "good.avi", 300, size=FRAME_HW, seed=2)  # 30 s: ample, stopped once done
    port = free_port()
    password = "s3cret-pw"
    proc = start_station(tmp_path, clip, toy_bundle, mosquitto, port,
                         ", username: op, password_env: EDGE_LIVE_PASSWORD, allow_commands: true",
                         env={"EDGE_LIVE_PASSWORD": password})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_listening(proc, port)
        for path in ("", "api/status", "cam/cam0.mjpg", "cam/cam0.jpg", "events/x.jpg", "nothing"):
            code, headers, _ = request(url + path)
            assert code == 401 and headers.get("WWW-Authenticate", "").startswith("Basic "), (path, code)
        assert request(url + "api/status", headers=basic("op", "wrong"))[0] == 401
        assert request(url + "api/status", headers=basic("someone", password))[0] == 401
        code, _, body = request(url + "api/status", headers=basic("op", password))
        assert code == 200 and json.loads(body)["station"] == "st-browser"
        assert request(url + "api/calibrate", "POST", {"Content-Type": "application/json"}, b"{}")[0] == 401
        code, _, body = request(url + "api/calibrate", "POST", {**basic("op", password), "Content-Type":
                                "application/json", "Origin": "http://elsewhere.example"}, b'{"frames": 20}')
        assert code == 403 and b"another site" in body, (code, body)

        browser.get(url)  # no credentials: the browser gets the 401, not the page
        assert browser.title != "edge-run live" and "calibrate now" not in browser.page_source

        browser.get(f"http://op:{password}@127.0.0.1:{port}/")
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)
        wait.until(lambda d: js(d, FRAME_SHOWN), "no camera frame shown with the credentials")
        wait.until(lambda d: SCORE_RE.search(js(d, SCORE_TEXT)), "no score shown with the credentials")
        wait.until(lambda d: js(d, "return !document.getElementById('calibrate').disabled"),
                   "calibrate now stayed disabled with live.allow_commands on")
        js(browser, "document.getElementById('calibrate-frames').value = '20'; "
                    "document.getElementById('calibrate').click();")
        said = wait.until(lambda d: js(d, "return document.getElementById('calibrate-msg').textContent"))
        status = wait.until(lambda d: (lambda s: s if s["calibrating"] is False and s["threshold"] != 0.1 else None)(
            json.loads(request(url + "api/status", headers=basic("op", password))[2])),
            "the calibration asked for never set a new threshold")
    finally:
        err = stop_station(proc)
    assert proc.returncode in (0, 3), err
    assert said == "calibrating on the next 20 frames", said
    assert "calibrate now on the next 20 frames, asked from 127.0.0.1 by 'op'" in err, err
    assert "on-site calibration of toy" in err and "in force from now" in err, err
    assert status["threshold"] > 0, status
    assert (tmp_path / "state" / "st-browser.calibration.json").exists() or \
        any((tmp_path / "state").glob("*.calibration.json")), list((tmp_path / "state").iterdir())

