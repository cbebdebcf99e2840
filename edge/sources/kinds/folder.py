"""A folder of still images (PNG, JPEG, BMP, TIFF), read once in name order as a recording: a factory station
replaying inspection images, or a line-scan camera's drop folder.

Names are ordered as people number them (``img2`` before ``img10``). Frames are stamped like a video file's, at
the camera's ``max_fps`` (which also paces the reading) or else 25 frames/s. An image that cannot be read (a
truncated file, a camera still writing it) is skipped with a warning and counted in ``CameraSource.undecodable``;
the folder goes on.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import cv2

from edge.config import CameraConfig
from edge.sources.registry import Capture, SourceKind, register_source

log = logging.getLogger("edge.sources.folder")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def natural_key(name: str) -> list[Union[int, str]]:
    """Sort key: runs of digits compare as numbers, so ``part9.png`` comes before ``part10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (not hidden, not in subfolders), in natural name order."""
    found = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(found, key=lambda p: (natural_key(p.name), p.name))


class FolderCapture:
    """The images of one folder, one ``read`` each; an unreadable one reads as (True, None): skipped."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.position = 0

    def read(self) -> tuple[bool, Any]:
        if self.position >= len(self.files):
            return False, None
        path = self.files[self.position]
        self.position += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            log.warning("image %s cannot be read (not an image, or truncated); skipped", path)
            return True, None
        return True, image

    def release(self) -> None:
        self.position = len(self.files)


@register_source("folder")
class FolderKind(SourceKind):
    order = 40  # before 'file', which claims every path
    live = False

    def claims(self, source: str) -> bool:
        return Path(source).is_dir()

    def open(self, source: str, timeout_s: float) -> Optional[Capture]:
        folder = Path(source.strip())
        try:
            files = image_files(folder)
        except OSError:  # gone, not a folder, or not ours to list: open_failure says which
            return None
        return FolderCapture(files) if files else None

    def open_failure(self, cam: CameraConfig) -> str:
        folder = Path(cam.source.strip())
        if not folder.is_dir():
            return f"camera '{cam.id}': image folder {cam.shown_source} not found"
        if not os.access(folder, os.R_OK | os.X_OK):
            return f"camera '{cam.id}': cannot list image folder {cam.shown_source} (may this user read it?)"
        return (f"camera '{cam.id}': image folder {cam.shown_source} holds no images "
                f"({', '.join(IMAGE_SUFFIXES)}); put the images directly in it")
