"""A camera on this machine: its index (``0``) or its device node (``/dev/video0``)."""

from __future__ import annotations

import cv2

from edge.config import CameraConfig
from edge.sources.opencv import OpenCvKind
from edge.sources.registry import register_source


@register_source("camera")
class CameraKind(OpenCvKind):
    order = 30

    def claims(self, source: str) -> bool:
        return source.isdigit() or source.startswith("/dev/")

    def video_capture(self, source: str, timeout_s: float) -> cv2.VideoCapture:
        source = source.strip()
        return cv2.VideoCapture(int(source)) if source.isdigit() else cv2.VideoCapture(source)

    def open_failure(self, cam: CameraConfig) -> str:
        hint = ("is a camera plugged in at that index and not used by another process?" if cam.source.strip().isdigit()
                else "does the device exist and may this user read it?")
        return f"camera '{cam.id}': cannot open {cam.shown_source} ({hint})"
