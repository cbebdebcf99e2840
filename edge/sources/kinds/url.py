"""A network stream: ``rtsp://``, ``http://``, ``https://`` (any ``scheme://`` FFmpeg reads), opened and read
with FFmpeg's timeouts, so a dead stream cannot hang the capture thread forever."""

from __future__ import annotations

import re

import cv2

from edge.sources.opencv import OpenCvKind
from edge.sources.registry import register_source

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@register_source("url")
class UrlKind(OpenCvKind):
    order = 20
    hint = "is the stream reachable and the URL right?"

    def claims(self, source: str) -> bool:
        return bool(_URL_RE.match(source))

    def video_capture(self, source: str, timeout_s: float) -> cv2.VideoCapture:
        ms = int(timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
