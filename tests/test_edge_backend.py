"""The ONNX Runtime backend on a real (toy) bundle, backend selection, and a third backend added by one class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edge_helpers import assert_one_line_error, make_frame, run_cli, write_video

from core.bundle import Bundle, load_bundle
from edge.backends import (
    Backend,
    BackendOptions,
    BackendUnavailable,
    backend_names,
    check_frames,
    create_backend,
    register_backend,
    resolve_backend_name,
)
from edge.backends.onnxruntime import OrtBackend


# -- a third backend from outside: one class and its registration, no other edit -----------------------
class ReferenceBackend:
    """The bundle's graph run by the ``onnx`` package's reference evaluator: numpy, slow, no runtime library."""

    name = "onnx-reference"

    def __init__(self, bundle: Bundle, max_batch: int) -> None:
        from onnx.reference import ReferenceEvaluator

        self.session: Any = ReferenceEvaluator(str(bundle.onnx_path))
        self.input_hw = bundle.input_hw
        self.max_batch = max_batch

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        check_frames(frames, self.input_hw)
        outputs = self.session.run(None, {"frames": frames})
        return dict(zip(self.session.output_names, outputs, strict=True))

    def close(self) -> None:
        self.session = None


@register_backend("onnx-reference", title="ONNX reference evaluator")  # no preference: never chosen by auto
def create_reference_backend(bundle: Bundle, options: BackendOptions) -> ReferenceBackend:
    return ReferenceBackend(bundle, options.max_batch)


def test_ort_backend_scores_frames_and_maps(toy_bundle: Path) -> None:
    bundle = load_bundle(toy_bundle)
    backend = create_backend("onnxruntime", bundle, max_batch=3)
    assert isinstance(backend, Backend) and backend.name == "onnxruntime" and backend.max_batch == 3
    rng = np.random.default_rng(1)
    frames = np.stack([make_frame(rng, (32, 32), defect=i % 2 == 1) for i in range(7)])  # 7 > max_batch: chunks
    out = backend.infer(frames)
    assert out["score"].shape == (7,) and out["score"].dtype == np.float32
    assert out["anomaly_map"].shape == (7, 32, 32)
    np.testing.assert_allclose(out["score"], [0, 0.25] * 3 + [0], atol=1e-6)
    backend.close()


def test_ort_backend_standalone_on_an_onnx_path(toy_bundle: Path) -> None:
    backend = OrtBackend(toy_bundle / "model.onnx", max_batch=4, providers=["CPUExecutionProvider"])
    assert backend.input_hw == (32, 32)
    assert backend.infer(np.zeros((2, 32, 32, 3), np.uint8))["score"].tolist() == [0.0, 0.0]


def test_ort_backend_refuses_wrong_inputs_clearly(toy_bundle: Path) -> None:
    backend = create_backend("auto", load_bundle(toy_bundle), max_batch=2)
    with pytest.raises(ValueError, match="uint8"):
        backend.infer(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="resize on the host"):
        backend.infer(np.zeros((1, 64, 64, 3), np.uint8))


def test_auto_picks_onnxruntime_here_and_tensorrt_is_refused_in_one_line(toy_bundle: Path) -> None:
    assert resolve_backend_name("auto") == "onnxruntime"
    with pytest.raises(BackendUnavailable, match="TensorRT backend not available"):
        create_backend("tensorrt", load_bundle(toy_bundle))


def test_cli_backend_tensorrt_fails_with_one_line(tmp_path: Path, toy_bundle: Path) -> None:
    video = write_video(tmp_path / "v.avi", [], 5)
    proc = run_cli("edge-run", ["--camera", video, "--engine", toy_bundle, "--backend", "tensorrt",
                                "--state-dir", tmp_path / "state"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", "TensorRT backend not available on this machine/build")


def test_edge_never_imports_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, edge.cli, edge.pipeline, edge.backends, edge.backends.onnxruntime, edge.mqtt; "
            "edge.backends.backend_names(); "  # every backend module imported, none of their libraries
            "bad = [m for m in ('torch', 'trainer', 'tensorrt', 'pycuda', 'cuda') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_ort_workers_sleep_between_batches_unless_asked_to_spin(toy_bundle: Path) -> None:
    def spinning(backend: Backend) -> str:
        assert isinstance(backend, OrtBackend)
        return str(backend.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))

    bundle = load_bundle(toy_bundle)
    assert spinning(create_backend("onnxruntime", bundle)) == "0"  # the capture threads keep their core
    assert spinning(create_backend("onnxruntime", bundle, spinning=True)) == "1"


def test_a_bundle_without_a_score_only_graph_runs_its_full_graph(toy_bundle: Path) -> None:
    bundle = load_bundle(toy_bundle)
    assert bundle.onnx_score_path is None  # made before score-only graphs (or with export.score_only: false)
    backend = create_backend("onnxruntime", bundle, need_map=False)
    assert isinstance(backend, OrtBackend) and backend.path == bundle.onnx_path


def test_a_backend_registered_from_outside_is_picked_by_name_and_scores_like_onnxruntime(toy_bundle: Path) -> None:
    assert backend_names()[0] == "auto" and {"onnxruntime", "tensorrt", "onnx-reference"} <= set(backend_names())
    bundle = load_bundle(toy_bundle)
    backend = create_backend("onnx-reference", bundle, max_batch=4)
    assert isinstance(backend, ReferenceBackend) and isinstance(backend, Backend)
    assert getattr(backend, "selection", "") == "requested" and backend.max_batch == 4
    rng = np.random.default_rng(2)
    frames = np.stack([make_frame(rng, (32, 32), defect=i in (1, 4)) for i in range(5)])
    reference = backend.infer(frames)
    ort = create_backend("onnxruntime", bundle).infer(frames)
    np.testing.assert_allclose(reference["score"], ort["score"], atol=1e-6)
    np.testing.assert_allclose(reference["anomaly_map"], ort["anomaly_map"], atol=1e-6)
    assert reference["score"].tolist() == pytest.approx([0, 0.25, 0, 0, 0.25], abs=1e-6)
    assert resolve_backend_name("auto") == "onnxruntime"  # registered without a preference: auto never picks it


def test_an_unknown_backend_is_refused_in_one_line_naming_the_registered_ones(toy_bundle: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        create_backend("openvino", load_bundle(toy_bundle))
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown backend 'openvino'; choose one of auto, ")
    assert all(name in message for name in ("onnxruntime", "tensorrt", "onnx-reference"))
    with pytest.raises(ValueError, match="'auto' is not a backend's name"):
        register_backend("auto")
