"""MJPEG streams decoded from their compressed packets, at the smallest JPEG scale that covers the model input:
a 1080p camera feeding a 160x160 model is decoded at 1/4 scale, a fraction of the full decode's cost."""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_FACTOR = {flag: factor for factor, flag in _REDUCED_FLAGS}


def reduced_decode_flag(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> int:
    """The cv2.imdecode flag that decodes a JPEG at the smallest DCT scale (1/8, 1/4, 1/2) that still covers the
    model input in both dimensions, so resizing from it never enlarges; IMREAD_COLOR (full size) otherwise."""
    for factor, flag in _REDUCED_FLAGS:
        if frame_hw[0] // factor >= input_hw[0] and frame_hw[1] // factor >= input_hw[1]:
            return flag
    return cv2.IMREAD_COLOR


def decoded_size(frame_hw: tuple[int, int], flag: int) -> tuple[int, int]:
    """The size cv2.imdecode gives a JPEG of ``frame_hw`` with ``flag`` (libjpeg rounds a scaled size up)."""
    factor = _FACTOR.get(flag, 1)
    return -(-frame_hw[0] // factor), -(-frame_hw[1] // factor)


class PacketDecoder:
    """Decodes one stream's JPEG packets at the reduced scale its frame size allows.

    The frame size is learnt from the first packet (decoded in full) and checked on every later one: a decoded
    size that does not match the scale in use means the camera changed resolution, and the packet is decoded in
    full once to learn the new size and then at the scale that fits it, as a stream of that size would be from
    its start. Keeping the first frame's scale would decode a smaller stream too small, enlarged back to the
    model input: every later frame scored misfitted.
    """

    def __init__(self) -> None:
        self.frame_hw: Optional[tuple[int, int]] = None  # the stream's full frame size, once a packet decoded

    def decode(self, packet: np.ndarray, input_hw: tuple[int, int]) -> Optional[np.ndarray]:
        """The packet's image at the reduced scale for ``input_hw``; None when it is not a decodable JPEG."""
        if self.frame_hw is not None:
            flag = reduced_decode_flag(self.frame_hw, input_hw)
            image = cv2.imdecode(packet, flag)
            if image is None or image.shape[:2] == decoded_size(self.frame_hw, flag):
                return image
        full = cv2.imdecode(packet, cv2.IMREAD_COLOR)  # the first packet, or one of another size than before
        if full is None:
            return None
        self.frame_hw = (int(full.shape[0]), int(full.shape[1]))
        flag = reduced_decode_flag(self.frame_hw, input_hw)
        return full if flag == cv2.IMREAD_COLOR else cv2.imdecode(packet, flag)


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
