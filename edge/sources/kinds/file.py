"""A video file (or anything else OpenCV opens by path, such as a FIFO fed by a camera driver): the catch-all.

A recording, not a live camera: read to its end without dropping a frame, each stamped at the file's fps."""

from __future__ import annotations

from pathlib import Path

from edge.config import CameraConfig
from edge.sources.opencv import OpenCvKind
from edge.sources.registry import register_source


@register_source("file")
class FileKind(OpenCvKind):
    order = 1000  # whatever no other kind claims is a path
    live = False
    hint = "is it a video file OpenCV can decode?"

    def claims(self, source: str) -> bool:
        return True

    def open_failure(self, cam: CameraConfig) -> str:
        if not Path(cam.source).exists():
            return f"camera '{cam.id}': video file {cam.shown_source} not found"
        return super().open_failure(cam)
