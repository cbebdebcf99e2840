"""A GStreamer pipeline ending in ``appsink`` (the elements joined by ``!``): Jetson's CSI cameras, hardware
decoders. Needs an OpenCV built with GStreamer (JetPack's is)."""

from __future__ import annotations

import cv2

from edge.sources.opencv import OpenCvKind
from edge.sources.registry import register_source


@register_source("gstreamer")
class GStreamerKind(OpenCvKind):
    order = 10
    hint = "this OpenCV may lack GStreamer support (use JetPack's OpenCV), or the pipeline is wrong"

    def claims(self, source: str) -> bool:
        return "!" in source

    def video_capture(self, source: str, timeout_s: float) -> cv2.VideoCapture:
        return cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
