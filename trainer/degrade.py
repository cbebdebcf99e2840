"""Codec-robust training: the station's kind of degradation applied to still images of normal parts.

A bundle fitted on lossless PNG stills meets a lossy stream on the station (MJPEG from a USB camera, H.264
from an IP camera, another exposure). A JPEG round trip alone moves good parts' scores by about two standard
deviations of their spread, enough for the threshold calibrated on the stills to be crossed by half the good
frames. So each still also enters the model's memory / statistics and the calibration hold-out as
``copies`` degraded versions: JPEG re-encoded at a quality drawn from ``jpeg_quality`` (what MJPEG is, and
the same 8x8 DCT quantisation and 4:2:0 chroma subsampling H.264's intra blocks show), at the image's own
resolution before it is fitted to the model input, as the station decodes then resizes; then a small gain
and offset (``contrast``, ``brightness``) as a camera's exposure drifts.

Frames a station collected (an image with a JSON sidecar naming its station, edge-run's collection layout)
already went through the station's codec: they are used as they are.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np


@dataclass(frozen=True)
class Degradation:
    """One draw of the station's degradation per call (``apply``), seeded by the caller's generator."""

    jpeg_quality: tuple[int, int] = (50, 95)
    brightness: float = 0.04
    contrast: float = 0.05

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``image`` uint8 (BGR or gray) JPEG round-tripped, then gain/offset; same shape and dtype."""
        low, high = self.jpeg_quality
        quality = int(rng.integers(low, high + 1))
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
            raise RuntimeError("cv2.imencode failed on a training image")
        flag = cv2.IMREAD_GRAYSCALE if image.ndim == 2 else cv2.IMREAD_COLOR
        decoded = cv2.imdecode(buf, flag)
        if decoded is None:  # pragma: no cover - what imencode wrote always decodes
            raise RuntimeError("cv2.imdecode failed on a re-encoded training image")
        out = decoded.astype(np.float32)
        gain = 1.0 + rng.uniform(-self.contrast, self.contrast)
        offset = 255.0 * rng.uniform(-self.brightness, self.brightness)
        return np.clip(out * gain + offset, 0, 255).round().astype(np.uint8).reshape(image.shape)


@functools.lru_cache(maxsize=1 << 17)
def is_station_frame(path: Path) -> bool:
    """Whether ``path`` is a frame a station collected: its JSON sidecar names the station.

    Cached: every loader (the loop builds its validation loader each epoch) asks again for the same paths,
    and a nightly retrain has tens of thousands of sidecars to read."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return False
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "station" in meta


DRAWN = -1  # an item's copy index when each epoch draws it clean or degraded (``expand(..., per_epoch=True)``)


def expand(paths: Sequence[Path], copies: int, per_epoch: bool = False) -> list[tuple[Path, int]]:
    """Items (path, copy) of ``paths``: copy 0 the image as it is, 1..copies degraded draws of each still
    (station frames get no copies). Clean images first, in order, then the copies.

    ``per_epoch`` (training epochs): no extra items, so an epoch costs what it did; each still is instead
    ``DRAWN``: every epoch shows it degraded with probability copies / (1 + copies), the same share of
    degraded images the copies give a one-pass model."""
    if per_epoch:
        return [(p, DRAWN if copies > 0 and not is_station_frame(p) else 0) for p in paths]
    items = [(p, 0) for p in paths]
    if copies > 0:
        stills = [p for p in paths if not is_station_frame(p)]
        items += [(p, k) for k in range(1, copies + 1) for p in stills]
    return items


def codec_plan(enabled: Optional[bool], copies: int, degradation: Degradation,
               paths: Sequence[Path]) -> tuple[Optional[Degradation], int, str]:
    """What a fit does with codec-robust training: (degradation or None, copies, one line for the log).

    ``enabled`` None = auto: on when any of ``paths`` is a still (not a station frame).
    """
    stills = sum(not is_station_frame(p) for p in paths)
    on = stills > 0 if enabled is None else enabled
    if not on:
        why = "codec_augment.enabled is false" if enabled is False else "every training image is a station frame"
        return None, 0, f"codec-robust training off ({why})"
    low, high = degradation.jpeg_quality
    return degradation, copies, (
        f"codec-robust training: {stills} still(s) also used as {copies} degraded cop{'y' if copies == 1 else 'ies'} "
        f"each (JPEG quality {low}-{high}, brightness ±{degradation.brightness:.0%}, "
        f"contrast ±{degradation.contrast:.0%}), in the model and the calibration hold-out")
