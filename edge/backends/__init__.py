"""Backend selection: ``create_backend(name, bundle, max_batch)``.

``auto`` takes TensorRT where it can run (the real ``tensorrt`` imports, NVIDIA's CUDA bindings import and
a CUDA GPU is visible), else ONNX Runtime, and logs which and why. TensorRT and the CUDA bindings are
imported lazily: a CPU station never loads them.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from core.backend import Backend, BackendUnavailable, check_frames
from core.bundle import Bundle
from core.errors import UserError

__all__ = ["Backend", "BackendUnavailable", "check_frames", "create_backend", "tensorrt_unavailable_reason",
           "resolve_backend_name", "choose_backend"]

NAMES = ("auto", "onnxruntime", "tensorrt")
log = logging.getLogger("edge.backends")


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when the TensorRT backend can run here, else why not (one phrase)."""
    from edge.backends import cudart
    from edge.backends.tensorrt import import_tensorrt

    try:
        import_tensorrt()
    except Exception as exc:  # ImportError, or a library error raised at import
        return f"cannot import tensorrt ({type(exc).__name__}: {exc})"
    try:
        rt = cudart.load()
    except Exception as exc:
        return f"cannot import NVIDIA's CUDA Python bindings, package cuda-python ({type(exc).__name__}: {exc})"
    if cudart.device_count(rt) < 1:
        return "no CUDA GPU visible (cudaGetDeviceCount found none)"
    return None


def choose_backend(name: str, tensorrt_reason: Callable[[], Optional[str]] = tensorrt_unavailable_reason
                   ) -> tuple[str, str]:
    """(backend, why) for a requested name; 'auto' asks ``tensorrt_reason`` whether TensorRT can run here."""
    if name not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "onnxruntime":
        return name, "requested"
    reason = tensorrt_reason()
    if name == "tensorrt":
        if reason is not None:
            raise BackendUnavailable(f"TensorRT backend not available on this machine/build: {reason}; "
                                     "use --backend onnxruntime (or auto)")
        return name, "requested"
    if reason is None:
        return "tensorrt", "auto: tensorrt and the CUDA bindings import and a GPU is visible"
    return "onnxruntime", f"auto: TensorRT not usable here ({reason})"


def resolve_backend_name(name: str) -> str:
    """'auto' → the best backend available here; other names are checked, not silently replaced."""
    return choose_backend(name)[0]


def create_backend(name: str, bundle: Bundle, max_batch: int = 8, intra_op_threads: int = 0,
                   spinning: bool = False, need_map: bool = True, precision: str = "fp16",
                   dla_core: Optional[int] = None,
                   tensorrt_reason: Callable[[], Optional[str]] = tensorrt_unavailable_reason) -> Backend:
    """Build the named backend ('auto', 'onnxruntime', 'tensorrt') for ``bundle``; ``backend.selection`` says why.

    edge-run puts ``selection`` in its startup line (a separate line before it would break the one-line error
    of a start that fails later, e.g. on a camera). ``need_map=False`` lets ONNX Runtime run the bundle's
    score-only graph; ``spinning`` is its worker threads' busy-wait.

    ``precision`` and ``dla_core`` are TensorRT's (the plan built or loaded); ONNX Runtime ignores them.
    Under 'auto' a TensorRT backend that cannot be made for this bundle (the parser refuses the graph, the build
    or a CUDA call fails) falls back to ONNX Runtime with a warning; '--backend tensorrt' fails instead.
    """
    chosen, why = choose_backend(name, tensorrt_reason)
    log.debug("backend %s (%s)", chosen, why)
    if chosen == "tensorrt":
        from edge.backends.cudart import CudaError
        from edge.backends.tensorrt import TensorRTBackend

        try:
            trt_backend = TensorRTBackend(bundle, max_batch=max_batch, precision=precision, dla_core=dla_core)
            trt_backend.selection = why
            return trt_backend
        except (UserError, CudaError) as exc:
            if name != "auto":
                raise
            why = f"auto: TensorRT failed for this bundle ({exc})"
            log.warning("backend auto: TensorRT failed for %s %s (%s); falling back to onnxruntime",
                        bundle.model_name, bundle.version, exc)
    from edge.backends.onnxruntime import OrtBackend

    ort_backend = OrtBackend(bundle, max_batch=max_batch, intra_op_threads=intra_op_threads, spinning=spinning,
                             need_map=need_map)
    ort_backend.selection = why
    return ort_backend
