"""Capture: one thread per camera feeding a bounded queue, so capture never waits on inference.

What a source is comes from a registry of kinds (``edge.sources.registry``; one module each in
``edge/sources/kinds/``: camera, file, url, gstreamer, folder); the machinery they share (``CameraSource``:
bounded open and read, reopening with back-off, pacing, MJPEG's reduced decode) lives once, in ``capture``.
"""

from __future__ import annotations

from edge.sources.capture import FILE_FPS_FALLBACK, CameraSource
from edge.sources.frames import Frame, FrameQueue
from edge.sources.mjpeg import compressed_packets, reduced_decode_flag
from edge.sources.opencv import quiet_opencv
from edge.sources.pace import FramePace
from edge.sources.registry import (
    Capture,
    SourceKind,
    describe_open_failure,
    find_kind,
    get_source_kind,
    is_live,
    open_capture,
    register_source,
    source_kind,
    source_kinds,
)
from edge.sources.threads import lower_thread_priority, threads_in_opencv

__all__ = ["FILE_FPS_FALLBACK", "CameraSource", "Capture", "Frame", "FramePace", "FrameQueue", "SourceKind",
           "compressed_packets", "describe_open_failure", "find_kind", "get_source_kind", "is_live",
           "lower_thread_priority", "open_capture", "quiet_opencv", "reduced_decode_flag", "register_source",
           "source_kind", "source_kinds", "threads_in_opencv"]
