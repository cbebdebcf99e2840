"""The engine interface every backend implements, so the pipeline (and the trainer) need not care which."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from core.errors import UserError


class BackendUnavailable(UserError):
    """The requested backend cannot run on this machine/build (missing library, GPU or module)."""


@runtime_checkable
class Backend(Protocol):
    """Runs a bundle's graph: uint8 BGR frames in, ``score`` [N] (and optionally ``anomaly_map``) out."""

    name: str
    max_batch: int

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """``frames`` uint8 [N, H, W, 3]; returns at least ``score`` float32 [N]."""
        ...

    def close(self) -> None:
        """Release the session / device memory."""
        ...


def check_frames(frames: np.ndarray, input_hw: tuple[int, int] | None) -> None:
    """Refuse wrong inputs with a clear ValueError instead of a backend's cryptic one."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        shape = getattr(frames, "shape", None)
        dtype = getattr(frames, "dtype", type(frames).__name__)
        raise ValueError(f"frames must be a uint8 array [N, H, W, 3], got {dtype} {shape}")
    if input_hw is not None and tuple(frames.shape[1:3]) != tuple(input_hw):
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the model takes "
                         f"{input_hw[0]}x{input_hw[1]}; resize on the host first (core.preprocess.resize_frame)")
