"""MJPEG streams decoded from their compressed packets, at the smallest JPEG scale that covers the model input:
a 1080p camera feeding a 160x160 model is decoded at 1/4 scale, a fraction of the full decode's cost."""

from __future__ import annotations

import cv2

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
