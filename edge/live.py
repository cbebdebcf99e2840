"""The live page: what each camera sees, where its anomaly map lights up, its score against the threshold, its
state and the station's last events, served by edge-run itself (``live.port``), so that a camera can be aimed,
focused and lit, and a threshold judged, with a browser instead of an MQTT client.

The scoring path pays for one assignment per frame: :meth:`LiveFeed.frame` keeps a reference to each camera's
latest scored frame, score and map. Decoding the frame at camera resolution, drawing the heat map and encoding
the JPEG happen in the HTTP server's threads, only when a page asks, and at most twice per ``refresh_s`` per
camera whatever the number of viewers and however fast they poll (the frame drawn last is served meanwhile), and
requests are paced (at most 50 a second, all viewers together): the CPU they would take is the scoring's.
Standard library only (http.server); the page has no external assets and works offline.

No authentication: it listens on localhost unless ``live.bind`` says otherwise (docs/station.md, "Live page").
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from core.errors import UserError
from core.payloads import iso_utc
from core.preprocess import to_bgr8
from edge.sources import Frame

if TYPE_CHECKING:
    from edge.pipeline import Station

log = logging.getLogger("edge.live")

JPEG_QUALITY = 80
HEAT_OPACITY = 0.6  # of the hottest pixel, at or above the threshold
REQUEST_INTERVAL_S = 0.02  # requests are served at most 50 a second, all viewers together
_CAMERA_JPEG = re.compile(r"^/cam/([^/]+)\.jpg$")


class LiveFeed:
    """What the scoring path hands the page: the latest scored frame per camera and the last events.

    Written by the station loop, read by the HTTP threads: each write replaces one reference (atomic), so
    neither side waits for the other."""

    def __init__(self, events: int) -> None:
        self.latest: dict[str, tuple[Frame, float, Optional[np.ndarray]]] = {}  # camera -> (frame, score, map)
        self.events: deque[dict[str, Any]] = deque(maxlen=events)

    def frame(self, camera: str, frame: Frame, score: float, amap: Optional[np.ndarray]) -> None:
        self.latest[camera] = (frame, score, amap)

    def event(self, payload: dict[str, Any]) -> None:
        self.events.append(payload)


def heat_strength(score: float, threshold: float, baseline: float) -> float:
    """How opaque the heat map is drawn: 0 at a good part's typical score (``baseline``), 1 at the threshold and
    above. A good frame's map stretched to its own range is noise; drawn faint, it does not cry wolf."""
    if not np.isfinite(score):
        return 0.0
    if threshold <= baseline:
        return 1.0 if score >= threshold else 0.0
    return float(np.clip((score - baseline) / (threshold - baseline), 0.0, 1.0))


def map_on_frame(level: np.ndarray, frame_hw: tuple[int, int], input_hw: tuple[int, int], mode: str) -> np.ndarray:
    """``level`` (a map over the model's input, any resolution) placed on the camera frame: float32 [H, W], 0
    where the frame was not seen by the model. Undoes core.preprocess.resize_frame's fitting: stretch scales
    back; letterbox drops the bars; crop fills the centre region the model saw (the rest stays 0)."""
    fh, fw = frame_hw
    h, w = input_hw
    mh, mw = level.shape
    if mode == "letterbox" and (fh, fw) != (h, w):
        # resize_frame's placement of the scaled frame inside the input, read in map pixels
        if fw * h >= fh * w:
            nh, nw = min(h, max(1, round(fh * w / fw))), w
        else:
            nh, nw = h, min(w, max(1, round(fw * h / fh)))
        top, left = (h - nh) // 2, (w - nw) // 2
        r0, c0 = int(top * mh / h), int(left * mw / w)
        r1, c1 = max(r0 + 1, round((top + nh) * mh / h)), max(c0 + 1, round((left + nw) * mw / w))
        return cv2.resize(np.ascontiguousarray(level[r0:r1, c0:c1]), (fw, fh), interpolation=cv2.INTER_LINEAR)
    if mode == "crop" and (fh, fw) != (h, w):
        # resize_frame's centre region of the frame, in frame pixels
        if fw * h >= fh * w:
            ch, cw = fh, min(fw, max(1, round(fh * w / h)))
        else:
            ch, cw = min(fh, max(1, round(fw * h / w))), fw
        top, left = (fh - ch) // 2, (fw - cw) // 2
        out = np.zeros((fh, fw), np.float32)
        out[top:top + ch, left:left + cw] = cv2.resize(level, (cw, ch), interpolation=cv2.INTER_LINEAR)
        return out
    return cv2.resize(level, (fw, fh), interpolation=cv2.INTER_LINEAR)


def heat_overlay(image: np.ndarray, amap: Optional[np.ndarray], strength: float, input_hw: tuple[int, int],
                 mode: str) -> np.ndarray:
    """``image`` with ``amap`` drawn over it (JET: blue = the map's floor in this frame, red = its top), each pixel
    as opaque as its map value is above the floor (times ``strength``): where the map is at its floor, the pixel
    is the camera's own. ``input_hw`` and ``mode`` (the bundle's input.resize) say how the frame was fitted to
    the model. Returns ``image`` itself when there is nothing to draw."""
    if amap is None or amap.size == 0 or strength <= 0:
        return image
    m = np.asarray(amap, dtype=np.float32)
    m = m.reshape(m.shape[-2:]) if m.ndim > 2 else m
    lo, hi = float(m.min()), float(m.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return image
    level = np.clip(map_on_frame((m - lo) / (hi - lo), image.shape[:2], input_hw, mode), 0.0, 1.0)
    heat = cv2.applyColorMap((level * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (level * np.float32(HEAT_OPACITY * strength)).astype(np.float32)
    return cv2.blendLinear(image, heat, 1.0 - alpha, alpha)  # per-pixel weights, in C: half numpy's time


class LiveServer:
    """The page's HTTP server (ThreadingHTTPServer on daemon threads). Constructing it binds the port, so a port
    in use fails at start in one line; :meth:`start` serves a built station."""

    def __init__(self, bind: str, port: int, feed: LiveFeed, refresh_s: float = 1.0) -> None:
        self.feed = feed
        self.refresh_s = refresh_s
        self.station: Optional[Station] = None
        self._cache: dict[str, _Drawn] = {}  # camera -> its frame drawn last
        self.drawn = 0  # frames drawn and encoded so far (what viewers cost the station)
        self._next_slot = 0.0  # time.monotonic() from which the next request may be served
        self._pace_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        try:
            self.httpd = _Server((bind, port), _Handler)
        except OSError as exc:
            raise UserError(f"live.port {port} on {bind}: cannot listen ({exc.strerror or exc}); choose another "
                            "port or set it to 0 (off)") from None
        self.httpd.live = self
        self.port = int(self.httpd.server_address[1])
        self.bind = bind
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="live-page", daemon=True)

    def start(self, station: Station) -> None:
        self.station = station
        self._thread.start()
        log.info("live page on http://%s:%d/ (no authentication)", self.bind, self.port)

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def pace(self) -> None:
        """Before each request: wait for its slot, REQUEST_INTERVAL_S after the previous one's. A client polling
        without pause then sleeps in its own thread (the GIL free) instead of taking the scoring's CPU; a page
        polling every refresh_s never waits."""
        with self._pace_lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + REQUEST_INTERVAL_S
        if slot > now:
            time.sleep(slot - now)

    # -- what the page shows ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``GET /api/status``: the station, the threshold in force, each camera's latest score and state, and the
        last events (newest first)."""
        st = self.station
        assert st is not None  # served only once started
        now = time.monotonic()
        cameras = []
        for cam_id, cam in st.cameras.items():
            latest = self.feed.latest.get(cam_id)
            src = cam.source
            state = _camera_state(cam, latest is not None, st.site.calibrating)
            frame_hw = src.frame_hw
            cameras.append({
                "id": cam_id, "state": state,
                "score": None if latest is None or not np.isfinite(latest[1]) else round(latest[1], 6),
                "frame": None if latest is None else latest[0].index,
                "ts": None if latest is None else iso_utc(latest[0].ts),
                "map": latest is not None and latest[2] is not None,
                "size": None if frame_hw is None else {"height": frame_hw[0], "width": frame_hw[1]},
                "processed": cam.stats.processed, "dropped": src.queue.dropped,
                "down_s": None if src.down_since is None or state != "lost" else round(now - src.down_since, 1),
            })
        return {"station": st.cfg.station, "model": st.bundle.model_name, "model_version": st.bundle.version,
                "backend": st.backend.name, "threshold": st.threshold, "baseline": st.choice.baseline,
                "calibrating": st.site.calibrating, "time": iso_utc(time.time()), "refresh_s": self.refresh_s,
                "cameras": cameras, "events": list(self.feed.events)[::-1]}

    def jpeg(self, camera: str) -> Optional[tuple[bytes, Frame, float]]:
        """``GET /cam/<id>.jpg``: the camera's latest scored frame at its own resolution with its heat map; None
        before its first frame. Drawn here, on request; the frame drawn last is served again while it is the
        latest or younger than half ``refresh_s``, so viewers never make the station draw more than that."""
        latest = self.feed.latest.get(camera)
        if latest is None:
            return None
        now = time.monotonic()
        with self._cache_lock:
            drawn = self._cache.get(camera)
        if drawn is not None and (drawn.source is latest or now - drawn.at < self.refresh_s / 2):
            return drawn.jpeg, drawn.source[0], drawn.source[1]
        frame, score, amap = latest
        st = self.station
        assert st is not None
        strength = heat_strength(score, st.threshold, st.choice.baseline)
        image = heat_overlay(to_bgr8(frame.snapshot_image()), amap, strength, st.bundle.input_hw,
                             st.bundle.input_resize)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return None
        data = buf.tobytes()
        with self._cache_lock:
            self._cache[camera] = _Drawn(latest, data, now)
            self.drawn += 1
        return data, frame, score


@dataclass
class _Drawn:
    """A camera's frame as the page drew it last."""

    source: tuple[Frame, float, Optional[np.ndarray]]  # LiveFeed.latest's entry it was drawn from
    jpeg: bytes
    at: float  # time.monotonic() when drawn


def _camera_state(cam: Any, has_frame: bool, calibrating: bool) -> str:
    """finished (a file read to its end, --max-frames), lost (a live camera not delivering), waiting (no frame
    scored yet), calibrating, event (one is open) or ok."""
    src = cam.source
    if cam.done or src.queue.finished:
        return "finished"
    if src.live and not src.connected:
        return "lost"
    if not has_frame:
        return "waiting"
    if calibrating:
        return "calibrating"
    return "event" if cam.detector.is_open else "ok"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    live: LiveServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line instead of socketserver's traceback on stderr: a viewer's failure is not the station's."""
        exc = sys.exc_info()[1]
        log.warning("live page: request from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-live"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        live = self.server.live
        path = urlsplit(self.path).path
        live.pace()
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", PAGE.encode())
            elif path == "/api/status":
                self._send(200, "application/json", json.dumps(live.status()).encode())
            elif (m := _CAMERA_JPEG.match(path)) is not None:
                camera = unquote(m.group(1))
                if live.station is None or camera not in live.station.cameras:
                    self._send(404, "text/plain; charset=utf-8", f"no camera {camera!r}\n".encode())
                    return
                got = live.jpeg(camera)
                if got is None:
                    self._send(503, "text/plain; charset=utf-8", b"no frame scored yet\n", {"Retry-After": "1"})
                    return
                data, frame, score = got
                self._send(200, "image/jpeg", data, {"X-Frame-Index": str(frame.index), "X-Score": f"{score:.6g}"})
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: /, /api/status, /cam/<camera>.jpg\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the viewer went away

    def _send(self, code: int, content_type: str, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("live page: %s " + format, self.address_string(), *args)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>edge-run live</title>
<style>
body{margin:0;font:14px/1.4 system-ui,sans-serif;background:#111;color:#ddd}
header{padding:8px 14px;background:#222;display:flex;flex-wrap:wrap;gap:18px;align-items:baseline}
header b{color:#fff;font-size:16px}#err{color:#f66}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;padding:12px}
.cam{background:#1b1b1b;border:2px solid #333;border-radius:6px;overflow:hidden}
.cam.event{border-color:#e33}.cam.lost{border-color:#e90}
.cam h2{margin:0;padding:6px 10px;font-size:15px;display:flex;justify-content:space-between}
.cam img{display:block;width:100%;background:#000;min-height:120px}
.st{padding:1px 8px;border-radius:10px;font-size:12px;background:#385}
.st.event{background:#c22}.st.lost{background:#c70}.st.waiting,.st.finished{background:#555}
.st.calibrating{background:#36a}
.score{padding:6px 10px}.bar{position:relative;height:10px;background:#333;border-radius:5px;margin-top:4px}
.fill{position:absolute;left:0;top:0;bottom:0;background:#3a6;border-radius:5px}.fill.hot{background:#e33}
.mark{position:absolute;top:-3px;bottom:-3px;width:2px;background:#fff}
.note{padding:0 10px 8px;color:#999;font-size:12px}
section{padding:0 12px 16px}table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:3px 8px;border-bottom:1px solid #2a2a2a;font-size:13px}
tr.start td:nth-child(3){color:#f66}tr.end td:nth-child(3){color:#6c6}
</style></head><body>
<header><b id="station">edge-run</b><span id="model"></span><span id="threshold"></span><span id="time"></span>
<span id="err"></span></header>
<main id="cams"></main>
<section><h3>Last events</h3><table><thead><tr><th>time (UTC)</th><th>camera</th><th>type</th><th>frame</th>
<th>score</th><th>peak</th><th>reason</th></tr></thead><tbody id="events"></tbody></table>
<p class="note">Heat map: the model's anomaly map in each frame, blue at its floor to red at its top, drawn the
more opaque the nearer the score is to the threshold (invisible at a good part's typical score). A model that
gives a score only shows the plain frame.</p></section>
<script>
"use strict";
const cards = {};
const $ = (id) => document.getElementById(id);
function el(tag, cls, parent) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (parent) parent.appendChild(e); return e; }
function card(id) {
  if (cards[id]) return cards[id];
  const box = el("div", "cam", $("cams")), h = el("h2", "", box), name = el("span", "", h);
  name.textContent = id;
  const c = {box: box, state: el("span", "st", h), img: el("img", "", box), score: el("div", "score", box),
             frame: null, loading: false};
  c.img.alt = "camera " + id;
  c.text = el("span", "", c.score);
  const bar = el("div", "bar", c.score);
  c.fill = el("div", "fill", bar); c.mark = el("div", "mark", bar);
  c.note = el("div", "note", box);
  c.img.onload = c.img.onerror = () => { c.loading = false; };
  cards[id] = c;
  return c;
}
function fmt(v) { return v === null || v === undefined ? "–" : Number(v).toPrecision(4); }
function show(s) {
  $("station").textContent = "station " + s.station;
  $("model").textContent = "model " + s.model + " " + s.model_version + " (" + s.backend + ")";
  $("threshold").textContent = "threshold " + fmt(s.threshold) + (s.calibrating ? " (calibrating)" : "");
  $("time").textContent = s.time.replace("T", " ").slice(0, 19);
  $("err").textContent = "";
  const lo = s.threshold > s.baseline ? 2 * s.baseline - s.threshold : 0;
  const hi = s.threshold > s.baseline ? 2 * s.threshold - s.baseline : 2 * s.threshold;
  for (const cam of s.cameras) {
    const c = card(cam.id);
    c.box.className = "cam " + cam.state;
    c.state.className = "st " + cam.state;
    c.state.textContent = cam.state === "event" ? "in event" : cam.state === "lost" ?
      "camera lost" + (cam.down_s !== null ? " " + cam.down_s + " s" : "") : cam.state;
    c.text.textContent = "score " + fmt(cam.score) + " / threshold " + fmt(s.threshold) +
      (cam.frame !== null ? "  ·  frame " + cam.frame : "");
    const pos = (v) => Math.max(0, Math.min(100, 100 * (v - lo) / ((hi - lo) || 1)));
    c.fill.style.width = (cam.score === null ? 0 : pos(cam.score)) + "%";
    c.fill.className = "fill" + (cam.score !== null && cam.score >= s.threshold ? " hot" : "");
    c.mark.style.left = pos(s.threshold) + "%";
    c.note.textContent = (cam.size ? cam.size.width + "×" + cam.size.height + "  ·  " : "") +
      cam.processed + " frames scored, " + cam.dropped + " dropped" + (cam.map ? "" : "  ·  no map (score only)");
    if (cam.frame !== null && cam.frame !== c.frame && !c.loading) {
      c.frame = cam.frame; c.loading = true;
      c.img.src = "cam/" + encodeURIComponent(cam.id) + ".jpg?frame=" + cam.frame;
    }
  }
  const body = $("events");
  body.textContent = "";
  for (const e of s.events) {
    const tr = el("tr", e.type, body);
    for (const v of [e.ts.replace("T", " ").slice(0, 23), e.camera, e.type, e.frame, fmt(e.score),
                     fmt(e.peak_score), e.reason || ""]) el("td", "", tr).textContent = v;
  }
}
async function tick() {
  let wait = 2000;
  try {
    const r = await fetch("api/status", {cache: "no-store"});
    const s = await r.json();
    show(s);
    wait = 1000 * s.refresh_s;
  } catch (e) {
    $("err").textContent = "station not answering";
  }
  setTimeout(tick, wait);
}
tick();
</script></body></html>
"""
