"""The capture machinery every kind of source shares: one camera's supervisor and reader threads.

A live camera drops the OLDEST queued frame when the queue is full (counted) and stamps frames with the
wall clock. A recording (video file, image folder) is not a live camera: it blocks instead of dropping and
stamps frames from its fps and frame index, so what a run detects does not depend on how fast the machine is.
Which kind a source is, and how it opens and reads, is its kind's (``edge.sources.registry``); the rest is here.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import cv2
import numpy as np

from core.preprocess import DEFAULT_RESIZE, RESIZE_MODES, resize_frame
from edge.config import CameraConfig
from edge.sources.frames import Frame, FrameQueue
from edge.sources.mjpeg import reduced_decode_flag
from edge.sources.opencv import quiet_opencv
from edge.sources.pace import FramePace
from edge.sources.registry import Capture, camera_kind, is_live
from edge.sources.threads import Attempt, lower_thread_priority, opencv_thread
from edge.stats import StageClock

log = logging.getLogger("edge.sources")

FILE_FPS_FALLBACK = 25.0  # a recording's frame rate where it has none of its own and max_fps is not set


class CameraSource:
    """One camera: a supervisor thread that opens the source and runs a reader thread per opened capture.

    Its kind (``kind``, from the registry) opens and reads; this class does the rest, the same for every kind.
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
        self.kind = camera_kind(cam)
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
        self._cap: Optional[Capture] = None  # opened by open(), handed to the first reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{cam.id}", daemon=True)
        self._fps = FILE_FPS_FALLBACK
        self._t0 = time.time()
        self._on_frame = on_frame
        self.clock = clock or StageClock()
        self.undecodable = 0  # frames read but not decodable (a corrupt JPEG packet, an unreadable image): skipped
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

    def _open_bounded(self) -> Optional[Capture]:
        attempt = Attempt()

        def target() -> None:
            try:
                cap = self.kind.open(self.cam.source, self.cam.stale_timeout_s)
            except Exception as exc:  # a kind's open raised instead of answering None: not opened all the same
                log.warning("camera '%s': opening %s as a %s source raised %s: %s", self.cam.id,
                            self.cam.shown_source, self.kind.name, type(exc).__name__, exc)
                return
            if cap is not None:
                attempt.keep(cap)

        thread = opencv_thread(target, f"open-{self.cam.id}")
        thread.start()
        thread.join(self.cam.stale_timeout_s)
        if thread.is_alive():
            attempt.abandon()
            self.abandoned_threads += 1
            log.warning("camera '%s': opening %s did not return within %.1f s; abandoned it",
                        self.cam.id, self.cam.shown_source, self.cam.stale_timeout_s)
            return None
        cap: Optional[Capture] = attempt.cap
        if cap is not None and not self.live:
            self._fps = self.kind.frame_rate(cap) or self.cam.max_fps or FILE_FPS_FALLBACK
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
                        log.error("%s", self.kind.open_failure(self.cam))
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

    def _read_until_it_stops(self, cap: Capture) -> str:
        """Run a reader on ``cap`` until it ends ('end': a file's end or max_frames), fails or stalls (then
        'failed' / 'delivered' when it had delivered frames first), or we are stopped ('stopped')."""
        attempt = Attempt()
        attempt.cap = cap
        outcome: dict[str, str] = {}
        delivered_before = self.captured
        reader = opencv_thread(self._read_loop, f"read-{self.cam.id}", (attempt, outcome))
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

    def _read_loop(self, attempt: Attempt, outcome: dict[str, str]) -> None:
        """The reader thread: the only thread that uses (and finally releases) this capture."""
        cap: Optional[Capture] = attempt.cap
        assert cap is not None
        self.reader_nice = lower_thread_priority(self.cam.nice)
        packets = self.cam.reduced_decode and self.kind.compressed(cap)
        full_hw: Optional[tuple[int, int]] = None  # a packet stream's frame size, learnt from its first frame
        pace = FramePace(self.cam.max_fps, skip=self.kind.live)  # a recording waits for its slot, a camera skips
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
                if not ok:
                    self.clock.add("decode", time.perf_counter() - t0)
                    outcome["how"] = "end" if not self.live else "failed"
                    return
                self.last_frame = time.monotonic()  # the source delivers, whether or not this frame is skipped
                if data is None:  # read, but unreadable (the kind has said which): skipped, counted
                    self.clock.add("decode", time.perf_counter() - t0)
                    self.undecodable += 1
                    continue
                if not pace.take():
                    continue
                packet = None
                if packets:
                    packet = data.reshape(-1)
                    flag = cv2.IMREAD_COLOR if full_hw is None else reduced_decode_flag(full_hw, self.input_hw)
                    image = cv2.imdecode(packet, flag)
                    if image is None:
                        self.clock.add("decode", time.perf_counter() - t0)
                        self.undecodable += 1
                        if self.undecodable == 1:
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
