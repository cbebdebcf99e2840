"""Will TensorRT build this ONNX graph, and score like it? Checked from the ONNX file alone (no TensorRT needed).

Graph checks (``check_graph``), at the bundle's maximum batch:
- every operator is in TensorRT's ONNX parser support matrix (trainer.tensorrt_ops, with its source and
  version), within the restrictions an exported scorer can meet (Resize modes, Reduce axes, TopK, pooling
  dilations, UINT8 only at the graph's input/output), and the opset is in the parser's range;
- no dynamic dimension but the batch: the input and outputs have a fixed size except dimension 0, and once
  the batch is fixed ONNX shape inference gives every intermediate a fixed shape;
- no intermediate tensor reaches 2^31 elements (TensorRT's limit) at the maximum batch;
- no INT64 tensor computed from the frames at run time (TensorRT 8.6 has no INT64 and casts to INT32; 10
  runs INT64 only in some layers). Constants and shape arithmetic (Shape → Gather/Concat → Reshape sizes)
  are evaluated by TensorRT when it builds or resolves shapes, so they are allowed;
- in an FP16 graph, every node of the model's FP32 scopes (the manifest's ``fp16.fp32_scopes``) still
  computes in FP32.
Numerics (``fp16_parity``): the FP16 graph's scores against the FP32 graph's, through ONNX Runtime, within
``SCORE_TOLERANCE`` of the score scale, and on labelled frames at most ``AUROC_TOLERANCE`` of the good/defect
pairs in the other order (what would move the AUROC by that much). Pairs whose FP32 scores lie within
``TIE_TOLERANCE`` of the scale are ties: a model at chance can give scores a float32 ulp apart, and which of
two such scores is higher says nothing about FP16.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, shape_inference

from trainer import tensorrt_ops as ops

ELEMENT_LIMIT = 2**31  # TensorRT: a tensor must hold fewer than 2^31 elements
SCORE_TOLERANCE = 1e-2  # FP16 vs FP32: max |s16 - s32| / max |s32|
AUROC_TOLERANCE = 0.005  # FP16 vs FP32: good/defect pairs swapped / all pairs (each moves the AUROC by 1/pairs)
TIE_TOLERANCE = 1e-6  # FP32 scores within this fraction of the scale are ties (a float32 ulp is 1.2e-7 of it)


@dataclass
class GraphReadiness:
    """What ``check_graph`` found in one ONNX file."""

    path: Path
    max_batch: int
    nodes: int
    op_counts: dict[str, int]
    opset: int
    largest_name: str = ""
    largest_shape: tuple[int, ...] = ()
    largest_elements: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        status = "ready" if self.ready else f"NOT ready ({len(self.problems)} problem(s))"
        return (f"{self.path.name}: {status}; {self.nodes} nodes, {len(self.op_counts)} op types, opset {self.opset}; "
                f"largest intermediate at batch {self.max_batch}: {self.largest_elements:,} elements "
                f"{list(self.largest_shape)} ({self.largest_name}), limit {ELEMENT_LIMIT:,}")


def _dims(vi: onnx.ValueInfoProto) -> Optional[list[Optional[int]]]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _fmt_dims(vi: onnx.ValueInfoProto) -> str:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return "unknown rank"
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in t.shape.dim) + "]"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _operator_problems(model: onnx.ModelProto, constants: set[str], io: set[str],
                       types: dict[str, int]) -> list[str]:
    problems = []
    for i, node in enumerate(model.graph.node):
        where = f"node {i} ({node.name or '?'}, {node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r}, TensorRT would need a plugin")
            continue
        if node.op_type not in ops.SUPPORTED:
            listed = "marked unsupported" if node.op_type in ops.UNSUPPORTED else "not in"
            problems.append(f"{where}: {listed} TensorRT {ops.TENSORRT_VERSION}'s ONNX operator matrix")
            continue
        if node.op_type == "Resize":
            ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
            mode = _attr(node, "mode", "nearest")
            nearest = _attr(node, "nearest_mode", "round_prefer_floor")
            if ctm not in ops.RESIZE_COORDINATE_MODES or mode not in ops.RESIZE_MODES or \
                    (mode == "nearest" and nearest not in ops.RESIZE_NEAREST_MODES) or _attr(node, "antialias", 0):
                problems.append(f"{where}: Resize with coordinate_transformation_mode={ctm}, mode={mode}, "
                                f"nearest_mode={nearest} is outside TensorRT's support ({ops.RESTRICTIONS['Resize']})")
        if node.op_type in ops.REDUCE_OPS_AXES_INITIALIZER and len(node.input) > 1 and node.input[1] \
                and node.input[1] not in constants:
            problems.append(f"{where}: axes computed at run time; TensorRT needs them as an initializer")
        if node.op_type == "TopK" and (_attr(node, "sorted", 1) != 1 or node.input[1] not in constants):
            problems.append(f"{where}: TopK needs sorted=1 and a constant K ({ops.RESTRICTIONS['TopK']})")
        if node.op_type in ops.POOL_OPS_NO_DILATION and any(d != 1 for d in (_attr(node, "dilations") or [])):
            problems.append(f"{where}: pooling with dilations; TensorRT needs them empty or all ones")
        for name in node.output:
            if types.get(name) == TensorProto.UINT8 and name not in io:
                problems.append(f"{where}: output {name} is UINT8 inside the graph; TensorRT takes UINT8 only "
                                "as a network input or output")
    return problems


def _constant_and_shape_tensors(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(constants: initializers, Constant outputs and what is computed from them alone;
    shape-derived: Shape/Size outputs and what is computed from them and constants)."""
    constants = {i.name for i in model.graph.initializer}
    shape_derived: set[str] = set()
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        inputs = [x for x in node.input if x]
        if node.op_type == "Constant" or (inputs and all(x in constants for x in inputs)):
            constants.update(node.output)
        elif node.op_type in ("Shape", "Size") or inputs and all(x in constants or x in shape_derived for x in inputs):
            shape_derived.update(node.output)
    return constants, shape_derived


def check_graph(path: Path, max_batch: int, fp32_scopes: Sequence[str] = ()) -> GraphReadiness:
    """Check one ONNX scorer for TensorRT at ``max_batch``; ``fp32_scopes``: node prefixes that must stay FP32."""
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    result = GraphReadiness(path=Path(path), max_batch=max_batch, nodes=len(model.graph.node),
                            op_counts=dict(sorted(Counter(n.op_type for n in model.graph.node).items())), opset=opset)
    lo, hi = ops.OPSET_RANGE
    if not lo <= opset <= hi:
        result.problems.append(f"opset {opset} is outside TensorRT {ops.TENSORRT_VERSION}'s range {lo}..{hi}")
    if opset > ops.OPSET_MAX_TENSORRT_8_6:
        result.notes.append(f"opset {opset} is above {ops.OPSET_MAX_TENSORRT_8_6}, the highest TensorRT 8.6 "
                            "(JetPack 5) parses; export with opset 17 for JetPack 5")
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = _dims(vi)
        if dims is None or not dims or any(d is None for d in dims[1:]):
            result.problems.append(f"{vi.name} {_fmt_dims(vi)}: a dynamic dimension other than the batch "
                                   "(dimension 0); export with fixed H, W and map size")
    # Fix the batch, drop the exporter's stale shapes, and infer every intermediate (data_prop: shape arithmetic).
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in list(fixed.graph.input) + list(fixed.graph.output):
        dim = vi.type.tensor_type.shape.dim
        if dim:
            dim[0].Clear()
            dim[0].dim_value = max_batch
    constants, shape_derived = _constant_and_shape_tensors(model)
    io = {vi.name for vi in list(model.graph.input) + list(model.graph.output)}
    try:
        inferred = shape_inference.infer_shapes(fixed, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError (and others) for graphs it cannot type
        result.problems += _operator_problems(model, constants, io, {})
        result.problems.append(f"ONNX shape inference failed at batch {max_batch}: {str(exc).splitlines()[0]}")
        return result
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    types = {name: vi.type.tensor_type.elem_type for name, vi in infos.items()}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input})
    result.problems += _operator_problems(model, constants, io, types)
    initializers = {i.name for i in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        for name in node.output:
            if not name:
                continue
            vi = infos.get(name)
            if vi is None or _dims(vi) is None or any(d is None for d in _dims(vi) or []):
                shown = _fmt_dims(vi) if vi is not None else "no shape"
                result.problems.append(f"node {i} ({node.name or '?'}, {node.op_type}): output {name} {shown} "
                                       f"is not fixed at batch {max_batch} (a dynamic dimension besides the batch)")
                continue
            shape = tuple(int(d or 0) for d in _dims(vi) or [])
            elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if elements > result.largest_elements:
                result.largest_name, result.largest_shape, result.largest_elements = name, shape, elements
            if elements >= ELEMENT_LIMIT:
                result.problems.append(f"node {i} ({node.name or '?'}, {node.op_type}): output {name} {list(shape)} "
                                       f"has {elements:,} elements at batch {max_batch}, TensorRT's limit is 2^31; "
                                       "lower export.max_batch or chunk the computation")
            if types.get(name) == TensorProto.INT64 and name not in constants and name not in shape_derived \
                    and name not in initializers:
                result.problems.append(f"node {i} ({node.name or '?'}, {node.op_type}): output {name} is an INT64 "
                                       "tensor computed from the frames at run time (TensorRT 8.6 would cast it "
                                       "to INT32); compute it in INT32 or float")
            if fp32_scopes and node.name.startswith(tuple(fp32_scopes)) and node.op_type != "Cast" \
                    and types.get(name) == TensorProto.FLOAT16:
                result.problems.append(f"node {i} ({node.name}, {node.op_type}): in an FP32 scope but computes "
                                       "FP16; the FP16 conversion lost the FP32-kept block")
    result.problems += _fp16_round_trips(model, types)
    for scope in fp32_scopes:
        if not any(n.name.startswith(scope) for n in model.graph.node):
            result.problems.append(f"FP32 scope {scope!r} matches no node: the model's fp32_scopes no longer name "
                                   "its export module's parts, so nothing is kept in FP32")
    return result


def _fp16_round_trips(model: onnx.ModelProto, types: dict[str, int]) -> list[str]:
    """Cast FP32 → FP16 → FP32 pairs: a value kept in FP32 rounded to FP16 on its way to an FP32 consumer."""
    producer = {o: (i, n) for i, n in enumerate(model.graph.node) for o in n.output}
    problems = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Cast" or _attr(node, "to") != TensorProto.FLOAT:
            continue
        found = producer.get(node.input[0])
        if found is None:
            continue
        j, first = found
        if first.op_type == "Cast" and _attr(first, "to") == TensorProto.FLOAT16 \
                and types.get(first.input[0]) == TensorProto.FLOAT:
            problems.append(f"nodes {j} and {i} ({first.name}, {node.name}): {first.input[0]} goes FP32 -> FP16 -> "
                            "FP32 between two FP32 nodes and loses the precision it is kept for; re-export "
                            "(trainer.export removes such round trips)")
    return problems


def scores_auroc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def swapped_pairs_fraction(s32: np.ndarray, s16: np.ndarray, labels: np.ndarray, tie: float) -> Optional[float]:
    """The fraction of (good, defect) pairs whose order FP16 loses (reversed or tied), leaving out the pairs
    FP32 itself does not order (scores within ``tie``); None without both classes."""
    labels = np.asarray(labels).astype(int)
    good, bad = labels == 0, labels == 1
    if not good.any() or not bad.any():
        return None
    gap32 = s32[bad][:, None] - s32[good][None, :]
    gap16 = s16[bad][:, None] - s16[good][None, :]
    lost = (np.abs(gap32) > tie) & (np.sign(gap16) != np.sign(gap32))
    return float(lost.sum() / gap32.size)


def fp16_parity(fp32_path: Path, fp16_path: Path, frames: np.ndarray, labels: Optional[np.ndarray] = None,
                batch: int = 8) -> dict[str, Any]:
    """The FP16 graph's scores against the FP32 graph's on the same frames (ONNX Runtime, CPU).

    ``score_max_rel_diff`` = max |s16 - s32| / max |s32|; with labels, both AUROCs, their difference and
    ``pairs_swapped_fraction``: the good/defect pairs FP16 puts in the other order, FP32 ties aside.
    ``ok`` when within SCORE_TOLERANCE and (with labels) AUROC_TOLERANCE.
    """
    from edge.backends.onnxruntime import OrtBackend  # the station's own scorer; no torch needed here

    def scores(path: Path) -> np.ndarray:
        backend = OrtBackend(path, max_batch=batch, providers=["CPUExecutionProvider"], warmup=False)
        return backend.infer(frames)["score"].astype(np.float64)

    s32, s16 = scores(fp32_path), scores(fp16_path)
    scale = max(float(np.abs(s32).max()), 1e-12)
    out: dict[str, Any] = {"frames": len(frames), "score_max_abs_diff": float(np.abs(s16 - s32).max()),
                           "score_max_rel_diff": float(np.abs(s16 - s32).max() / scale),
                           "score_tolerance": SCORE_TOLERANCE}
    ok = out["score_max_rel_diff"] <= SCORE_TOLERANCE and bool(np.isfinite(s16).all())
    if labels is not None:
        a32, a16 = scores_auroc(s32, labels), scores_auroc(s16, labels)
        out.update({"auroc_fp32": a32, "auroc_fp16": a16, "auroc_tolerance": AUROC_TOLERANCE,
                    "auroc_delta": None if a32 is None or a16 is None else abs(a16 - a32),
                    "pairs_swapped_fraction": swapped_pairs_fraction(s32, s16, labels, TIE_TOLERANCE * scale)})
        ok = ok and out["pairs_swapped_fraction"] is not None and out["pairs_swapped_fraction"] <= AUROC_TOLERANCE
    out["ok"] = ok
    return out
