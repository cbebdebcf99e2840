"""The TensorRT plan cache (key, load-or-rebuild), the build-source rules, and backend selection with its fallback.

TensorRT itself cannot be installed on the machines of this project, so what is tested here is everything
around it, on real bundles: the key of a plan changes with any fact an engine depends on, a plan is loaded
only when its key record matches, and ``auto`` falls back to ONNX Runtime with the reason in the log.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from edge_helpers import run_cli, write_video

from core.bundle import load_bundle
from core.errors import UserError
from edge import plans
from edge.backends import BackendUnavailable, choose_backend, create_backend, tensorrt_unavailable_reason
from edge.backends.cudart import Gpu
from edge.backends.onnxruntime import OrtBackend
from edge.backends.tensorrt import BuildOptions, TensorRTBackend, plan_key, tensorrt_major

ORIN = Gpu(0, "Orin", "8.7", integrated=True)
SHA = "ab" * 32


def _key(**changes: object) -> plans.PlanKey:
    base = plans.PlanKey("10.3.0", "Orin", "8.7", "fp16", 8, SHA)
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value", [("tensorrt_version", "10.3.1"), ("gpu_name", "NVIDIA H100 80GB HBM3"),
                                         ("compute_capability", "9.0"), ("precision", "fp32"), ("max_batch", 16),
                                         ("onnx_sha256", "cd" * 32), ("dla_core", 0)])
def test_every_fact_an_engine_depends_on_changes_the_key_and_forces_a_rebuild(tmp_path: Path, field: str,
                                                                              value: object) -> None:
    old, new = _key(), _key(**{field: value})
    assert new.name != old.name and plans.plan_path(tmp_path, new) != plans.plan_path(tmp_path, old)
    plans.write_plan(tmp_path, old, b"engine built for the old key")
    assert plans.decide(tmp_path, old).action == "load"
    decision = plans.decide(tmp_path, new)
    assert decision.action == "build"
    assert "no plan for this device and ONNX file yet" in decision.reason and "1 plan(s) for other" in decision.reason


def test_the_key_names_its_facts_readably() -> None:
    key = plans.PlanKey("10.3.0", "NVIDIA Jetson AGX Orin", "8.7", "fp16", 8, SHA, dla_core=1)
    assert key.name == f"trt10.3.0-nvidia-jetson-agx-orin-sm8.7-fp16-b8-dla1-{SHA[:16]}"
    assert plans.timing_cache_path(Path("p"), key).name == "timing-trt10.3.0-nvidia-jetson-agx-orin-sm8.7.cache"
    with pytest.raises(ValueError, match="precision"):
        _key(precision="int8")
    with pytest.raises(ValueError, match="64 hex"):
        _key(onnx_sha256="abc")


def test_a_plan_is_never_loaded_without_a_matching_key_record(tmp_path: Path) -> None:
    key = _key()
    path = plans.write_plan(tmp_path, key, b"plan")
    record = plans.record_path(tmp_path, key)
    assert json.loads(record.read_text()) == key.record()
    stored = key.record() | {"onnx_sha256": "ef" * 32}  # the same file name, another ONNX file behind it
    record.write_text(json.dumps(stored))
    decision = plans.decide(tmp_path, key)
    assert decision.action == "build" and "onnx_sha256" in decision.reason
    record.write_text("{not json")
    assert plans.decide(tmp_path, key).action == "build"
    record.unlink()
    assert "no readable key record" in plans.decide(tmp_path, key).reason
    plans.write_plan(tmp_path, key, b"rebuilt")
    assert plans.decide(tmp_path, key).action == "load" and path.read_bytes() == b"rebuilt"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_plan_key_of_a_real_bundle_follows_its_onnx_file(tmp_path: Path, toy_bundle: Path) -> None:
    bundle = load_bundle(toy_bundle)
    key, source = plan_key("10.3.0", ORIN, bundle, BuildOptions("fp16", 8))
    assert source.onnx == "model.onnx" and source.fp16_flag  # the toy bundle has no FP16 graph
    assert key.onnx_sha256 == bundle.manifest["files"]["model.onnx"]
    copy = tmp_path / toy_bundle.name
    shutil.copytree(toy_bundle, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")  # another ONNX file (load_bundle would refuse it; the key must not match either)
    changed, _ = plan_key("10.3.0", ORIN, load_bundle(copy, verify=False), BuildOptions("fp16", 8))
    assert changed.name != key.name
    plans.write_plan(tmp_path / "plans", key, b"x")
    assert plans.decide(tmp_path / "plans", changed).action == "build"


@pytest.mark.parametrize("major,precision,has_fp16,dla,onnx,typed,flag", [
    (8, "fp16", True, False, "model.onnx", False, True),  # JetPack 5: FP32 graph + FP16 flag
    (10, "fp16", True, False, "model.fp16.onnx", True, False),  # strongly typed FP16 graph
    (10, "fp16", False, False, "model.onnx", False, True),  # no FP16 graph: the flag, said in the note
    (11, "fp16", True, False, "model.fp16.onnx", True, False),
    (11, "fp16", False, False, "model.onnx", True, False),  # 11 has no FP16 flag: FP32, said in the note
    (10, "fp32", True, False, "model.onnx", False, False),
    (11, "fp32", True, False, "model.onnx", True, False),
    (10, "fp16", True, True, "model.onnx", False, True),  # DLA: the builder places layers
])
def test_which_onnx_file_and_mode_each_tensorrt_builds_from(major: int, precision: str, has_fp16: bool, dla: bool,
                                                            onnx: str, typed: bool, flag: bool) -> None:
    source = plans.build_source(major, precision, has_fp16, dla=dla)
    assert (source.onnx, source.strongly_typed, source.fp16_flag) == (onnx, typed, flag)
    if major == 11 and precision == "fp16" and not has_fp16:
        assert "no FP16 flag" in source.note


def test_tensorrt_major_and_build_options() -> None:
    assert tensorrt_major("8.6.2.3") == 8 and tensorrt_major("10.3.0") == 10 and tensorrt_major("dev") == 99
    BuildOptions("fp16", 8, opt_batch=4, dla_core=0).validate()
    for bad in (BuildOptions("int8"), BuildOptions(max_batch=0), BuildOptions(max_batch=4, opt_batch=8),
                BuildOptions(workspace_mb=-1), BuildOptions("fp32", dla_core=0)):
        with pytest.raises(UserError):  # one line for the CLI
            bad.validate()


def test_auto_falls_back_to_onnxruntime_and_says_why(toy_bundle: Path, tmp_path: Path, mosquitto: str) -> None:
    reason = tensorrt_unavailable_reason()  # the real check on this machine: no TensorRT library here
    assert reason is not None and "cannot import tensorrt" in reason
    backend = create_backend("auto", load_bundle(toy_bundle), max_batch=2)
    assert isinstance(backend, OrtBackend) and backend.selection == f"auto: TensorRT not usable here ({reason})"
    backend.close()
    # edge-run says it in its startup line
    video = write_video(tmp_path / "v.avi", [], 3)
    proc = run_cli("edge-run", ["--camera", video, "--engine", toy_bundle, "--state-dir", tmp_path / "state",
                                "--mqtt", mosquitto, "--max-frames", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"backend onnxruntime (auto: TensorRT not usable here ({reason}))" in proc.stderr, proc.stderr


def test_auto_falls_back_when_the_tensorrt_backend_fails_for_the_bundle(toy_bundle: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """'auto' told that TensorRT can run goes for it; TensorRTBackend then really fails here (no library), and
    the station runs ONNX Runtime with the reason in a warning; '--backend tensorrt' fails in one line instead."""
    bundle = load_bundle(toy_bundle)
    with caplog.at_level(logging.INFO, logger="edge.backends"):
        backend = create_backend("auto", bundle, max_batch=2, tensorrt_reason=lambda: None)
    assert isinstance(backend, OrtBackend) and backend.selection.startswith("auto: TensorRT failed for this bundle")
    assert "TensorRT failed for toy" in caplog.text and "falling back to onnxruntime" in caplog.text
    with pytest.raises(BackendUnavailable, match="TensorRT backend: "):
        create_backend("tensorrt", bundle, tensorrt_reason=lambda: None)


def test_backend_choice_rules() -> None:
    assert choose_backend("auto", lambda: None)[0] == "tensorrt"
    name, why = choose_backend("auto", lambda: "no CUDA GPU visible")
    assert name == "onnxruntime" and "no CUDA GPU visible" in why
    assert choose_backend("onnxruntime", lambda: pytest.fail("not asked"))[0] == "onnxruntime"  # type: ignore[arg-type,return-value]
    assert choose_backend("tensorrt", lambda: None)[0] == "tensorrt"
    with pytest.raises(BackendUnavailable, match="not available on this machine/build: no GPU; use --backend"):
        choose_backend("tensorrt", lambda: "no GPU")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        choose_backend("openvino")


def test_the_tensorrt_backend_refuses_in_one_line_where_tensorrt_is_absent(toy_bundle: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        TensorRTBackend(load_bundle(toy_bundle))
    message = str(info.value)
    assert "\n" not in message and "use --backend onnxruntime" in message
