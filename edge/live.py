"""The live page: what each camera sees, where its anomaly map lights up, its score against the threshold, the
open and last events with their snapshots and the station's stats, served by edge-run itself (``edge-run --http
HOST:PORT`` or ``live.port``), so that a camera can be aimed, focused and lit, and a threshold judged, with a
browser instead of an MQTT client; and, when the config allows it, "calibrate now".

The scoring path pays for one assignment per frame: :meth:`LiveFeed.frame` keeps a reference to each camera's
latest scored frame, score and map (and, per event, its peak frame). Decoding a frame at camera resolution,
drawing the heat map and encoding the JPEG happen in the server's worker threads, only when a viewer asks, and at
most twice per ``refresh_s`` per camera whatever the number of viewers (the frame drawn last is served meanwhile);
requests are paced (at most 50 a second, all viewers together): the CPU they would take is the scoring's.

Served by aiohttp: one asyncio event loop on a daemon thread holds any number of MJPEG streams
(``/cam/<id>.mjpg``, multipart/x-mixed-replace) without a thread per viewer, and brings BasicAuth and TLS.
The page itself is one HTML document with its script inline: no build step, no external assets, works offline.
Read-only unless ``live.allow_commands``; localhost unless ``live.bind`` says otherwise (docs/station.md,
"Live page").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

import cv2
import numpy as np
from aiohttp import BasicAuth, web

from core.errors import UserError
from core.payloads import iso_utc
from core.preprocess import map_on_frame, to_bgr8
from edge.sources import Frame

if TYPE_CHECKING:
    from edge.config import LiveConfig
    from edge.pipeline import Station

log = logging.getLogger("edge.live")

JPEG_QUALITY = 80
HEAT_OPACITY = 0.6  # of the hottest pixel, at or above the threshold
REQUEST_INTERVAL_S = 0.02  # requests are served at most 50 a second, all viewers together
FPS_WINDOW_S = 5.0  # the page's frames/s: over the last few seconds of its own samples
LOCALHOST = ("127.0.0.1", "::1", "localhost")
_EVENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Peak = tuple[Frame, float, Optional[np.ndarray]]  # a frame, its score, its map


class LiveFeed:
    """What the scoring path hands the page: the latest scored frame per camera, the last events, each open event
    and the peak frame of each recent event.

    Written by the station loop, read by the server's threads: each write replaces or adds one reference (atomic
    under the GIL), so neither side waits for the other."""

    def __init__(self, events: int) -> None:
        self.latest: dict[str, Peak] = {}  # camera -> (frame, score, map)
        self.events: deque[dict[str, Any]] = deque(maxlen=events)
        self.open: dict[str, dict[str, Any]] = {}  # camera -> its open event's latest message
        self.peaks: OrderedDict[str, Peak] = OrderedDict()  # event_id -> its peak frame so far, the recent ones
        self._keep = max(events, 1) + 8  # the listed events' and the open ones'
        self.calibration: Optional[int] = None  # frames asked for by "calibrate now", until the station takes it

    def frame(self, camera: str, frame: Frame, score: float, amap: Optional[np.ndarray]) -> None:
        self.latest[camera] = (frame, score, amap)

    def event(self, payload: dict[str, Any], peak: Optional[Peak] = None) -> None:
        """An event message as published, with the event's peak frame so far (when the station kept it)."""
        self.events.append(payload)
        if payload["type"] == "end":
            self.open.pop(payload["camera"], None)
        else:
            self.open[payload["camera"]] = payload
        if peak is not None:
            self.peaks[payload["event_id"]] = peak
            self.peaks.move_to_end(payload["event_id"])
            while len(self.peaks) > self._keep:
                self.peaks.popitem(last=False)

    def take_calibration(self) -> Optional[int]:
        """The station loop, between two batches: the frames "calibrate now" asked for, once."""
        n, self.calibration = self.calibration, None
        return n


def heat_strength(score: float, threshold: float, baseline: float) -> float:
    """How opaque the heat map is drawn: 0 at a good part's typical score (``baseline``), 1 at the threshold and
    above. A good frame's map stretched to its own range is noise; drawn faint, it does not cry wolf."""
    if not np.isfinite(score):
        return 0.0
    if threshold <= baseline:
        return 1.0 if score >= threshold else 0.0
    return float(np.clip((score - baseline) / (threshold - baseline), 0.0, 1.0))


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


@dataclass
class _Drawn:
    """A frame as the page drew it last."""

    source: Peak  # LiveFeed's entry it was drawn from
    jpeg: bytes
    at: float  # time.monotonic() when drawn


class LiveServer:
    """The page's server: an aiohttp application on an event loop of its own (a daemon thread); drawing and
    encoding run in the loop's worker threads. Constructing it binds the port and loads the TLS certificate, so
    a port in use or an unreadable certificate fails at start in one line; :meth:`start` serves a built station,
    :meth:`close` ends open streams and releases the port."""

    BOUNDARY = "edge-live-frame"

    def __init__(self, cfg: LiveConfig, feed: LiveFeed) -> None:
        self.cfg = cfg
        self.feed = feed
        self.refresh_s = cfg.refresh_s
        self.station: Optional[Station] = None
        self.password = _password(cfg)
        self.tls = _tls_context(cfg)
        self._cache: dict[str, _Drawn] = {}  # camera -> its frame drawn last
        self._snapshots: OrderedDict[str, _Drawn] = OrderedDict()  # event_id -> its peak frame drawn last
        self._draw_locks: dict[str, threading.Lock] = {}  # one drawing per camera (or event) at a time
        self._count_lock = threading.Lock()
        self.drawn = 0  # frames drawn and encoded so far (what viewers cost the station)
        self.streams = 0  # MJPEG streams open now
        self._next_slot = 0.0  # time.monotonic() from which the next request may be served
        self._samples: dict[str, deque[tuple[float, int, int]]] = {}  # camera -> (t, scored, captured)
        self.bind = cfg.bind
        try:
            family = socket.AF_INET6 if ":" in cfg.bind else socket.AF_INET
            self.sock = socket.create_server((cfg.bind, cfg.port), family=family)
        except OSError as exc:
            raise UserError(f"live.port {cfg.port} on {cfg.bind}: cannot listen ({exc.strerror or exc}); choose "
                            "another port or set it to 0 (off)") from None
        self.port = int(self.sock.getsockname()[1])
        self.url = f"{'https' if self.tls else 'http'}://{cfg.bind if ':' not in cfg.bind else f'[{cfg.bind}]'}" \
                   f":{self.port}/"
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._closing: Optional[asyncio.Event] = None
        self._serving = threading.Event()

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, station: Station) -> None:
        self.station = station
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="live-page", daemon=True)
        self._thread.start()
        self._serving.wait(10.0)
        access = "read-only" if not self.cfg.allow_commands else "calibrate now allowed"
        log.info("live page on %s (%s, %s)", self.url,
                 f"basic auth as {self.cfg.username!r}" if self.password else "no authentication", access)
        if self.password is None and self.bind not in LOCALHOST:
            log.warning("live page: listening on %s without authentication: anyone who reaches port %d sees the "
                        "cameras; set live.username and live.password_env (docs/station.md, \"Live page\")",
                        self.bind, self.port)

    def _serve(self) -> None:
        """The server thread: the event loop until :meth:`close`, then every connection closed."""
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._closing = asyncio.Event()
            self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=2.0)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.SockSite(self._runner, self.sock, ssl_context=self.tls).start())
        finally:
            self._serving.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())  # the streams see _closing and end; the socket closes
        loop.close()

    def close(self) -> None:
        """Stop serving: open streams end, the port is released; nothing when already closed."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._stop_loop)
            thread.join(10.0)
        elif thread is None:
            self.sock.close()

    def _stop_loop(self) -> None:
        assert self._closing is not None and self._loop is not None
        self._closing.set()
        self._loop.stop()

    def _app(self) -> web.Application:
        @web.middleware
        async def guard(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            await self._pace()
            if self.password is not None and not self.authorized(request.headers.get("Authorization", "")):
                return web.Response(status=401, text="401: this page needs its user name and password "
                                    "(live.username)\n", headers={
                                        "WWW-Authenticate": 'Basic realm="edge-run live page", charset="UTF-8"'})
            return await handler(request)

        app = web.Application(middlewares=[guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/index.html", self._page)
        app.router.add_get("/api/status", self._status)
        app.router.add_post("/api/calibrate", self._calibrate)
        app.router.add_get("/cam/{camera}.jpg", self._camera_jpeg)
        app.router.add_get("/cam/{camera}.mjpg", self._camera_mjpeg)
        app.router.add_get("/events/{event_id}.jpg", self._event_jpeg)
        app.on_response_prepare.append(self._headers)
        return app

    async def _pace(self) -> None:
        """Before each request: wait for its slot, REQUEST_INTERVAL_S after the previous one's. A client requesting
        without pause then waits on the event loop instead of taking the scoring's CPU; a page refreshing every
        refresh_s never waits. (The loop is single-threaded: no lock.)"""
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + REQUEST_INTERVAL_S
        if slot > now:
            await asyncio.sleep(slot - now)

    def authorized(self, header: str) -> bool:
        """The request's ``Authorization: Basic`` names live.username and its password (compared in constant
        time: a wrong guess takes as long however much of it was right)."""
        assert self.password is not None and self.cfg.username is not None
        try:
            given = BasicAuth.decode(header, encoding="utf-8")
        except ValueError:
            return False
        user_ok = hmac.compare_digest(given.login.encode(), self.cfg.username.encode())
        password_ok = hmac.compare_digest(given.password.encode(), self.password.encode())
        return user_ok and password_ok

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"

    # -- endpoints -------------------------------------------------------------------------------
    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def _camera(self, request: web.Request) -> str:
        camera = request.match_info["camera"]
        if self.station is None or camera not in self.station.cameras:
            raise web.HTTPNotFound(text=f"no camera {camera!r}\n")
        return camera

    async def _camera_jpeg(self, request: web.Request) -> web.Response:
        camera = self._camera(request)
        drawn = await asyncio.get_running_loop().run_in_executor(None, self.frame_jpeg, camera)
        if drawn is None:
            return web.Response(status=503, text="no frame scored yet\n", headers={"Retry-After": "1"})
        return web.Response(body=drawn.jpeg, content_type="image/jpeg", headers={
            "X-Frame-Index": str(drawn.source[0].index), "X-Score": f"{drawn.source[1]:.6g}"})

    async def _camera_mjpeg(self, request: web.Request) -> web.StreamResponse:
        """An MJPEG stream (multipart/x-mixed-replace): a new part only when a newer frame was drawn, at most
        every refresh_s; the stream holds no thread, only a coroutine, while it waits."""
        camera = self._camera(request)
        closing = self._closing
        assert closing is not None
        response = web.StreamResponse(headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={self.BOUNDARY}"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        sent: Optional[_Drawn] = None
        self.streams += 1
        try:
            while not closing.is_set():
                drawn = await loop.run_in_executor(None, self.frame_jpeg, camera)
                if drawn is not None and drawn is not sent:
                    head = (f"--{self.BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(drawn.jpeg)}\r\n"
                            f"X-Frame-Index: {drawn.source[0].index}\r\nX-Score: {drawn.source[1]:.6g}\r\n\r\n")
                    await response.write(head.encode() + drawn.jpeg + b"\r\n")
                    sent = drawn
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closing.wait(), self.refresh_s)
        except ConnectionResetError:
            pass  # the viewer went away
        finally:
            self.streams -= 1
        return response

    async def _event_jpeg(self, request: web.Request) -> web.Response:
        """An event's peak frame with its heat map, looked up by event_id among the events the page lists (in
        memory: no file is read, whatever the request names)."""
        event_id = request.match_info["event_id"]
        drawn = None
        if _EVENT_ID.match(event_id):
            drawn = await asyncio.get_running_loop().run_in_executor(None, self.event_jpeg, event_id)
        if drawn is None:
            raise web.HTTPNotFound(text="no snapshot of that event here (the page keeps the last live.events)\n")
        return web.Response(body=drawn.jpeg, content_type="image/jpeg", headers={
            "X-Frame-Index": str(drawn.source[0].index), "X-Score": f"{drawn.source[1]:.6g}",
            "Cache-Control": "private, max-age=600"})  # the page asks again (?seq=) when the event moves on

    async def _calibrate(self, request: web.Request) -> web.Response:
        """``POST /api/calibrate`` ``{"frames": N}``: "calibrate now", the on-site calibration ``--calibrate N``
        runs at start, from the station's next frame. Refused (403) unless live.allow_commands; behind live.username
        when set (the guard); from another site's page never (Origin); 409 while it cannot start."""
        refused = self.command_refusal()
        if refused is not None:
            return web.json_response({"error": refused}, status=403)
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return web.json_response({"error": f"refused: asked from another site's page ({origin})"}, status=403)
        frames = self.cfg.calibrate_frames
        if request.can_read_body:
            try:
                body = await request.json()
                frames = int(body.get("frames", frames)) if isinstance(body, dict) else -1
            except (ValueError, TypeError):
                frames = -1
        if frames < 2:
            return web.json_response({"error": 'the body must be {"frames": N} with N >= 2 (a few hundred good '
                                      "frames)"}, status=400)
        busy = self.calibration_busy()
        if busy is not None:
            return web.json_response({"error": busy}, status=409)
        self.feed.calibration = frames
        who = f" by {self.cfg.username!r}" if self.password else ""
        log.info("live page: calibrate now on the next %d frames, asked from %s%s", frames, request.remote, who)
        return web.json_response({"calibrating": True, "frames": frames}, status=202)

    def command_refusal(self) -> Optional[str]:
        """Why the page may not start a calibration, or None."""
        if not self.cfg.allow_commands:
            return "read-only: calibrate now is off (live.allow_commands: false)"
        return None

    def calibration_busy(self) -> Optional[str]:
        """Why a calibration cannot start now, or None."""
        st = self.station
        assert st is not None
        if st.site.calibrating or self.feed.calibration is not None:
            return "a calibration is already running"
        open_on = sorted(self.feed.open)
        if open_on:
            return (f"an event is open on {', '.join(open_on)}: calibrate with good parts in view and no event "
                    "open")
        return None

    # -- what the page shows ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``GET /api/status``: the station, the threshold in force, each camera's latest score, state and counts,
        the open and last events (newest first), the station's stats and whether calibrate now is allowed."""
        st = self.station
        assert st is not None  # served only once started
        now = time.monotonic()
        cameras = []
        for cam_id, cam in st.cameras.items():
            latest = self.feed.latest.get(cam_id)
            src = cam.source
            state = _camera_state(cam, latest is not None, st.site.calibrating)
            frame_hw = src.frame_hw
            scored_fps, capture_fps = self._rates(cam_id, now, cam.stats.processed, int(cam.stats.captured()))
            cameras.append({
                "id": cam_id, "state": state,
                "score": None if latest is None or not np.isfinite(latest[1]) else round(latest[1], 6),
                "frame": None if latest is None else latest[0].index,
                "ts": None if latest is None else iso_utc(latest[0].ts),
                "map": latest is not None and latest[2] is not None,
                "size": None if frame_hw is None else {"height": frame_hw[0], "width": frame_hw[1]},
                "processed": cam.stats.processed, "dropped": src.queue.dropped,
                "fps": scored_fps, "capture_fps": capture_fps, "queue": len(src.queue), "queue_max": src.queue.maxsize,
                "reconnects": int(cam.stats.reconnects()),
                "down_s": None if src.down_since is None or state != "lost" else round(now - src.down_since, 1),
            })
        refusal = self.command_refusal()
        inference, = st.stats.inference_ms.percentiles(50)
        latency, = st.stats.latency_ms.percentiles(50)
        return {"station": st.cfg.station, "model": st.bundle.model_name, "model_version": st.bundle.version,
                "backend": st.backend.name, "threshold": st.threshold, "baseline": st.choice.baseline,
                "calibrating": st.site.calibrating, "time": iso_utc(time.time()), "refresh_s": self.refresh_s,
                "cameras": cameras,
                "open": [self._listed(e) for e in self.feed.open.values()],
                "events": [self._listed(e) for e in list(self.feed.events)[::-1]],
                "stats": {"uptime_s": round(now - st.stats.started, 1), "frames": st.frames,
                          "events_published": st.stats.events_published, "batch": st.batch.size,
                          "inference_ms_p50": inference, "latency_ms_p50": latency,
                          "spool_depth": st.outbox.depth, "spool_dropped": st.outbox.dropped_total,
                          "spool": st.outbox.state,
                          "sinks": {s.name: s.stats() for s in st.sinks}},
                "commands": {"calibrate": {"allowed": refusal is None, "reason": refusal,
                                           "frames": self.cfg.calibrate_frames}}}

    def _listed(self, event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "snapshot": event["event_id"] in self.feed.peaks}

    def _rates(self, camera: str, now: float, scored: int, captured: int) -> tuple[Optional[float], Optional[float]]:
        """Frames/s scored and captured over the last FPS_WINDOW_S, from the page's own samples (the stats
        topic's rates are per stats interval and reading them would reset them)."""
        samples = self._samples.setdefault(camera, deque())
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, scored, captured))
        while len(samples) > 2 and now - samples[0][0] > FPS_WINDOW_S:
            samples.popleft()
        t0, s0, c0 = samples[0]
        t1, s1, c1 = samples[-1]
        if t1 - t0 < 0.5:
            return None, None
        return round((s1 - s0) / (t1 - t0), 2), round((c1 - c0) / (t1 - t0), 2)

    def frame_jpeg(self, camera: str) -> Optional[_Drawn]:
        """The camera's latest scored frame at its own resolution with its heat map; None before its first frame.
        Drawn here, on request; the frame drawn last is served again while it is the latest or younger than half
        ``refresh_s``, so viewers never make the station draw more than that."""
        def fresh(drawn: Optional[_Drawn], latest: Peak) -> bool:
            return drawn is not None and (drawn.source is latest or time.monotonic() - drawn.at < self.refresh_s / 2)

        latest = self.feed.latest.get(camera)
        if latest is None:
            return None
        drawn = self._cache.get(camera)
        if drawn is not None and fresh(drawn, latest):
            return drawn
        with self._draw_locks.setdefault(f"cam/{camera}", threading.Lock()):  # viewers arriving together share it
            latest = self.feed.latest[camera]
            drawn = self._cache.get(camera)
            if drawn is not None and fresh(drawn, latest):
                return drawn
            drawn = self._draw(latest)
            if drawn is not None:
                self._cache[camera] = drawn
        return drawn

    def event_jpeg(self, event_id: str) -> Optional[_Drawn]:
        """An event's peak frame (so far) with its heat map, drawn once per peak; None when the page does not keep
        that event."""
        peak = self.feed.peaks.get(event_id)
        if peak is None:
            return None
        with self._draw_locks.setdefault("events", threading.Lock()):
            drawn = self._snapshots.get(event_id)
            if drawn is not None and drawn.source is peak:
                return drawn
            drawn = self._draw(peak)
            if drawn is not None:
                self._snapshots[event_id] = drawn
                while len(self._snapshots) > len(self.feed.events) + 8:
                    self._snapshots.popitem(last=False)
        return drawn

    def _draw(self, source: Peak) -> Optional[_Drawn]:
        frame, score, amap = source
        st = self.station
        assert st is not None
        strength = heat_strength(score, st.threshold, st.choice.baseline)
        image = heat_overlay(to_bgr8(frame.snapshot_image()), amap, strength, st.bundle.input_hw,
                             st.bundle.input_resize)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return None
        with self._count_lock:
            self.drawn += 1
        return _Drawn(source, buf.tobytes(), time.monotonic())


def _password(cfg: LiveConfig) -> Optional[str]:
    """live.username's password, from the environment variable live.password_env (never from the file)."""
    if not cfg.username:
        return None
    value = os.environ.get(cfg.password_env or "")
    if not value:
        raise UserError(f"live.password_env names {cfg.password_env}, which is not set (or empty) in the "
                        f"environment: set it to live.username {cfg.username!r}'s password before edge-run starts")
    return value


def _tls_context(cfg: LiveConfig) -> Optional[ssl.SSLContext]:
    """HTTPS with live.tls_cert (and live.tls_key, unless the key is in the certificate's file)."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None, password=lambda: b"")  # never a prompt
    except (OSError, ssl.SSLError) as exc:
        files = cfg.tls_cert + (f" and live.tls_key {cfg.tls_key}" if cfg.tls_key else "")
        raise UserError(f"live.tls_cert {files}: cannot load ({getattr(exc, 'strerror', None) or exc}); give a PEM "
                        "certificate and its unencrypted private key that edge-run can read") from None
    return ctx


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


MJPEG_PER_PAGE = 4  # cameras streamed (MJPEG) per page; more would hold a browser's 6 connections per host


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
td,th{text-align:left;padding:3px 8px;border-bottom:1px solid #2a2a2a;font-size:13px;vertical-align:middle}
tr.start td:nth-child(4){color:#f66}tr.end td:nth-child(4){color:#6c6}
img.snap{height:54px;display:block;background:#000}
#open{display:flex;flex-wrap:wrap;gap:12px}.open{background:#2a1515;border:2px solid #e33;border-radius:6px;padding:6px}
.open img{height:160px;display:block}
#calib{display:flex;gap:8px;align-items:baseline}#calibrate-frames{width:6em}#calibrate-why{color:#999}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:0}dt{color:#999}dd{margin:0}
</style></head><body>
<header><b id="station">edge-run</b><span id="model"></span><span id="threshold"></span><span id="time"></span>
<span id="calib"><button id="calibrate" disabled>calibrate now</button>
<input id="calibrate-frames" type="number" min="2" step="1" aria-label="frames"> good frames
<span id="calibrate-why"></span><span id="calibrate-msg"></span></span><span id="err"></span></header>
<main id="cams"></main>
<section><h3>Open events</h3><div id="open"></div><p class="note" id="none-open">none</p></section>
<section><h3>Last events</h3><table><thead><tr><th>snapshot</th><th>time (UTC)</th><th>camera</th><th>type</th>
<th>frame</th><th>score</th><th>peak</th><th>reason</th></tr></thead><tbody id="events"></tbody></table>
<p class="note">Heat map: the model's anomaly map in each frame, blue at its floor to red at its top, drawn the
more opaque the nearer the score is to the threshold (invisible at a good part's typical score). A model that
gives a score only shows the plain frame. An event's snapshot is its peak frame so far.</p></section>
<section><h3>Station</h3><dl id="stats"></dl></section>
<script>
"use strict";
const MJPEG_PER_PAGE = __MJPEG_PER_PAGE__;
const base = location.origin + location.pathname.replace(/[^/]*$/, "");  // no user:password@ in sub-requests
const cards = {}, rows = {}, opened = {};
const $ = (id) => document.getElementById(id);
function el(tag, cls, parent) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (parent) parent.appendChild(e); return e; }
function card(id) {
  if (cards[id]) return cards[id];
  const box = el("div", "cam", $("cams")), h = el("h2", "", box), name = el("span", "", h);
  name.textContent = id;
  const c = {box: box, state: el("span", "st", h), img: el("img", "frame", box), score: el("div", "score", box),
             frame: null, loading: false, stream: Object.keys(cards).length < MJPEG_PER_PAGE};
  c.img.alt = "camera " + id;
  c.img.dataset.camera = id;
  c.text = el("span", "score-text", c.score);
  const bar = el("div", "bar", c.score);
  c.fill = el("div", "fill", bar); c.mark = el("div", "mark", bar);
  c.note = el("div", "note", box);
  c.img.onload = () => { c.loading = false; };
  c.img.onerror = () => { c.loading = false; if (c.stream) setTimeout(() => { c.frame = null; }, 2000); };
  cards[id] = c;
  return c;
}
function fmt(v) { return v === null || v === undefined ? "–" : Number(v).toPrecision(4); }
function snap(e, cls) {
  const img = el("img", cls);
  img.alt = "snapshot of event " + e.event_id;
  if (e.snapshot) img.src = base + "events/" + encodeURIComponent(e.event_id) + ".jpg?seq=" + e.seq;
  return img;
}
function row(e) {
  const key = e.event_id + ":" + e.seq;
  if (rows[key]) return rows[key];
  const tr = el("tr", e.type);
  tr.dataset.event = e.event_id;
  el("td", "", tr).appendChild(snap(e, "snap"));
  for (const v of [e.ts.replace("T", " ").slice(0, 23), e.camera, e.type, e.frame, fmt(e.score),
                   fmt(e.peak_score), e.reason || ""]) el("td", "", tr).textContent = v;
  rows[key] = tr;
  return tr;
}
function openCard(e) {
  const key = e.event_id + ":" + e.seq;
  if (opened[key]) return opened[key];
  const box = el("div", "open");
  box.dataset.event = e.event_id;
  box.appendChild(snap(e, "snap-open"));
  el("div", "", box).textContent = e.camera + " since " + e.ts.replace("T", " ").slice(11, 19) + " · peak " +
    fmt(e.peak_score);
  opened[key] = box;
  return box;
}
function stats(s) {
  const t = s.stats, items = [
    ["uptime", t.uptime_s + " s"], ["frames scored", t.frames], ["events published", t.events_published],
    ["batch size", t.batch], ["inference p50", fmt(t.inference_ms_p50) + " ms"],
    ["capture to decision p50", fmt(t.latency_ms_p50) + " ms"],
    ["spool", t.spool + ", " + t.spool_depth + " waiting, " + t.spool_dropped + " dropped"]];
  for (const [name, k] of Object.entries(t.sinks))
    items.push(["sink " + name, (k.connected ? "connected" : "not connected") + ", " + k.depth + " waiting, " +
                k.delivered + " delivered, " + k.failed + " failed"]);
  for (const c of s.cameras)
    items.push(["camera " + c.id, c.state + ", " + fmt(c.fps) + " frames/s scored, " + fmt(c.capture_fps) +
                " captured, queue " + c.queue + "/" + c.queue_max + ", " + c.dropped + " dropped, " + c.reconnects +
                " reconnects"]);
  const dl = $("stats");
  dl.textContent = "";
  for (const [k, v] of items) { el("dt", "", dl).textContent = k; el("dd", "", dl).textContent = v; }
}
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
    const src = base + "cam/" + encodeURIComponent(cam.id);
    if (c.stream && cam.frame !== null && c.frame === null) {  // one MJPEG stream: the server sends each frame
      c.frame = cam.frame; c.img.src = src + ".mjpg";
    } else if (!c.stream && cam.frame !== null && cam.frame !== c.frame && !c.loading) {
      c.frame = cam.frame; c.loading = true; c.img.src = src + ".jpg?frame=" + cam.frame;
    }
  }
  $("open").replaceChildren(...s.open.map(openCard));
  $("none-open").hidden = s.open.length > 0;
  $("events").replaceChildren(...s.events.map(row));
  const cal = s.commands.calibrate;
  if (!$("calibrate-frames").value) $("calibrate-frames").value = cal.frames;
  $("calibrate").disabled = !cal.allowed || s.calibrating;
  $("calibrate").title = cal.allowed ? "the next frames are good parts: they set this station's threshold" :
    cal.reason;
  $("calibrate-why").textContent = cal.allowed ? (s.calibrating ? "calibrating…" : "") : cal.reason;
  stats(s);
}
$("calibrate").onclick = async () => {
  const frames = parseInt($("calibrate-frames").value, 10);
  try {
    const r = await fetch(base + "api/calibrate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                   body: JSON.stringify({frames: frames})});
    const j = await r.json();
    $("calibrate-msg").textContent = r.ok ? "calibrating on the next " + j.frames + " frames" :
      r.status + ": " + j.error;
  } catch (e) {
    $("calibrate-msg").textContent = "station not answering";
  }
};
async function tick() {
  let wait = 2000;
  try {
    const r = await fetch(base + "api/status", {cache: "no-store"});
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
""".replace("__MJPEG_PER_PAGE__", str(MJPEG_PER_PAGE))
