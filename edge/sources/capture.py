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

import numpy as np

from core.preprocess import DEFAULT_RESIZE, RESIZE_MODES, resize_frame
from edge.config import CameraConfig, redact_secrets
from edge.sources.frames import Frame, FrameQueue
from edge.sources.mjpeg import PacketDecoder
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
    _BAD_RUN_MAX = 25  # failed reads in a row before a recording with frames left is taken to have ended

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
        self.refits = 0  # times the frame size changed mid-stream (the frames were fitted from the new size)
        self.frame_hw: Optional[tuple[int, int]] = None  # the source's frame size, as last delivered
        self._warned: set[str] = set()  # causes of skipped frames already logged
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
                            self.cam.shown_source, self.kind.name, type(exc).__name__, _one_line(exc))
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
            while True:
                try:
                    self._supervise()
                    return
                except Exception as exc:  # a bug in a kind or here: a live camera is reopened, never left dead
                    self._set_down()
                    if not self.live or self._stop.is_set():
                        log.exception("camera '%s': capture thread failed", self.cam.id)
                        return
                    self._cap = None
                    self._warn_once(f"supervisor {type(exc).__name__}", "the capture supervisor raised %s (%s); "
                                    "reopening %s in %.1f s", type(exc).__name__, _one_line(exc),
                                    self.cam.shown_source, self.cam.reopen_max_s)
                    self.reconnects += 1
                    if self._stop.wait(self.cam.reopen_max_s):
                        return
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
        """The reader thread: the only thread that uses (and finally releases) this capture.

        A recording's failed read is the end only when its header's frame count has been read (or it has no
        count) or after ``_BAD_RUN_MAX`` failures in a row: before that it is a damaged frame, skipped and counted
        in ``undecodable``, and the file is read on to its real end. What a frame's decoding or fitting raises
        costs that frame (counted, logged once per cause), never the thread."""
        cap: Optional[Capture] = attempt.cap
        assert cap is not None
        try:
            self._read_frames(cap, attempt, outcome)
        except Exception as exc:  # a kind's bug: this capture is given up (a live camera is reopened)
            self._warn_once(f"reader {type(exc).__name__}", "reading %s raised %s (%s); %s", self.cam.shown_source,
                            type(exc).__name__, _one_line(exc), "reopening it" if self.live else "taken as its end")
            outcome["how"] = "failed"
        finally:
            cap.release()

    def _read_frames(self, cap: Capture, attempt: Attempt, outcome: dict[str, str]) -> None:
        self.reader_nice = lower_thread_priority(self.cam.nice)
        decoder = PacketDecoder() if self.cam.reduced_decode and self.kind.compressed(cap) else None
        pace = FramePace(self.cam.max_fps, skip=self.kind.live)  # a recording waits for its slot, a camera skips
        count = None if self.live else self.kind.frame_count(cap)
        reads = 0  # reads that returned a frame or packet, decodable or not
        skipped = 0  # failed reads that a good read followed: damaged frames in the middle of a recording
        failed_run = 0  # failed reads in a row
        while not self._stop.is_set():
            if self.max_frames is not None and self.captured >= self.max_frames:
                outcome["how"] = "max_frames"
                return
            if not pace.wait(self._stop, self._still_here):
                return
            t0 = time.perf_counter()
            try:
                ok, data = cap.read()
            except Exception as exc:  # a backend that raises instead of answering False: a failed read
                self._warn_once(f"read {type(exc).__name__}", "a read raised %s (%s); taken as a failed read",
                                type(exc).__name__, _one_line(exc))
                ok, data = False, None
            if attempt.abandoned:
                return  # the supervisor has moved on: this frame is stale, and no longer ours to deliver
            if not ok:
                self.clock.add("decode", time.perf_counter() - t0)
                if self.live:
                    outcome["how"] = "failed"
                    return
                failed_run += 1
                if count is not None and reads + skipped + failed_run <= count and failed_run <= self._BAD_RUN_MAX:
                    continue  # frames left: a damaged one, not the end
                self._count_missing(count, reads, skipped)
                outcome["how"] = "end"
                return
            if failed_run:
                skipped += failed_run
                self._skip(failed_run, "damaged frame(s) could not be read (a corrupt stretch of the file?); "
                           "skipped, reading on")
                failed_run = 0
            reads += 1
            self.last_frame = time.monotonic()  # the source delivers, whether or not this frame is skipped
            if data is None:  # read, but unreadable (the kind has said which): skipped, counted
                self.clock.add("decode", time.perf_counter() - t0)
                self.undecodable += 1
                continue
            if not pace.take():
                continue
            try:
                self._decode_and_deliver(data, decoder, t0)
            except Exception as exc:  # this frame only: the reader reads on
                self._skip(1, f"frame could not be decoded or fitted ({type(exc).__name__}: {_one_line(exc)}); "
                           "such frames are skipped", cause=type(exc).__name__)

    def _decode_and_deliver(self, data: np.ndarray, decoder: Optional[PacketDecoder], t0: float) -> None:
        packet = None
        if decoder is not None:
            packet = data.reshape(-1)
            image = decoder.decode(packet, self.input_hw)
            if image is None:
                self.clock.add("decode", time.perf_counter() - t0)
                self._skip(1, "frame's JPEG could not be decoded; such frames are skipped", cause="jpeg")
                return
            assert decoder.frame_hw is not None
            self._check_frame_size(decoder.frame_hw)
        else:
            image = data
            if not image.size:  # an empty image: nothing to fit
                self._skip(1, "frame was an empty image; such frames are skipped", cause="empty")
                return
            self._check_frame_size((int(image.shape[0]), int(image.shape[1])))
        self.clock.add("decode", time.perf_counter() - t0)
        self._deliver(image, time.monotonic(), packet)

    def _check_frame_size(self, frame_hw: tuple[int, int]) -> None:
        """Note the source's frame size; a change (a camera switched resolution, reconnected at another one, a
        folder of mixed images) is logged once per change and counted in ``refits``. Every frame is fitted to
        the model input from its own size, and a packet stream's reduced decode follows (``PacketDecoder``)."""
        if self.frame_hw is not None and frame_hw != self.frame_hw:
            self.refits += 1
            log.warning("camera '%s': frame size changed from %dx%d to %dx%d; frames are re-fitted to the model "
                        "input from the new size", self.cam.id, self.frame_hw[1], self.frame_hw[0], frame_hw[1],
                        frame_hw[0])
        self.frame_hw = frame_hw

    def _count_missing(self, count: Optional[int], reads: int, skipped: int) -> None:
        """At a recording's end: frames its header counts that no read returned were damaged (the demuxer
        dropped them, or the reads of a damaged stretch failed up to the end)."""
        missing = (count or 0) - reads - skipped
        if missing > 0:
            self._skip(missing, f"frame(s) of the {count} its header counts could not be read (a damaged file?)",
                       cause="missing")

    def _skip(self, frames: int, what: str, cause: str = "damaged") -> None:
        self.undecodable += frames
        self._warn_once(cause, "%d %s", frames, what)

    def _warn_once(self, cause: str, message: str, *args: object) -> None:
        """A warning once per cause for this camera: a corrupt stream must not flood the log frame by frame."""
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning("camera '%s': " + message, self.cam.id, *args)

    def _still_here(self) -> None:
        """Called while a paced reader waits on purpose: a wait is not a stall."""
        self.last_frame = time.monotonic()

    def _deliver(self, image: np.ndarray, t_capture: float, packet: Optional[np.ndarray] = None) -> None:
        index = self.captured  # frame numbers count delivered frames (skipped ones are counted apart)
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


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one bounded log line (OpenCV's messages run over several), credentials masked: an OpenCV or
    GStreamer error can repeat the source URL with its password."""
    text = " ".join(redact_secrets(str(exc)).split())
    return (text[:limit - 1] + "…" if len(text) > limit else text) or type(exc).__name__
