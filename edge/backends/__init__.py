"""Backend selection: ``create_backend(name, bundle, max_batch)``.

``auto`` takes TensorRT where tensorrt + pycuda import and this build has a TensorRT backend module,
else ONNX Runtime. TensorRT and pycuda are imported lazily: a CPU station never loads them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from edge.backends.base import Backend, BackendUnavailable, check_frames
from edge.bundle import Bundle

__all__ = ["Backend", "BackendUnavailable", "check_frames", "create_backend", "tensorrt_unavailable_reason",
           "resolve_backend_name"]

NAMES = ("auto", "onnxruntime", "tensorrt")


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when the TensorRT backend can run here, else why not (one phrase)."""
    if importlib.util.find_spec("edge.backends.tensorrt") is None:
        return "this build has no TensorRT backend module yet"
    for mod in ("tensorrt", "pycuda"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # ImportError, or a CUDA driver error raised at import
            return f"cannot import {mod} ({type(exc).__name__}: {exc})"
    return None


def resolve_backend_name(name: str) -> str:
    """'auto' → the best backend available here; other names are checked, not silently replaced."""
    if name not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        return "tensorrt" if tensorrt_unavailable_reason() is None else "onnxruntime"
    if name == "tensorrt":
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"TensorRT backend not available on this machine/build: {reason}; "
                                     "use --backend onnxruntime (or auto)")
    return name


def create_backend(name: str, bundle: Bundle, max_batch: int = 8, intra_op_threads: int = 0,
                   spinning: bool = False, need_map: bool = True) -> Backend:
    """Build the named backend ('auto', 'onnxruntime', 'tensorrt') for ``bundle``; ``need_map=False`` lets it run
    the bundle's score-only graph."""
    chosen = resolve_backend_name(name)
    if chosen == "tensorrt":
        module = importlib.import_module("edge.backends.tensorrt")
        return module.TensorRTBackend(bundle, max_batch=max_batch)  # type: ignore[no-any-return]
    from edge.backends.onnxruntime import OrtBackend

    return OrtBackend(bundle, max_batch=max_batch, intra_op_threads=intra_op_threads, spinning=spinning,
                      need_map=need_map)
