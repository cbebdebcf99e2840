"""The few CUDA runtime calls the TensorRT backend needs, through NVIDIA's ``cuda-python`` bindings.

Why cuda-python and not pycuda: TensorRT shares the CUDA runtime's primary context, which every thread of
the process sees, so a backend loaded on the hot-swap thread (edge.swap) can infer on the station thread;
pycuda creates a context of its own that is current on one thread only (``pycuda.autoinit``) and must be
pushed and popped around every call from another thread. cuda-python is also what NVIDIA's TensorRT 10
Python samples use (``samples/python/common_runtime.py``: ``from cuda import cuda, cudart``), and it ships
as wheels, where pycuda compiles against the CUDA headers at install time (a compiler on every Jetson).

Imported lazily (``load()``): a CPU station never loads it. Every call returns ``(error, *values)``; ``call``
turns an error into a ``CudaError`` that names the call.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np


class CudaError(RuntimeError):
    """A CUDA runtime call failed (names the call and CUDA's own error string)."""


def load() -> Any:
    """The cuda-python runtime module: ``cuda.bindings.runtime`` (12.8+, 13) or ``cuda.cudart`` (older 12.x)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def call(rt: Any, name: str, *args: Any) -> Any:
    """Run ``rt.<name>(*args)``; raise CudaError unless it succeeded; return its value (or tuple of values)."""
    result = getattr(rt, name)(*args)
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        text = rt.cudaGetErrorString(err)
        text = text[1] if isinstance(text, tuple) else text
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise CudaError(f"{name}: {getattr(err, 'name', err)} ({text})")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class Gpu:
    """What the plan key and the build need to know about the GPU."""

    index: int
    name: str
    compute_capability: str  # "8.7"
    integrated: bool  # Jetson: the GPU shares the board's memory


def device_count(rt: Any) -> int:
    """Visible CUDA devices; 0 when there is no GPU or no driver (the error is the answer, not a failure)."""
    try:
        return int(call(rt, "cudaGetDeviceCount"))
    except Exception:  # CudaError, or the bindings failing to load the CUDA runtime/driver library at all
        return 0


def gpu(rt: Any, index: int = 0) -> Gpu:
    props = call(rt, "cudaGetDeviceProperties", index)
    raw = props.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return Gpu(index, name.strip(), f"{props.major}.{props.minor}", bool(props.integrated))


class PinnedArray:
    """Page-locked host memory seen as a numpy array: async copies need it, and it is DMA'd without a bounce."""

    def __init__(self, rt: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.rt = rt
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(call(rt, "cudaMallocHost", max(self.nbytes, 1)))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.ctypeslib.as_array(raw).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            call(self.rt, "cudaFreeHost", self.ptr)
            self.ptr = 0


class DeviceBuffer:
    def __init__(self, rt: Any, nbytes: int) -> None:
        self.rt = rt
        self.nbytes = nbytes
        self.ptr = int(call(rt, "cudaMalloc", max(nbytes, 1)))

    def free(self) -> None:
        if self.ptr:
            call(self.rt, "cudaFree", self.ptr)
            self.ptr = 0


class Stream:
    """A non-blocking CUDA stream (it does not synchronise with the legacy default stream)."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.handle = call(rt, "cudaStreamCreateWithFlags", rt.cudaStreamNonBlocking)

    def __int__(self) -> int:
        return int(self.handle)

    def copy_to_device(self, dst: DeviceBuffer, src: PinnedArray, nbytes: int) -> None:
        call(self.rt, "cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
             self.handle)

    def copy_to_host(self, dst: PinnedArray, src: DeviceBuffer, nbytes: int) -> None:
        call(self.rt, "cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
             self.handle)

    def wait(self, event: Event) -> None:
        """Later work on this stream waits for ``event`` (recorded on another stream); the host does not wait."""
        call(self.rt, "cudaStreamWaitEvent", self.handle, event.handle, 0)

    def synchronize(self) -> None:
        call(self.rt, "cudaStreamSynchronize", self.handle)

    def destroy(self) -> None:
        if self.handle is not None:
            call(self.rt, "cudaStreamDestroy", self.handle)
            self.handle = None


class Event:
    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.handle = call(rt, "cudaEventCreateWithFlags", rt.cudaEventDisableTiming)

    def record(self, stream: Stream) -> None:
        call(self.rt, "cudaEventRecord", self.handle, stream.handle)

    def synchronize(self) -> None:
        call(self.rt, "cudaEventSynchronize", self.handle)

    def destroy(self) -> None:
        if self.handle is not None:
            call(self.rt, "cudaEventDestroy", self.handle)
            self.handle = None
