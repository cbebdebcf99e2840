"""Kinds of capture source, registered by name: a camera, a video file, a stream URL, a GStreamer pipeline, a
folder of images, and whatever a new module in ``edge/sources/kinds/`` adds.

A kind says which source strings it claims and how to open one; everything else (the capture thread, the
bounded open and read, reopening with back-off, pacing, the queue, MJPEG's reduced decode) is
``edge.sources.capture.CameraSource``'s, the same for every kind. Adding a kind = one module in
``edge/sources/kinds/`` with a class decorated ``@register_source("<name>")`` (and its test); the package is
imported on first lookup, so there is no list to edit. Which kind a string is: the kinds are asked in their
``order`` (lowest first) and the first that claims it wins; a camera's ``kind`` (``cameras[].kind``, where
the station config has that key) names one outright.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Protocol, TypeVar

from core.errors import UserError
from core.plugins import import_all_modules
from edge.config import CameraConfig, redact_secrets


class Capture(Protocol):
    """An opened source, read by one thread. ``cv2.VideoCapture`` is one."""

    def read(self) -> tuple[bool, Any]:
        """(True, BGR image); (True, None): this frame was unreadable and is skipped (counted); (False, _): the
        end of a recording, or a failed read of a live source."""
        ...

    def release(self) -> None:
        ...


class SourceKind(ABC):
    """One kind of capture source. Subclass it in ``edge/sources/kinds/<name>.py`` and register it."""

    name: str = ""  # set by register_source
    order: int = 50  # asked before the kinds with a higher order: specific patterns low, catch-alls high
    live: bool = True  # a live source drops frames and stamps the wall clock; a recording blocks and stamps file time
    hint: str = "is the source right?"  # what to check when it does not open

    @abstractmethod
    def claims(self, source: str) -> bool:
        """Whether ``source`` (a config string, stripped) is of this kind."""

    @abstractmethod
    def open(self, source: str, timeout_s: float) -> Optional[Capture]:
        """Open ``source``, taking at most about ``timeout_s`` where the library can bound it (the caller abandons
        an open that blocks longer); None when it did not open."""

    def frame_rate(self, capture: Capture) -> Optional[float]:
        """A recording's own frames per second (its frames are stamped at it), or None where it has none."""
        return None

    def frame_count(self, capture: Capture) -> Optional[int]:
        """How many frames a recording's header says it holds, or None where it does not say. A failed read
        before that many is a damaged frame, not the end: the reader skips it and reads on."""
        return None

    def compressed(self, capture: Capture) -> bool:
        """Switch ``capture`` to hand out MJPEG packets (decoded at reduced scale by the reader); False: it keeps
        handing out images."""
        return False

    def open_failure(self, cam: CameraConfig) -> str:
        """The one line a station says when ``cam`` does not open: what, where, what to check."""
        return f"camera '{cam.id}': cannot open {cam.shown_source} ({self.hint})"


_KINDS: dict[str, SourceKind] = {}
K = TypeVar("K", bound=type[SourceKind])


def register_source(name: str) -> Callable[[K], K]:
    """Class decorator: make a SourceKind known by ``name`` (what ``cameras[].kind`` and logs call it)."""

    def deco(cls: K) -> K:
        known = _KINDS.get(name)
        if known is not None and type(known).__qualname__ != cls.__qualname__:
            raise ValueError(f"source kind {name!r} is registered twice ({type(known).__qualname__}, "
                             f"{cls.__qualname__})")
        cls.name = name
        _KINDS[name] = cls()
        return cls

    return deco


def _discover() -> None:
    import_all_modules("edge.sources.kinds")


def source_kinds() -> list[str]:
    """The registered kinds' names, in the order they are asked to claim a source."""
    _discover()
    return [kind.name for kind in sorted(_KINDS.values(), key=lambda k: (k.order, k.name))]


def get_source_kind(name: str) -> SourceKind:
    """The kind registered as ``name``; a one-line UserError naming the known kinds otherwise."""
    _discover()
    if name not in _KINDS:
        raise UserError(f"unknown source kind {name!r}; choose one of {', '.join(source_kinds())}")
    return _KINDS[name]


def find_kind(source: str, kind: Optional[str] = None) -> SourceKind:
    """The kind ``kind`` names, or else the first kind (in order) that claims ``source``."""
    if kind:
        return get_source_kind(kind)
    for name in source_kinds():
        if _KINDS[name].claims(source.strip()):
            return _KINDS[name]
    raise UserError(f"no source kind claims {redact_secrets(source)!r}; kinds: {', '.join(source_kinds())}")


def camera_kind(cam: CameraConfig) -> SourceKind:
    """The kind of a configured camera: its ``kind`` key where the config has one, else what claims its source."""
    return find_kind(cam.source, getattr(cam, "kind", None))


def source_kind(source: str) -> str:
    """The name of the kind that claims ``source``: 'camera', 'gstreamer', 'url', 'folder', 'file', …"""
    return find_kind(source).name


def is_live(cam: CameraConfig) -> bool:
    """A camera or stream is live and a recording (video file, image folder) is not, unless ``live:`` says."""
    if cam.live is not None:
        return cam.live
    return camera_kind(cam).live


def open_capture(source: str, timeout_s: float = 10.0) -> Optional[Capture]:
    """Open ``source`` as its kind does; None when it did not open."""
    return find_kind(source).open(source, timeout_s)


def describe_open_failure(cam: CameraConfig) -> str:
    """The one line a station says when ``cam`` does not open."""
    return camera_kind(cam).open_failure(cam)
