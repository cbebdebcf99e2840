"""Capture: one thread per camera feeding a bounded queue, so capture never waits on inference.

A live camera drops the OLDEST queued frame when the queue is full (counted) and stamps frames with the
wall clock. A video file is not a live camera: it blocks instead of dropping and stamps frames from
its fps and frame index, so what a run detects does not depend on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from core.preprocess import DEFAULT_RESIZE, RESIZE_MODES, resize_frame
from edge.config import CameraConfig
from edge.stats import StageClock

log = logging.getLogger("edge.sources")


def quiet_opencv() -> None:
    """Keep OpenCV's and FFmpeg's warnings out of the station's one-line errors. Called when a station starts (not
    at import: importing a module never changes the process's environment); FFmpeg reads its variable when its
    backend first opens a capture, so this runs before any camera is opened."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    with contextlib.suppress(AttributeError):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
FILE_FPS_FALLBACK = 25.0


@dataclass
class Frame:
    """One captured frame: the resized model input, and what a snapshot needs (the original, or its JPEG)."""

    camera: str
    index: int
    ts: float  # seconds since the epoch, UTC: file time (files) or wall clock (live)
    image: np.ndarray  # uint8 BGR [H, W, 3] at the model's input size
    original: Optional[np.ndarray] = None
    t_capture: float = field(default_factory=time.monotonic)  # for end-to-end latency
    packet: Optional[np.ndarray] = None  # the compressed JPEG, when capture decoded it at reduced scale

    def snapshot_image(self) -> np.ndarray:
        """The frame at camera resolution: decoded from its JPEG only now (a snapshot is rare, frames are not)."""
        if self.packet is not None:
            full = cv2.imdecode(self.packet, cv2.IMREAD_COLOR)
            if full is not None:
                return full
        return self.original if self.original is not None else self.image


def source_kind(source: str) -> str:
    """'index' (camera number), 'gstreamer' (pipeline with '!'), 'url' (rtsp/http...), 'device' or 'file'."""
    s = source.strip()
    if s.isdigit():
        return "index"
    if "!" in s:
        return "gstreamer"
    if _URL_RE.match(s):
        return "url"
    if s.startswith("/dev/"):
        return "device"
    return "file"


def is_live(cam: CameraConfig) -> bool:
    """Anything but a video file is live unless the config says otherwise (``live:``)."""
    if cam.live is not None:
        return cam.live
    return source_kind(cam.source) != "file"


def open_capture(source: str, timeout_s: float = 10.0) -> cv2.VideoCapture:
    """Open ``source`` with the right OpenCV backend; the capture may be unopened (check isOpened)."""
    kind = source_kind(source)
    if kind == "index":
        return cv2.VideoCapture(int(source))
    if kind == "gstreamer":
        return cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    if kind == "url":
        # Bounded open/read so a dead stream cannot hang the capture thread forever.
        ms = int(timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(source)


def describe_open_failure(cam: CameraConfig) -> str:
    kind = source_kind(cam.source)
    if kind == "file" and not Path(cam.source).exists():
        return f"camera '{cam.id}': video file {cam.shown_source} not found"
    hint = {
        "index": "is a camera plugged in at that index and not used by another process?",
        "device": "does the device exist and may this user read it?",
        "gstreamer": "this OpenCV may lack GStreamer support (use JetPack's OpenCV), or the pipeline is wrong",
        "url": "is the stream reachable and the URL right?",
        "file": "is it a video file OpenCV can decode?",
    }[kind]
    return f"camera '{cam.id}': cannot open {cam.shown_source} ({hint})"


_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def reduced_decode_flag(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> int:
    """The cv2.imdecode flag that decodes a JPEG at the smallest DCT scale (1/8, 1/4, 1/2) that still covers the
    model input in both dimensions, so resizing from it never enlarges; IMREAD_COLOR (full size) otherwise."""
    for factor, flag in _REDUCED_FLAGS:
        if frame_hw[0] // factor >= input_hw[0] and frame_hw[1] // factor >= input_hw[1]:
            return flag
    return cv2.IMREAD_COLOR


def compressed_packets(cap: cv2.VideoCapture) -> bool:
    """Switch an FFmpeg capture of an MJPEG stream to its compressed packets (each one a JPEG); False, and the
    capture unchanged, for anything else (other codecs, backends that cannot hand out packets)."""
    try:
        if cap.getBackendName() != "FFMPEG":
            return False
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1")
        if fourcc.upper() not in ("MJPG", "MJPEG", "JPEG"):
            return False
        return bool(cap.set(cv2.CAP_PROP_FORMAT, -1)) and cap.get(cv2.CAP_PROP_FORMAT) == -1
    except (cv2.error, OverflowError):
        return False


def lower_thread_priority(nice: int) -> Optional[int]:
    """Run the calling thread ``nice`` steps below the process (Linux: per-thread nice); its nice value after,
    or None where threads have no priority of their own. Lowering needs no privilege."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > 0:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


class FramePace:
    """``max_fps`` for one reader: a live source is read at its own rate and frames in between are skipped
    (``skip``); a video file is read at the rate instead (``wait``), as a camera would deliver it."""

    _STEP_S = 0.5  # a long wait is taken in steps, each reported as "still here" to the stall watchdog

    def __init__(self, max_fps: Optional[float], skip: bool) -> None:
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self.skip = skip
        self.next_due = time.monotonic()

    def wait(self, stop: threading.Event, still_here: Callable[[], None]) -> bool:
        """Before a read: sleep until the next frame is due (files only); False when stopped meanwhile."""
        if not self.interval or self.skip:
            return True
        while True:
            delay = self.next_due - time.monotonic()
            if delay <= 0:
                return True
            if stop.wait(min(delay, self._STEP_S)):
                return False
            still_here()

    def take(self) -> bool:
        """After a read: True when this frame is to be delivered (and the next one is scheduled)."""
        if not self.interval:
            return True
        now = time.monotonic()
        if self.skip and now < self.next_due:
            return False
        # The next slot one interval on; after a long gap restart from now instead of bursting to catch up.
        self.next_due = self.next_due + self.interval if now - self.next_due < self.interval else now + self.interval
        return True


class FrameQueue:
    """Bounded FIFO; ``put`` drops the oldest when full (counted), ``put_blocking`` waits for space.

    All queues of a station share one Condition so the batcher can wait on "any camera has a frame".
    """

    def __init__(self, maxsize: int, cond: Optional[threading.Condition] = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.cond = cond or threading.Condition()
        self._items: deque[Frame] = deque()
        self.dropped = 0
        self.closed = False  # the producer will put no more

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Frame) -> None:
        with self.cond:
            while len(self._items) >= self.maxsize:  # a loop: maxsize may have been lowered (a model swap)
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.cond.notify_all()

    def put_blocking(self, item: Frame, stop: threading.Event) -> bool:
        """Wait for space (video files lose nothing); False when ``stop`` was set first."""
        with self.cond:
            while len(self._items) >= self.maxsize:
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self._items.append(item)
            self.cond.notify_all()
            return True

    def get_nowait(self) -> Optional[Frame]:
        """Caller holds ``cond``; wakes a blocked producer."""
        if not self._items:
            return None
        item = self._items.popleft()
        self.cond.notify_all()
        return item

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        """Closed and drained: nothing more will ever come out."""
        return self.closed and not self._items


# Threads that call into OpenCV to open or read a capture. One abandoned while blocked may return at any time,
# and if that happens while the interpreter is shutting down, CPython unwinds it with a forced unwind that
# OpenCV's C++ ``catch (...)`` blocks swallow: "FATAL: exception not rethrown" and SIGABRT after a clean stop.
_OPENCV_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def _opencv_thread(target: Callable[..., None], name: str, args: tuple = ()) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    _OPENCV_THREADS.add(thread)
    return thread


def threads_in_opencv(grace_s: float = 0.0) -> int:
    """How many capture threads may still be inside an OpenCV call, after waiting up to ``grace_s`` for them."""
    deadline = time.monotonic() + grace_s
    alive = [thread for thread in list(_OPENCV_THREADS) if thread.is_alive()]
    for thread in alive:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sum(thread.is_alive() for thread in alive)


class _Attempt:
    """One capture being opened or read on a thread of its own, so the supervisor can walk away from it when
    OpenCV blocks (a FIFO with no writer, a hung GStreamer pipeline, a silent stream). An abandoned attempt
    releases its capture itself if its call ever returns; nothing else touches that capture again (releasing
    a capture another thread is blocked in can crash OpenCV)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.cap: Optional[cv2.VideoCapture] = None

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True

    def keep(self, cap: cv2.VideoCapture) -> bool:
        """Store the opened capture; False (and released) when the supervisor has already left."""
        with self.lock:
            if self.abandoned:
                cap.release()
                return False
            self.cap = cap
            return True


class CameraSource:
    """One camera: a supervisor thread that opens the source and runs a reader thread per opened capture.

    Live sources are watched: no frame for ``stale_timeout_s`` (a failed read, or a read or open that blocks)
    and the capture is abandoned and the source reopened with exponential back-off. ``connected`` is true
    only while the source delivers; ``stalled`` while it is being recovered.
    """

    _POLL_S = 0.1

    def __init__(self, cam: CameraConfig, input_hw: tuple[int, int], queue: FrameQueue,
                 max_frames: Optional[int] = None, keep_original: bool = False,
                 on_frame: Optional[Callable[[], None]] = None, resize: str = DEFAULT_RESIZE,
                 clock: Optional[StageClock] = None) -> None:
        if resize not in RESIZE_MODES:  # here, not in the capture thread where it could only be logged
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
        self.cam = cam
        self.input_hw = input_hw
        self.resize = resize  # the bundle's input.resize: fit frames exactly as the training images were
        self.queue = queue
        self.max_frames = max_frames
        self.keep_original = keep_original
        self.live = is_live(cam)
        self.captured = 0
        self.reconnects = 0
        self.connected = False
        self.stalled = False
        self.abandoned_threads = 0  # reads/opens left blocked in OpenCV (each holds one thread)
        self.last_frame = time.monotonic()  # when the last frame was read (for the stale watchdog)
        self.down_since: Optional[float] = time.monotonic()  # not delivering since (None while delivering)
        self._cap: Optional[cv2.VideoCapture] = None  # opened by open(), handed to the first reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{cam.id}", daemon=True)
        self._fps = FILE_FPS_FALLBACK
        self._t0 = time.time()
        self._on_frame = on_frame
        self.clock = clock or StageClock()
        self._undecodable = 0
        self.reader_nice: Optional[int] = None  # the reader thread's nice value, once it runs

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> bool:
        """Try once to open the source, waiting at most ``stale_timeout_s``; True when it opened."""
        quiet_opencv()
        cap = self._open_bounded()
        if cap is None:
            return False
        self._cap = cap
        return True

    def _open_bounded(self) -> Optional[cv2.VideoCapture]:
        attempt = _Attempt()

        def target() -> None:
            cap = open_capture(self.cam.source, self.cam.stale_timeout_s)
            if not cap.isOpened():
                cap.release()
                return
            attempt.keep(cap)

        thread = _opencv_thread(target, f"open-{self.cam.id}")
        thread.start()
        thread.join(self.cam.stale_timeout_s)
        if thread.is_alive():
            attempt.abandon()
            self.abandoned_threads += 1
            log.warning("camera '%s': opening %s did not return within %.1f s; abandoned it",
                        self.cam.id, self.cam.shown_source, self.cam.stale_timeout_s)
            return None
        cap = attempt.cap
        if cap is not None and not self.live:
            fps = cap.get(cv2.CAP_PROP_FPS)
            self._fps = fps if fps and 0 < fps < 1000 else FILE_FPS_FALLBACK
            self._t0 = time.time()
        return cap

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    # -- the supervisor --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._supervise()
        except Exception:  # a capture thread must never die silently
            log.exception("camera '%s': capture thread failed", self.cam.id)
        finally:
            self._set_down()
            self.queue.close()

    def _set_down(self) -> None:
        self.connected = False
        if self.down_since is None:
            self.down_since = time.monotonic()

    def _supervise(self) -> None:
        backoff = self.cam.reopen_initial_s
        first = True
        while not self._stop.is_set():
            cap, self._cap = self._cap, None
            if cap is None:
                cap = self._open_bounded() if not first or self.live else None
                if cap is None:
                    if not self.live:
                        log.error("%s", describe_open_failure(self.cam))
                        return
                    log.warning("camera '%s': cannot open %s; retrying in %.1f s", self.cam.id,
                                self.cam.shown_source, backoff)
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, self.cam.reopen_max_s)
                    first = False
                    continue
                log.info("camera '%s': %s %s", self.cam.id, "opened" if first else "reopened", self.cam.shown_source)
            first = False
            outcome = self._read_until_it_stops(cap)
            if outcome == "delivered":
                backoff = self.cam.reopen_initial_s
            if outcome in ("end", "stopped"):
                return
            self.reconnects += 1
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.cam.reopen_max_s)

    def _read_until_it_stops(self, cap: cv2.VideoCapture) -> str:
        """Run a reader on ``cap`` until it ends ('end': a file's end or max_frames), fails or stalls (then
        'failed' / 'delivered' when it had delivered frames first), or we are stopped ('stopped')."""
        attempt = _Attempt()
        attempt.cap = cap
        outcome: dict[str, str] = {}
        delivered_before = self.captured
        reader = _opencv_thread(self._read_loop, f"read-{self.cam.id}", (attempt, outcome))
        self.last_frame = time.monotonic()
        self.stalled = False
        reader.start()
        while True:
            reader.join(self._POLL_S)
            if not reader.is_alive():
                break
            if self._stop.is_set() and self.live:
                attempt.abandon()  # a blocked read must not hold up the stop
                return "stopped"
            silent = time.monotonic() - self.last_frame
            if self.live and silent > self.cam.stale_timeout_s:
                attempt.abandon()
                self.abandoned_threads += 1
                self.stalled = True
                self._set_down()
                log.warning("camera '%s': no frame for %.1f s (the read is blocked); abandoning it and reopening %s",
                            self.cam.id, silent, self.cam.shown_source)
                return "delivered" if self.captured > delivered_before else "failed"
        self._set_down()
        if self._stop.is_set():
            return "stopped"
        if outcome.get("how") == "end" or not self.live:
            if outcome.get("how") != "max_frames":
                log.info("camera '%s': end of %s after %d frames", self.cam.id, self.cam.shown_source, self.captured)
            return "end"
        self.stalled = True
        log.warning("camera '%s': no frame (read failed, %.1f s since the last); reopening %s", self.cam.id,
                    time.monotonic() - self.last_frame, self.cam.shown_source)
        return "delivered" if self.captured > delivered_before else "failed"

    def _read_loop(self, attempt: _Attempt, outcome: dict[str, str]) -> None:
        """The reader thread: the only thread that uses (and finally releases) this capture."""
        cap = attempt.cap
        assert cap is not None
        self.reader_nice = lower_thread_priority(self.cam.nice)
        packets = self.cam.reduced_decode and compressed_packets(cap)
        full_hw: Optional[tuple[int, int]] = None  # a packet stream's frame size, learnt from its first frame
        pace = FramePace(self.cam.max_fps, skip=source_kind(self.cam.source) != "file")
        try:
            while not self._stop.is_set():
                if self.max_frames is not None and self.captured >= self.max_frames:
                    outcome["how"] = "max_frames"
                    return
                if not pace.wait(self._stop, self._still_here):
                    return
                t0 = time.perf_counter()
                ok, data = cap.read()
                if attempt.abandoned:
                    return  # the supervisor has moved on: this frame is stale, and no longer ours to deliver
                if not ok or data is None:
                    self.clock.add("decode", time.perf_counter() - t0)
                    outcome["how"] = "end" if not self.live else "failed"
                    return
                self.last_frame = time.monotonic()  # the source delivers, whether or not this frame is skipped
                if not pace.take():
                    continue
                packet = None
                if packets:
                    packet = data.reshape(-1)
                    flag = cv2.IMREAD_COLOR if full_hw is None else reduced_decode_flag(full_hw, self.input_hw)
                    image = cv2.imdecode(packet, flag)
                    if image is None:
                        self.clock.add("decode", time.perf_counter() - t0)
                        self._undecodable += 1
                        if self._undecodable == 1:
                            log.warning("camera '%s': a frame's JPEG could not be decoded; such frames are skipped",
                                        self.cam.id)
                        continue
                    if full_hw is None:
                        full_hw = (int(image.shape[0]), int(image.shape[1]))
                else:
                    image = data
                self.clock.add("decode", time.perf_counter() - t0)
                self._deliver(image, time.monotonic(), packet)
        finally:
            cap.release()

    def _still_here(self) -> None:
        """Called while a paced reader waits on purpose: a wait is not a stall."""
        self.last_frame = time.monotonic()

    def _deliver(self, image: np.ndarray, t_capture: float, packet: Optional[np.ndarray] = None) -> None:
        index = self.captured
        self.last_frame = t_capture
        self.connected = True
        self.stalled = False
        self.down_since = None
        ts = self._t0 + index / self._fps if not self.live else time.time()
        t0 = time.perf_counter()
        fitted = resize_frame(image, self.input_hw, self.resize)
        self.clock.add("resize", time.perf_counter() - t0)
        keep_packet = self.keep_original and packet is not None
        frame = Frame(camera=self.cam.id, index=index, ts=ts, image=fitted,
                      original=image if self.keep_original and not keep_packet else None, t_capture=t_capture,
                      packet=packet.copy() if keep_packet and packet is not None else None)
        self.captured += 1
        if self._on_frame is not None:
            self._on_frame()
        if self.live:
            self.queue.put(frame)
        else:
            self.queue.put_blocking(frame, self._stop)
