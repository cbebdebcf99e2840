"""ONNX Runtime backend: CPU everywhere, CUDA / TensorRT execution providers where the build has them.

Usable standalone (the trainer scores through it): ``OrtBackend(path_to_onnx, max_batch=...)``. Registered as
``onnxruntime``, the backend ``auto`` ends with: it runs wherever the package is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.backend import check_frames
from core.bundle import Bundle
from core.errors import BundleError
from edge.backends import BackendOptions, register_backend

log = logging.getLogger("edge.backends.onnxruntime")

_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_threads() -> int:
    """Intra-op threads: the cores we may use, capped (more threads than ~8 rarely help small graphs)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class OrtBackend:
    """An onnxruntime InferenceSession over a bundle's model.onnx (or any frames→score ONNX file)."""

    name = "onnxruntime"
    selection = ""  # why this backend was chosen (edge.backends.create_backend)

    def __init__(self, model: Bundle | str | Path, max_batch: int = 8, intra_op_threads: int = 0,
                 providers: Optional[Sequence[str]] = None, warmup: bool = True, spinning: bool = False,
                 need_map: bool = True) -> None:
        import onnxruntime as ort

        if isinstance(model, Bundle):
            # Without a map to read (no snapshots), the bundle's score-only graph skips the map's operators.
            score_only = None if need_map else model.onnx_score_path
            path = score_only or model.onnx_path
            self.input_hw: Optional[tuple[int, int]] = model.input_hw
            plans = model.plans_dir
        else:
            path = Path(model)
            self.input_hw = None
            plans = path.parent / "plans"
        self.path = path
        self.max_batch = max(1, int(max_batch))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or default_threads()
        opts.inter_op_num_threads = 1
        # ONNX Runtime's workers busy-wait between operators by default. A station's CPU also decodes and resizes
        # frames: a spinning worker takes that core between batches (one 30 fps camera cost 120 % CPU), so they
        # sleep unless asked to spin (engine.intra_op_spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: warnings would drown the station's own log
        if providers is None:
            available = set(ort.get_available_providers())
            chosen: list = []
            for p in _PREFERRED:
                if p not in available:
                    continue
                if p == "TensorrtExecutionProvider":
                    cache = plans / "ort-trt"
                    chosen.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                       "trt_fp16_enable": True}))
                else:
                    chosen.append(p)
        else:
            chosen = list(providers)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{path}: onnxruntime cannot load this model ({first}); "
                              "re-export the bundle") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BundleError(f"{path}: expected one input 'frames', the graph has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "score" not in self.output_names:
            raise BundleError(f"{path}: the graph has no 'score' output (outputs: {self.output_names})")
        shape = inputs[0].shape
        if self.input_hw is None and len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[2], int):
            self.input_hw = (shape[1], shape[2])
        self.providers = self.session.get_providers()
        log.debug("onnxruntime: %s on %s", path.name,
                 ", ".join(p.replace("ExecutionProvider", "") for p in self.providers))
        if warmup and self.input_hw is not None:
            self.infer(np.zeros((1, *self.input_hw, 3), np.uint8))  # first run allocates; not on a live frame

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Scores (and maps) for any N; runs in chunks of max_batch so memory stays bounded."""
        check_frames(frames, self.input_hw)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, max(len(frames), 1), self.max_batch):
            chunk = np.ascontiguousarray(frames[start:start + self.max_batch])
            outs = self.session.run(self.output_names, {self.input_name: chunk})
            parts.append({name: outs[j] for j, name in enumerate(self.output_names)})
        result = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        result["score"] = np.asarray(result["score"], dtype=np.float32).reshape(len(frames))
        return result

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def onnxruntime_unavailable_reason() -> Optional[str]:
    """None when onnxruntime is installed (found, not imported: that waits for a session), else why not."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "cannot import onnxruntime (pip install onnxruntime)"
    return None


@register_backend("onnxruntime", unavailable=onnxruntime_unavailable_reason, preference=100,
                  title="ONNX Runtime", ready="onnxruntime is installed")
def create_onnxruntime_backend(bundle: Bundle, options: BackendOptions) -> OrtBackend:
    """The station's ONNX Runtime session over ``bundle`` (its score-only graph where no map is needed)."""
    return OrtBackend(bundle, max_batch=options.max_batch, intra_op_threads=options.intra_op_threads,
                      spinning=options.spinning, need_map=options.need_map)
