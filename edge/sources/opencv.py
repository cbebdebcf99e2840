"""Sources OpenCV opens (camera, video file, stream URL, GStreamer pipeline): their common ground."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import cv2

from edge.sources.mjpeg import compressed_packets
from edge.sources.registry import Capture, SourceKind


def quiet_opencv() -> None:
    """Keep OpenCV's and FFmpeg's warnings out of the station's one-line errors. Called when a station starts (not
    at import: importing a module never changes the process's environment); FFmpeg reads its variable when its
    backend first opens a capture, so this runs before any camera is opened."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    with contextlib.suppress(AttributeError):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class OpenCvKind(SourceKind):
    """A kind whose capture is a ``cv2.VideoCapture``: a subclass says only how to construct it."""

    def video_capture(self, source: str, timeout_s: float) -> cv2.VideoCapture:
        """The (possibly unopened) capture for ``source``."""
        return cv2.VideoCapture(source)

    def open(self, source: str, timeout_s: float) -> Optional[Capture]:
        cap = self.video_capture(source, timeout_s)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def frame_rate(self, capture: Capture) -> Optional[float]:
        fps = capture.get(cv2.CAP_PROP_FPS) if isinstance(capture, cv2.VideoCapture) else None
        return fps if fps and 0 < fps < 1000 else None

    def frame_count(self, capture: Capture) -> Optional[int]:
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT) if isinstance(capture, cv2.VideoCapture) else 0
        return int(count) if 0 < count < 1e12 else None  # a stream or a pipe: no count, or nonsense

    def compressed(self, capture: Capture) -> bool:
        return isinstance(capture, cv2.VideoCapture) and compressed_packets(capture)
