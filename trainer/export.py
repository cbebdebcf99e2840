"""ONNX export (FP32 and FP16), validation, and the torch/ONNX parity check.

The TorchScript-based exporter (``dynamo=False``) is used: torch 2.13 still ships it, and it needs no
onnxscript. The graph's input is ``frames`` uint8 [N,H,W,3] with a dynamic N; outputs ``score`` [N] and
``anomaly_map`` [N,h,w], all float32. The FP16 file has FP16 weights and activations with the same I/O
types; the nearest-neighbour distance (a matmul followed by a min over the memory bank, where FP16
cancellation would cost precision) stays FP32.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from torch import nn

from edge.backends.onnxruntime import OrtBackend

INPUT_NAME = "frames"
OUTPUT_NAMES = ("score", "anomaly_map")
# Node-name prefixes (torch module scopes) kept in FP32 in model.fp16.onnx.
FP32_SCOPES = ("/distance/",)


class ScoreOnly(nn.Module):
    """An export module's score alone. Traced, the map's operators (upsampling, blur) are pruned from the graph:
    a station that publishes no snapshots never reads the map, so it need not compute one."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.module(frames)[0]  # type: ignore[no-any-return]


def export_onnx(module: nn.Module, path: Path, hw: tuple[int, int], opset: int = 17,
                outputs: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Trace ``module`` to ``path`` with a dynamic batch axis and check the result."""
    h, w = hw
    example = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(outputs),
            dynamic_axes={INPUT_NAME: {0: "N"}, **{name: {0: "N"} for name in outputs}},
            do_constant_folding=True)
        with torch.no_grad():
            result = module(example)
    outs = (result,) if isinstance(result, torch.Tensor) else tuple(result)  # one output or several
    _fix_output_dims(path, [tuple(t.shape) for t in outs])
    check_onnx(path, outputs)


def _fix_output_dims(path: Path, shapes: list[tuple[int, ...]]) -> None:
    """Declare the outputs' fixed sizes: the tracer names some of them symbolically (``anomaly_map`` after a
    Squeeze came out as [N, dim_1, dim_2]), and only the batch may be dynamic (TensorRT readiness)."""
    model = onnx.load(str(path))
    changed = False
    for out, shape in zip(model.graph.output, shapes, strict=True):
        for d, size in zip(list(out.type.tensor_type.shape.dim)[1:], shape[1:], strict=True):
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = int(size)
                changed = True
    if changed:
        onnx.save(model, str(path))


def check_onnx(path: Path, expected_outputs: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """onnx.checker (with shape inference) and the I/O contract of the bundle."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(expected_outputs):
        raise RuntimeError(f"{path}: I/O names {inputs} -> {outputs}, expected {INPUT_NAME} -> {expected_outputs}")
    elem = model.graph.input[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.UINT8:
        raise RuntimeError(f"{path}: input type {onnx.TensorProto.DataType.Name(elem)}, expected UINT8")
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"{path}: output {out.name} is not float32")


def convert_fp16(src: Path, dst: Path, fp32_scopes: tuple[str, ...] = FP32_SCOPES) -> dict[str, Any]:
    """Write an FP16 copy of ``src``: FP16 weights/activations, same I/O types, ``fp32_scopes`` kept FP32."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node if n.name.startswith(fp32_scopes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16" notices
        fp16 = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _fix_casts_to_fp16(fp16)
    _restore_float_outputs(model, fp16)
    round_trips = _drop_fp16_round_trips(fp16)
    onnx.save(fp16, str(dst))
    check_onnx(dst)
    return {"fp32_scopes": list(fp32_scopes), "fp32_nodes": keep,
            "fp32_ops": dict(sorted(Counter(n.op_type for n in model.graph.node if n.name in set(keep)).items())),
            "fp16_round_trips_removed": round_trips, "nodes": len(fp16.graph.node)}


def _fix_casts_to_fp16(model: onnx.ModelProto) -> None:
    """Make Cast nodes agree with the converter's FP16 value_info (it retypes the tensor, not the Cast).

    The input ``Cast(uint8 -> float)`` is one: it becomes ``Cast(uint8 -> float16)``, exact for 0..255.
    """
    fp16_tensors = {vi.name for vi in model.graph.value_info
                    if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16_tensors:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16


def _restore_float_outputs(original: onnx.ModelProto, fp16: onnx.ModelProto) -> None:
    """keep_io_types, also when an output's last node is FP32-kept: the converter then ends it with a Cast to
    FP16 and declares the output FP16 (seen with a GAN-based model's score scaling kept in FP32)."""
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    producer = {o: n for n in fp16.graph.node for o in n.output}
    for out in fp16.graph.output:
        if wanted.get(out.name) != onnx.TensorProto.FLOAT or out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            continue
        node = producer.get(out.name)
        to = next((a for a in node.attribute if a.name == "to"), None) if node is not None else None
        if node is None or node.op_type != "Cast" or to is None:
            raise RuntimeError(f"FP16 conversion left output {out.name} in FP16 and no Cast to fix it")
        to.i = onnx.TensorProto.FLOAT
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove FP32 → FP16 → FP32 cast pairs; returns how many consumers were rewired.

    The converter casts every blocked (FP32-kept) node's output to FP16 and every blocked consumer casts it
    back, so consecutive FP32-kept nodes (the memory bank's centring Sub → MatMul) exchanged their values through
    FP16 and the block lost the precision it is kept for. A consumer of such a pair now reads the FP32 value.
    """
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.value_info, *model.graph.input]}
    elem.update({t.name: t.data_type for t in model.graph.initializer})

    def cast_to(node: onnx.NodeProto) -> Optional[int]:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: dict[str, str] = {}
    drop: set[str] = set()
    for node in nodes:
        if cast_to(node) != onnx.TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        source = first.input[0]
        if elem.get(source, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue  # the round trip starts from FP16 data: nothing to recover
        rename[node.output[0]] = source
        drop.add(node.name)
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    keep = [n for n in nodes if n.name not in drop]
    used = {x for n in keep for x in n.input} | graph_outputs
    keep = [n for n in keep if cast_to(n) != onnx.TensorProto.FLOAT16 or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(rename)


def onnx_scorer(path: Path, batch: int = 16) -> OrtBackend:
    """The station's own ONNX Runtime backend on CPU: the trainer measures exactly what the edge will run."""
    return OrtBackend(path, max_batch=batch, providers=["CPUExecutionProvider"], warmup=False)


def run_onnx(scorer: OrtBackend, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of uint8 BGR ``frames`` (any number; the backend runs them in bounded batches)."""
    out = scorer.infer(frames)
    return out["score"], out["anomaly_map"]


def torch_scores(module: nn.Module, frames: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The export module's own outputs (the reference for parity)."""
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            s, m = module(torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])))
            scores.append(s.numpy())
            maps.append(m.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def max_rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: relative to the scale of the reference, so near-zero entries do not blow up."""
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(a.astype(np.float64) - ref.astype(np.float64)).max() / scale)


def parity(module: nn.Module, fp32_path: Path, fp16_path: Optional[Path], frames: np.ndarray,
           batch: int = 16, score_path: Optional[Path] = None) -> dict[str, Any]:
    """Score the same frames with torch, ONNX FP32, ONNX FP16 and the score-only graph; max relative differences
    vs torch (maps where the graph has them)."""
    ref_s, ref_m = torch_scores(module, frames, batch)
    out: dict[str, Any] = {"frames": len(frames)}
    for label, path in (("onnx_fp32", fp32_path), ("onnx_fp16", fp16_path), ("onnx_score_only", score_path)):
        if path is None:
            continue
        result = onnx_scorer(path, batch).infer(frames)
        s = result["score"]
        out[label] = {"score_max_rel_diff": max_rel_diff(s, ref_s),
                      "rank_agreement": float(np.mean(np.argsort(s) == np.argsort(ref_s)))}
        if "anomaly_map" in result:
            out[label]["map_max_rel_diff"] = max_rel_diff(result["anomaly_map"], ref_m)
    return out
