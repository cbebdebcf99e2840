"""Inference backends, registered by name: ``create_backend(name, bundle, max_batch)``.

Each backend module in this package registers a factory with ``@register_backend("<name>", ...)``, saying
how to tell whether it can run here (``unavailable``: None, or why not in one phrase) and where ``auto``
ranks it (``preference``: lower is tried first; None: only when asked for by name). Adding a backend =
one module here and its test; the package is imported on first lookup, so there is no list to edit.

``auto`` takes the first backend, by preference, that can run here (TensorRT where the real ``tensorrt``
and NVIDIA's CUDA bindings import and a GPU is visible, else ONNX Runtime) and says which and why; one that
then fails for the bundle falls back to the next with a warning. TensorRT and the CUDA bindings are imported
lazily: a CPU station never loads them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, TypeVar

from core.backend import Backend, BackendUnavailable, check_frames
from core.bundle import Bundle
from core.errors import UserError
from core.plugins import import_all_modules

__all__ = ["Backend", "BackendEntry", "BackendOptions", "BackendUnavailable", "backend_names", "check_frames",
           "choose_backend", "create_backend", "get_backend", "register_backend", "resolve_backend_name",
           "tensorrt_unavailable_reason"]

AUTO = "auto"
log = logging.getLogger("edge.backends")


@dataclass(frozen=True)
class BackendOptions:
    """What a station asks of whichever backend runs its bundle; each backend takes the fields it knows."""

    max_batch: int = 8
    intra_op_threads: int = 0  # ONNX Runtime's intra-op threads (0 = the cores we may use, capped)
    spinning: bool = False  # ONNX Runtime's workers busy-wait between operators
    need_map: bool = True  # False: a score-only graph may run (no snapshots to draw the map on)
    precision: str = "fp16"  # TensorRT: the plan built or loaded
    dla_core: Optional[int] = None  # TensorRT on Jetson Orin: the DLA core to build for


BackendFactory = Callable[[Bundle, BackendOptions], Backend]
Availability = Callable[[], Optional[str]]
F = TypeVar("F", bound=BackendFactory)


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend: how to make it, whether it can run here, and its rank under ``auto``."""

    name: str
    factory: BackendFactory
    unavailable: Availability  # None when it can run here, else why not (one phrase)
    preference: Optional[int]  # auto tries the lowest first; None: never chosen by auto
    title: str  # as messages name it ("TensorRT")
    ready: str  # what ``unavailable`` found when it can run: auto's reason for choosing it
    fallible: tuple[type[Exception], ...]  # besides UserError: failures on which auto goes on to the next


_BACKENDS: dict[str, BackendEntry] = {}


def _always_available() -> Optional[str]:
    return None


def register_backend(name: str, *, unavailable: Availability = _always_available, preference: Optional[int] = None,
                     title: str = "", ready: str = "", fallible: tuple[type[Exception], ...] = ()
                     ) -> Callable[[F], F]:
    """Decorator of a factory ``(bundle, BackendOptions) -> Backend``: make it known as ``name``."""
    if name == AUTO:
        raise ValueError(f"{AUTO!r} is not a backend's name: it means the best one that can run here")

    def deco(factory: F) -> F:
        known = _BACKENDS.get(name)
        if known is not None and known.factory.__qualname__ != factory.__qualname__:
            raise ValueError(f"backend {name!r} is registered twice")
        _BACKENDS[name] = BackendEntry(name, factory, unavailable, preference, title or name,
                                       ready or f"{title or name} can run here", fallible)
        return factory

    return deco


def _discover() -> None:
    import_all_modules(__name__)


def backend_names() -> tuple[str, ...]:
    """What ``engine.backend`` and ``--backend`` accept: 'auto' and every registered backend."""
    _discover()
    return (AUTO, *sorted(_BACKENDS))


def get_backend(name: str) -> BackendEntry:
    """The backend registered as ``name``; BackendUnavailable (one line) naming the choices otherwise."""
    _discover()
    if name not in _BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return _BACKENDS[name]


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when the TensorRT backend can run here, else why not (one phrase)."""
    return get_backend("tensorrt").unavailable()


def _checks(tensorrt_reason: Optional[Availability]) -> Mapping[str, Availability]:
    """Availability checks by name: the registered ones, TensorRT's replaced where the caller gives one."""
    checks = {name: entry.unavailable for name, entry in _BACKENDS.items()}
    if tensorrt_reason is not None:
        checks["tensorrt"] = tensorrt_reason
    return checks


def _requested(name: str, checks: Mapping[str, Availability]) -> BackendEntry:
    """The backend asked for by name, refused in one line when it cannot run here."""
    entry = get_backend(name)
    reason = checks[name]()
    if reason is not None:
        others = [e.name for e in _auto_order() if e.name != name]
        instead = f"use --backend {others[-1]} (or auto)" if others else "install what it needs"
        raise BackendUnavailable(f"{entry.title} backend not available on this machine/build: {reason}; {instead}")
    return entry


def _auto_order() -> list[BackendEntry]:
    _discover()
    ranked = [entry for entry in _BACKENDS.values() if entry.preference is not None]
    return sorted(ranked, key=lambda entry: (entry.preference, entry.name))


def _auto_candidates(checks: Mapping[str, Availability], notes: list[str]) -> Iterator[BackendEntry]:
    """The backends auto may use, best first; ``notes`` collects why each one passed over was (the caller adds
    its own, such as a backend that failed for the bundle)."""
    for entry in _auto_order():
        reason = checks[entry.name]()
        if reason is not None:
            notes.append(f"{entry.title} not usable here ({reason})")
            continue
        yield entry


def _auto_reason(entry: BackendEntry, notes: list[str]) -> str:
    return f"{AUTO}: {'; '.join(notes) if notes else entry.ready}"


def choose_backend(name: str, tensorrt_reason: Optional[Availability] = None) -> tuple[str, str]:
    """(backend, why) for a requested name; ``tensorrt_reason`` replaces the TensorRT check (a test that wants
    a GPU station's choice)."""
    _discover()
    checks = _checks(tensorrt_reason)
    if name != AUTO:
        return _requested(name, checks).name, "requested"
    notes: list[str] = []
    for entry in _auto_candidates(checks, notes):
        return entry.name, _auto_reason(entry, notes)
    raise BackendUnavailable(f"backend auto: no backend can run here ({'; '.join(notes)})")


def resolve_backend_name(name: str) -> str:
    """'auto' → the best backend available here; other names are checked, not silently replaced."""
    return choose_backend(name)[0]


def create_backend(name: str, bundle: Bundle, max_batch: int = 8, intra_op_threads: int = 0,
                   spinning: bool = False, need_map: bool = True, precision: str = "fp16",
                   dla_core: Optional[int] = None, tensorrt_reason: Optional[Availability] = None) -> Backend:
    """Build the named backend ('auto' or a registered name) for ``bundle``; ``backend.selection`` says why.

    edge-run puts ``selection`` in its startup line (a separate line before it would break the one-line error
    of a start that fails later, e.g. on a camera). ``need_map=False`` lets ONNX Runtime run the bundle's
    score-only graph; ``spinning`` is its worker threads' busy-wait.

    ``precision`` and ``dla_core`` are TensorRT's (the plan built or loaded); ONNX Runtime ignores them.
    Under 'auto' a backend that cannot be made for this bundle (TensorRT: the parser refuses the graph, the build
    or a CUDA call fails) falls back to the next with a warning; asked for by name, it fails instead.
    """
    options = BackendOptions(max_batch=max_batch, intra_op_threads=intra_op_threads, spinning=spinning,
                             need_map=need_map, precision=precision, dla_core=dla_core)
    _discover()
    checks = _checks(tensorrt_reason)
    if name != AUTO:
        return _made(_requested(name, checks), bundle, options, "requested")
    notes: list[str] = []
    failed: Optional[tuple[BackendEntry, Exception]] = None
    for entry in _auto_candidates(checks, notes):
        if failed is not None:
            log.warning("backend auto: %s failed for %s %s (%s); falling back to %s", failed[0].title,
                        bundle.model_name, bundle.version, failed[1], entry.name)
        fallible: tuple[type[Exception], ...] = (UserError, *entry.fallible)
        try:
            return _made(entry, bundle, options, _auto_reason(entry, notes))
        except fallible as exc:
            failed = (entry, exc)
            notes.append(f"{entry.title} failed for this bundle ({exc})")
    if failed is not None:
        raise failed[1]
    raise BackendUnavailable(f"backend auto: no backend can run here ({'; '.join(notes)})")


def _made(entry: BackendEntry, bundle: Bundle, options: BackendOptions, why: str) -> Backend:
    log.debug("backend %s (%s)", entry.name, why)
    backend = entry.factory(bundle, options)
    setattr(backend, "selection", why)  # noqa: B010 - not every Backend declares it; edge-run's startup line reads it
    return backend
