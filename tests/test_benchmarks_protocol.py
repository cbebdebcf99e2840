"""The dataset reader behind the accuracy protocols (fast) and a tiny Fashion-MNIST one-class-normal run (slow)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edge.errors import UserError
from trainer.datasets import load_fashion_mnist, read_idx, to_bgr_frames

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as LeCun's format defines it: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_idx_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 3], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (5, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    frames = to_bgr_frames(x, (64, 64))
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
    assert (frames[..., 0] == frames[..., 2]).all()  # grey replicated to B, G, R


def test_missing_files_one_line_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_fashion_mnist("train", tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_malformed_idx_is_a_user_error(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as fh:
        fh.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # type 0x0d = float32, not uint8
    with pytest.raises(UserError, match="bad magic"):
        read_idx(bad_magic)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(UserError, match="declares 10 bytes"):
        read_idx(short)


def test_stratified_subsample() -> None:
    fm = _benchmark("protocol_fashion_mnist")
    labels = np.repeat(np.arange(10), 50)
    idx = fm.stratified_test_indices(labels, 200, seed=1)
    assert len(idx) == 200 and len(set(idx.tolist())) == 200
    assert (np.bincount(labels[idx], minlength=10) == 20).all()
    np.testing.assert_array_equal(idx, fm.stratified_test_indices(labels, 200, seed=1))
    assert len(fm.stratified_test_indices(labels, 0, seed=1)) == 500
    train = fm.train_indices(labels, 4, 30, seed=0)
    assert len(train) == 30 and (labels[train] == 4).all()


@pytest.mark.slow
def test_fashion_mnist_one_class_normal_tiny() -> None:
    """T-shirt/top normal, 200 training and 300 test images, through ONNX: well above chance."""
    fm = _benchmark("protocol_fashion_mnist")
    opts = fm.Options(train_per_class=200, test=300)
    try:
        results = fm.run_protocol([0], [0], opts)
    except UserError as exc:
        pytest.fail(str(exc), pytrace=False)
    (result,) = results
    print(f"Fashion-MNIST class 0, 200 train / 300 test: AUROC {result.auroc:.3f} ({result.seconds:.1f}s)")
    assert result.n_train == 200 and result.n_test == 300
    assert result.auroc > 0.8
