"""Preprocessing on the host: how a frame of any size is fitted to the model's H×W.

The trainer and the station call this same function, so training images and station frames are fitted alike
(the bundle's manifest key ``input.resize`` names the mode; absent = "stretch").
"""

from __future__ import annotations

import cv2
import numpy as np

# stretch to H×W; letterbox = fit inside keeping the aspect ratio, centred, black bars; crop = cover H×W
# keeping the aspect ratio, centre crop.
RESIZE_MODES = ("stretch", "letterbox", "crop")
DEFAULT_RESIZE = "stretch"


def _scale(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2.resize to h×w: area interpolation when shrinking (no aliasing), linear otherwise."""
    if image.shape[0] == h and image.shape[1] == w:
        return image
    shrink = image.shape[0] > h or image.shape[1] > w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """uint8 BGR [H,W,3] from a grey, BGR or BGRA frame of 8 or 16 bits, as cv2.imread(IMREAD_COLOR) reads files.

    Grey is replicated to three channels (B = G = R): the pretrained backbones take ImageNet RGB, and the models
    that work in grey (input.channels: gray) take its luma back exactly. 16 bits keep their top byte (>> 8),
    what imread does, so a 16-bit camera frame and its PNG on disk give the model the same pixels.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 or uint16, not {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"frames must be [H,W], [H,W,1], [H,W,3] or [H,W,4], not {list(image.shape)}")
    return image


def letterbox_box(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a letterboxed frame inside the input: the limiting side fitted exactly, the
    other keeping the aspect ratio (integer compare: no float ties), centred between the bars."""
    (ih, iw), (h, w) = frame_hw, input_hw
    if iw * h >= ih * w:
        nh, nw = min(h, max(1, round(ih * w / iw))), w
    else:
        nh, nw = h, min(w, max(1, round(iw * h / ih)))
    return (h - nh) // 2, (w - nw) // 2, nh, nw


def crop_box(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre region of the frame, in frame pixels, with the input's aspect."""
    (ih, iw), (h, w) = frame_hw, input_hw
    if iw * h >= ih * w:
        ch, cw = ih, min(iw, max(1, round(ih * w / h)))
    else:
        ch, cw = min(ih, max(1, round(iw * h / w))), iw
    return (ih - ch) // 2, (iw - cw) // 2, ch, cw


def resize_frame(image: np.ndarray, hw: tuple[int, int], mode: str = DEFAULT_RESIZE) -> np.ndarray:
    """To the model's H×W, uint8 BGR, fitted by ``mode`` (core.bundle.RESIZE_MODES).

    The trainer calls this same function, so training images and station frames are fitted alike.
    stretch: to H×W whatever the aspect ratio. letterbox: scaled to fit inside H×W keeping the aspect
    ratio, centred, black (0) bars on the two sides it does not reach. crop: the centre region of the
    frame with the input's aspect ratio, scaled to H×W (scaling to cover H×W, then cropping the centre).
    Grey frames ([H,W] or [H,W,1]) become BGR with B = G = R, BGRA frames BGR, and 16-bit frames 8-bit by
    the top byte (``to_bgr8``): what the trainer's cv2.imread(IMREAD_COLOR) makes of the same image file.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
    image = to_bgr8(image)
    h, w = hw
    ih, iw = image.shape[:2]
    if mode == "letterbox" and (ih, iw) != (h, w):
        top, left, nh, nw = letterbox_box((ih, iw), hw)
        out = np.zeros((h, w, 3), np.uint8)
        out[top:top + nh, left:left + nw] = _scale(image, nh, nw)
        return out
    if mode == "crop" and (ih, iw) != (h, w):
        # Crop in source pixels first: the same centre region, without resizing what is cut away.
        top, left, ch, cw = crop_box((ih, iw), hw)
        image = image[top:top + ch, left:left + cw]
    return np.ascontiguousarray(_scale(image, h, w), dtype=np.uint8)


def map_on_frame(level: np.ndarray, frame_hw: tuple[int, int], input_hw: tuple[int, int], mode: str) -> np.ndarray:
    """``level`` (a map over the model's input, any resolution) placed on the camera frame: float32 [H, W], 0
    where the frame was not seen by the model. Undoes core.preprocess.resize_frame's fitting: stretch scales
    back; letterbox drops the bars; crop fills the centre region the model saw (the rest stays 0)."""
    fh, fw = frame_hw
    h, w = input_hw
    mh, mw = level.shape
    if mode == "letterbox" and (fh, fw) != (h, w):
        # resize_frame's placement of the scaled frame inside the input, read in map pixels
        top, left, nh, nw = letterbox_box(frame_hw, input_hw)
        r0, c0 = int(top * mh / h), int(left * mw / w)
        r1, c1 = max(r0 + 1, round((top + nh) * mh / h)), max(c0 + 1, round((left + nw) * mw / w))
        return cv2.resize(np.ascontiguousarray(level[r0:r1, c0:c1]), (fw, fh), interpolation=cv2.INTER_LINEAR)
    if mode == "crop" and (fh, fw) != (h, w):
        # resize_frame's centre region of the frame, in frame pixels
        top, left, ch, cw = crop_box(frame_hw, input_hw)
        out = np.zeros((fh, fw), np.float32)
        out[top:top + ch, left:left + cw] = cv2.resize(level, (cw, ch), interpolation=cv2.INTER_LINEAR)
        return out
    return cv2.resize(level, (fw, fh), interpolation=cv2.INTER_LINEAR)
