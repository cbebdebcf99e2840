"""TensorRT backend: a plan built on this device from the bundle's ONNX, cached in ``plans/``, run on one GPU.

On start the plan for this device (edge.plans: key = TensorRT version + GPU + precision + max batch + sha256
of the ONNX file) is loaded when its key record matches, else built from the ONNX file and cached, with the
time it took in the log. FP16 comes from the strongly typed ``model.fp16.onnx`` on TensorRT 10 and 11 (11 has
no FP16 builder flag), from the FP32 graph + the FP16 flag on 8.6 (JetPack 5), with the layers the manifest
lists as FP32-kept pinned to FP32 there.

Written against the TensorRT 10 Python API (``tensorrt-stubs``) and type-checked; it has not run on a real
TensorRT here (no machine of this project has one; see docs/tensorrt.md). ``tensorrt`` and the CUDA
bindings are imported when a backend is created, never at import time of this module's callers.

Inference: per slot (two slots) a pinned host input, device input/outputs for the profile's maximum batch and
pinned host outputs; uploads go on an upload stream and the engine runs on one execution stream, ordered by
events, so while the GPU computes chunk k the host stages chunk k+1 and its upload proceeds (one stream
alone would queue the upload behind the compute). ``set_input_shape`` + ``set_tensor_address`` +
``execute_async_v3`` per chunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from core.backend import BackendUnavailable, check_frames
from core.bundle import Bundle
from core.errors import BundleError, UserError
from core.files import sha256_file
from edge import plans
from edge.backends import BackendOptions, cudart, register_backend

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger("edge.backends.tensorrt")

INPUT_NAME = "frames"


def import_tensorrt() -> ModuleType:
    """The real TensorRT module; ImportError when only ``tensorrt-stubs`` (an empty namespace package) is there."""
    import tensorrt

    if not hasattr(tensorrt, "Builder"):
        raise ImportError("only type stubs are installed (tensorrt-stubs), not TensorRT itself")
    return tensorrt


def tensorrt_major(version: str) -> int:
    """'10.3.0' → 10; an unparsable version is treated as the newest API (strongly typed only)."""
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return 99


@dataclass(frozen=True)
class BuildOptions:
    """``edge-train build-engine`` flags, and what a station builds with on first start."""

    precision: str = "fp16"
    max_batch: int = 8
    opt_batch: Optional[int] = None  # the batch TensorRT tunes its kernels for; None = max_batch
    workspace_mb: int = 0  # 0 = TensorRT's default (all free device memory)
    dla_core: Optional[int] = None  # Jetson Orin: build for this DLA core, GPU fallback for what it cannot run

    def validate(self) -> None:
        if self.precision not in plans.PRECISIONS:
            raise UserError(f"precision {self.precision!r}: choose one of {', '.join(plans.PRECISIONS)}")
        if self.max_batch < 1:
            raise UserError(f"max batch {self.max_batch}: must be at least 1")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise UserError(f"opt batch {self.opt_batch}: must be between 1 and the max batch {self.max_batch}")
        if self.workspace_mb < 0:
            raise UserError(f"workspace {self.workspace_mb} MB: must not be negative (0 = TensorRT's default)")
        if self.dla_core is not None and (self.dla_core < 0 or self.precision != "fp16"):
            raise UserError(f"DLA core {self.dla_core}: needs a core index >= 0 and --precision fp16 "
                            "(the DLA runs FP16 or INT8, not FP32)")


def plan_key(trt_version: str, gpu: cudart.Gpu, bundle: Bundle, options: BuildOptions) -> tuple[plans.PlanKey,
                                                                                                plans.BuildSource]:
    """This device's key for ``bundle`` and the ONNX file (and typing mode) it is built from."""
    source = plans.build_source(tensorrt_major(trt_version), options.precision, bundle.onnx_fp16_path is not None,
                                dla=options.dla_core is not None)
    onnx_path = bundle.path / source.onnx
    key = plans.PlanKey(trt_version, gpu.name, gpu.compute_capability, options.precision, options.max_batch,
                        sha256_file(onnx_path), options.dla_core)
    return key, source


def make_logger() -> trt.ILogger:
    """A TensorRT logger that writes to this module's log (warnings and errors; the rest at DEBUG)."""
    import tensorrt as trt

    levels = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
              trt.ILogger.WARNING: logging.WARNING}

    class StationLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            log.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", msg)

    return StationLogger()


def parser_errors(parser: trt.OnnxParser) -> list[str]:
    """Each ONNX parser error as 'node N (name, Op): description'."""
    lines = []
    for i in range(parser.num_errors):
        err: trt.ParserError = parser.get_error(i)
        lines.append(f"node {err.node()} ({err.node_name() or '?'}, {err.node_operator() or '?'}): {err.desc()}")
    return lines


def fp32_kept_prefixes(bundle: Bundle) -> tuple[str, ...]:
    """Node-name prefixes the manifest lists as kept FP32 in the FP16 graph (pinned on 8.6's FP16-flag path)."""
    fp16 = bundle.manifest.get("fp16")
    scopes = fp16.get("fp32_scopes", []) if isinstance(fp16, dict) else []
    return tuple(str(s) for s in scopes if isinstance(s, str) and s)


def _log_line(message: str) -> None:
    (log.warning if message.startswith("warning: ") else log.info)(message)


def build_plan(bundle: Bundle, gpu: cudart.Gpu, options: BuildOptions,
               say: Callable[[str], None] = _log_line) -> tuple[Path, float]:
    """Build this device's plan for ``bundle`` into ``plans/`` (with the timing cache); returns (path, seconds)."""
    import tensorrt as trt

    options.validate()
    key, source = plan_key(trt.__version__, gpu, bundle, options)
    onnx_path = bundle.path / source.onnx
    if source.note:
        say(f"warning: {source.note}")
    t0 = time.monotonic()
    logger = make_logger()
    builder: trt.Builder = trt.Builder(logger)
    if options.precision == "fp16" and not builder.platform_has_fast_fp16:
        say(f"warning: {gpu.name} (sm {gpu.compute_capability}) has no fast FP16: an FP16 engine may be no faster "
            "than FP32 here; consider --precision fp32")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if source.strongly_typed else 0
    if tensorrt_major(trt.__version__) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # 8.x: explicit batch is opt-in
    network: trt.INetworkDefinition = builder.create_network(flags)
    parser: trt.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser) or ["no error detail from the parser"]
        raise BundleError(f"{onnx_path}: TensorRT {trt.__version__}'s ONNX parser refused {len(errors)} node(s): "
                          + "; ".join(errors) + "; run 'edge-train check-engine' on the bundle and re-export it")
    config: trt.IBuilderConfig = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if source.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
        _pin_fp32_layers(network, config, fp32_kept_prefixes(bundle))
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise UserError(f"--dla-core {options.dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    h, w = bundle.input_hw
    profile: trt.IOptimizationProfile = builder.create_optimization_profile()
    opt = options.opt_batch or options.max_batch
    profile.set_shape(INPUT_NAME, trt.Dims([1, h, w, 3]), trt.Dims([opt, h, w, 3]),
                      trt.Dims([options.max_batch, h, w, 3]))
    config.add_optimization_profile(profile)
    cache_path = plans.timing_cache_path(bundle.plans_dir, key)
    cache: trt.ITimingCache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build an engine (its errors are in the log above); "
                        "try --workspace-mb larger or --precision fp32")
    try:
        path = plans.write_plan(bundle.plans_dir, key, bytes(memoryview(serialized)))
        plans.write_timing_cache(bundle.plans_dir, key, bytes(memoryview(config.get_timing_cache().serialize())))
    except OSError as exc:
        raise UserError(f"{bundle.plans_dir}: cannot write the plan ({exc.strerror}); make the folder writable "
                        "for the station's user or build as its owner with 'edge-train build-engine'") from None
    seconds = time.monotonic() - t0
    say(f"built {path.name} from {source.onnx} in {seconds:.1f}s (TensorRT {trt.__version__}, {gpu.name})")
    return path, seconds


def _pin_fp32_layers(network: trt.INetworkDefinition, config: trt.IBuilderConfig, prefixes: tuple[str, ...]) -> None:
    """FP16-flag builds (8.x): keep the layers of the manifest's FP32 scopes in FP32, as the FP16 graph does."""
    import tensorrt as trt

    if not prefixes:
        return
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer: trt.ILayer = network.get_layer(i)
        if layer.name.startswith(prefixes):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)


@dataclass
class _Slot:
    """One of the two in-flight batches: its buffers and the events that order them."""

    host_in: cudart.PinnedArray
    dev_in: cudart.DeviceBuffer
    dev_out: dict[str, cudart.DeviceBuffer]
    host_out: dict[str, cudart.PinnedArray]
    uploaded: cudart.Event
    done: cudart.Event
    n: int = 0


class TensorRTBackend:
    """A TensorRT engine for this device over a bundle (built on first start, cached in ``plans/``)."""

    name = "tensorrt"
    selection = ""  # why this backend was chosen (edge.backends.create_backend)

    def __init__(self, bundle: Bundle, max_batch: int = 8, precision: str = "fp16",
                 dla_core: Optional[int] = None, rebuild: bool = False) -> None:
        try:
            import_tensorrt()
            self.rt = cudart.load()
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT backend: {exc}; use --backend onnxruntime (or auto)") from None
        if cudart.device_count(self.rt) < 1:
            raise BackendUnavailable("TensorRT backend: no CUDA GPU visible; use --backend onnxruntime (or auto)")
        import tensorrt as trt

        self.input_hw = bundle.input_hw
        self.gpu = cudart.gpu(self.rt, 0)
        cudart.call(self.rt, "cudaSetDevice", self.gpu.index)
        self.options = BuildOptions(precision, max(1, int(max_batch)), dla_core=dla_core)
        self.options.validate()
        key, _source = plan_key(trt.__version__, self.gpu, bundle, self.options)
        decision = plans.decide(bundle.plans_dir, key)
        self._logger = make_logger()
        self.runtime: trt.Runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self.runtime.DLA_core = dla_core
        engine: Optional[trt.ICudaEngine] = None
        if decision.action == "load" and not rebuild:
            engine = self.runtime.deserialize_cuda_engine(decision.path.read_bytes())
            if engine is None:
                log.warning("%s could not be deserialised by TensorRT %s: rebuilding", decision.path.name,
                            trt.__version__)
            else:
                log.info("TensorRT: %s", decision.reason)
        if engine is None:
            log.info("TensorRT: building a plan (%s); the first start on a device takes minutes",
                     "forced" if rebuild else decision.reason)
            path, seconds = build_plan(bundle, self.gpu, self.options)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"{path}: TensorRT cannot load the plan it has just built; remove it and retry")
        self.engine = engine
        self.context: trt.IExecutionContext = engine.create_execution_context()
        self.plan_path = decision.path
        self.capacity = self.options.max_batch  # buffers and profile; max_batch may be lowered later (auto_batch)
        self.max_batch = self.capacity
        self._bind()

    def _bind(self) -> None:
        import tensorrt as trt

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or self.engine.get_tensor_dtype(INPUT_NAME) != trt.uint8:
            raise BundleError(f"plan {self.plan_path.name}: expected one uint8 input '{INPUT_NAME}', got {inputs}")
        self.output_names = [n for n in names if n not in inputs]
        if "score" not in self.output_names:
            raise BundleError(f"plan {self.plan_path.name}: no 'score' output ({self.output_names})")
        h, w = self.input_hw
        self.upload = cudart.Stream(self.rt)
        self.execute = cudart.Stream(self.rt)
        out_specs = {}
        self.context.set_input_shape(INPUT_NAME, (self.capacity, h, w, 3))  # outputs sized for the largest batch
        for n in self.output_names:
            dims = self.context.get_tensor_shape(n)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            out_specs[n] = (shape, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))))
        self.slots = []
        for _ in range(2):
            host_in = cudart.PinnedArray(self.rt, (self.capacity, h, w, 3), np.dtype(np.uint8))
            self.slots.append(_Slot(
                host_in=host_in, dev_in=cudart.DeviceBuffer(self.rt, host_in.nbytes),
                dev_out={n: cudart.DeviceBuffer(self.rt, int(np.prod(s)) * d.itemsize)
                         for n, (s, d) in out_specs.items()},
                host_out={n: cudart.PinnedArray(self.rt, s, d) for n, (s, d) in out_specs.items()},
                uploaded=cudart.Event(self.rt), done=cudart.Event(self.rt)))

    def _submit(self, slot: _Slot, chunk: np.ndarray) -> None:
        """Stage ``chunk`` into the slot and queue upload → execute → download; returns without waiting."""
        n = len(chunk)
        slot.done.synchronize()  # the slot's previous batch has been read out of its buffers
        slot.host_in.array[:n] = chunk
        nbytes = chunk.nbytes
        self.upload.copy_to_device(slot.dev_in, slot.host_in, nbytes)
        slot.uploaded.record(self.upload)
        self.execute.wait(slot.uploaded)
        h, w = self.input_hw
        if not self.context.set_input_shape(INPUT_NAME, (n, h, w, 3)):
            raise RuntimeError(f"TensorRT refused input shape {(n, h, w, 3)} (profile 1..{self.capacity})")
        self.context.set_tensor_address(INPUT_NAME, slot.dev_in.ptr)
        for name, buf in slot.dev_out.items():
            self.context.set_tensor_address(name, buf.ptr)
        if not self.context.execute_async_v3(int(self.execute)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the log)")
        for name, buf in slot.dev_out.items():
            per_frame = buf.nbytes // self.capacity
            self.execute.copy_to_host(slot.host_out[name], buf, per_frame * n)
        slot.done.record(self.execute)
        slot.n = n

    def _collect(self, slot: _Slot) -> dict[str, np.ndarray]:
        slot.done.synchronize()
        return {name: arr.array[:slot.n].copy() for name, arr in slot.host_out.items()}

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Scores (and maps) for any N, in chunks of max_batch; chunk k+1 is staged while chunk k runs."""
        check_frames(frames, self.input_hw)
        if len(frames) == 0:  # the profile starts at batch 1
            return {name: np.zeros((0, *arr.array.shape[1:]), arr.array.dtype)
                    for name, arr in self.slots[0].host_out.items()}
        parts: list[dict[str, np.ndarray]] = []
        pending: Optional[_Slot] = None
        step = min(self.max_batch, self.capacity)
        for i, start in enumerate(range(0, len(frames), step)):
            slot = self.slots[i % 2]
            self._submit(slot, np.ascontiguousarray(frames[start:start + step]))
            if pending is not None:
                parts.append(self._collect(pending))
            pending = slot
        assert pending is not None
        parts.append(self._collect(pending))
        result = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        result["score"] = np.asarray(result["score"], dtype=np.float32).reshape(len(frames))
        return result

    def close(self) -> None:
        for slot in getattr(self, "slots", []):
            for buf in (slot.host_in, slot.dev_in, *slot.dev_out.values(), *slot.host_out.values()):
                buf.free()
            slot.uploaded.destroy()
            slot.done.destroy()
        self.slots = []
        for stream in (getattr(self, "upload", None), getattr(self, "execute", None)):
            if stream is not None:
                stream.destroy()
        self.context = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when the TensorRT backend can run here (the real ``tensorrt`` and NVIDIA's CUDA bindings import, and
    a CUDA GPU is visible), else why not (one phrase). Imports them only when asked."""
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


@register_backend("tensorrt", unavailable=tensorrt_unavailable_reason, preference=10, title="TensorRT",
                  ready="tensorrt and the CUDA bindings import and a GPU is visible", fallible=(cudart.CudaError,))
def create_tensorrt_backend(bundle: Bundle, options: BackendOptions) -> TensorRTBackend:
    """A TensorRT engine for this device over ``bundle``: its plan loaded, or built and cached on first start."""
    return TensorRTBackend(bundle, max_batch=options.max_batch, precision=options.precision,
                           dla_core=options.dla_core)
