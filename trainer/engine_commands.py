"""``edge-train check-engine`` and ``edge-train build-engine``: TensorRT readiness of a bundle, and its plan.

check-engine needs no TensorRT (the ONNX files alone, and ONNX Runtime for the FP16 numerics), so it runs
on the workstation before a bundle is shipped. build-engine builds the plan on the machine that will run
it (a plan is tied to its TensorRT version and GPU), into the bundle's ``plans/``, as a station does on its
first start; neither imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from core.errors import UserError


def _stderr(msg: str) -> None:
    print(f"edge-train: {msg}", file=sys.stderr, flush=True)


def check_engine(bundle_ref: str, max_batch: Optional[int], data: Optional[Path], as_json: bool) -> int:
    """Print the readiness of each ONNX file of the bundle (and FP16 parity on DIR/test); 0 ready, 1 not."""
    from core.bundle import load_bundle
    from trainer.tensorrt_readiness import check_graph, fp16_parity

    bundle = load_bundle(bundle_ref)
    batch = max_batch or bundle.max_batch or 8
    fp16_meta = bundle.manifest.get("fp16")
    scopes = [str(s) for s in fp16_meta.get("fp32_scopes", [])] if isinstance(fp16_meta, dict) else []
    graphs = [check_graph(bundle.onnx_path, batch)]
    if bundle.onnx_fp16_path is not None:
        graphs.append(check_graph(bundle.onnx_fp16_path, batch, scopes))
    parity: Optional[dict[str, Any]] = None
    if data is not None and bundle.onnx_fp16_path is not None:
        from trainer.data import load_test

        test = load_test(Path(data), bundle.input_hw, bundle.input_resize)
        if test is None:
            raise UserError(f"{Path(data) / 'test'}: no test folder; add DIR/test/good and DIR/test/<defect> images")
        parity = fp16_parity(bundle.onnx_path, bundle.onnx_fp16_path, test.images, test.labels, batch)
    ready = all(g.ready for g in graphs) and (parity is None or bool(parity["ok"]))
    if as_json:
        print(json.dumps({"bundle": str(bundle.path), "max_batch": batch, "ready": ready, "fp32_scopes": scopes,
                          "graphs": [{"file": g.path.name, "ready": g.ready, "nodes": g.nodes, "opset": g.opset,
                                      "ops": g.op_counts, "largest_intermediate": {
                                          "tensor": g.largest_name, "shape": list(g.largest_shape),
                                          "elements": g.largest_elements},
                                      "problems": g.problems, "notes": g.notes} for g in graphs],
                          "fp16_parity": parity}), flush=True)
        return 0 if ready else 1
    for g in graphs:
        print(g.summary())
        print("  ops: " + ", ".join(f"{op} {n}" for op, n in g.op_counts.items()))
        for line in g.problems:
            print(f"  problem: {line}")
        for line in g.notes:
            print(f"  note: {line}")
    if scopes:
        print(f"FP32 kept in {bundle.onnx_fp16_path.name if bundle.onnx_fp16_path else 'the FP16 graph'}: "
              + ", ".join(scopes))
    if parity is not None:
        auroc = (f"; AUROC FP32 {parity['auroc_fp32']:.4f}, FP16 {parity['auroc_fp16']:.4f}, "
                 f"delta {parity['auroc_delta']:.4f}, good/defect pairs swapped {parity['pairs_swapped_fraction']:.4f} "
                 f"(tolerance {parity['auroc_tolerance']}, FP32 ties aside)"
                 if parity.get("auroc_delta") is not None else "")
        print(f"FP16 vs FP32 scores on {parity['frames']} test images: max diff {parity['score_max_rel_diff']:.2e} "
              f"of the score scale (tolerance {parity['score_tolerance']:.0e}){auroc}: "
              + ("ok" if parity["ok"] else "FAILED"))
    elif bundle.onnx_fp16_path is not None:
        print("FP16 parity: pass --data DIR to compare the FP16 graph's scores and AUROC with the FP32 graph's")
    print(f"TensorRT readiness at batch {batch}: " + ("ready" if ready else "NOT ready"))
    return 0 if ready else 1


def build_engine(bundle_ref: str, precision: str, max_batch: Optional[int], opt_batch: Optional[int],
                 workspace_mb: int, dla_core: Optional[int], force: bool) -> int:
    """Build (or confirm) this device's plan for the bundle; prints the plan path last."""
    from core.bundle import load_bundle
    from edge import plans
    from edge.backends import cudart
    from edge.backends.tensorrt import BuildOptions, build_plan, import_tensorrt, plan_key

    bundle = load_bundle(bundle_ref)
    options = BuildOptions(precision, max_batch or bundle.max_batch or 8, opt_batch, workspace_mb, dla_core)
    options.validate()
    try:
        trt = import_tensorrt()
        rt = cudart.load()
    except ImportError as exc:
        raise UserError(f"cannot build a TensorRT plan here: {exc}; build it on the device that will run it "
                        "(JetPack's TensorRT and cuda-python on a Jetson, NVIDIA's tensorrt wheel on a GPU server), "
                        "or let the station build it on its first start") from None
    if cudart.device_count(rt) < 1:
        raise UserError("cannot build a TensorRT plan here: no CUDA GPU visible (a plan is built on the GPU "
                        "that runs it)")
    gpu = cudart.gpu(rt, 0)
    key, _source = plan_key(str(trt.__version__), gpu, bundle, options)
    decision = plans.decide(bundle.plans_dir, key)
    if decision.action == "load" and not force:
        _stderr(f"up to date: {decision.reason} (--force rebuilds)")
        print(decision.path, flush=True)
        return 0
    _stderr(f"building: {'forced' if force else decision.reason}")
    path, _seconds = build_plan(bundle, gpu, options, say=_stderr)
    print(path, flush=True)
    return 0
