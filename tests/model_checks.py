"""Checks every exported model must pass, written once for the model tests (tests/test_trainer_<model>.py).

A model's test fits it on generated washers (``fit_on_washers``), then calls ``check_exported_bundle``: torch/ONNX
FP32 parity within 1e-4, the FP16 graph reversing no good/defect pair that FP32 orders, TensorRT readiness of both
graphs (trainer/tensorrt_readiness.py), the map's declared shape, and the same scores at any batch size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import onnxruntime as ort

from core.bundle import load_bundle
from trainer.config import parse_train_config
from trainer.datasets import FASHION_MNIST_DIR, load_dataset
from trainer.evaluate import evaluate_bundle
from trainer.pipeline import fit_bundle
from trainer.synthetic import DEFECT_KINDS, make_dataset
from trainer.tensorrt_readiness import check_graph, fp16_parity

FP32_TOLERANCE = 1e-4


def fashion_mnist_one_class(root: Path, n_train: int, n_test: int, size: Optional[int], normal: int = 1) -> Path:
    """The one-class protocol in small, for the image-level models' tests: ``train/good`` n_train images of class
    ``normal`` (1: Trouser), ``test/good`` n_test others of it, ``test/other`` n_test of the other classes (the same
    seeded draws for every test). ``size``: written at the model's input (the shared export checks feed the test
    files to the graph as they are); None: Fashion-MNIST's own 28 px."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        raise AssertionError(f"{FASHION_MNIST_DIR}: Fashion-MNIST not installed; install it with "
                             "`sudo apt-get install dataset-fashion-mnist`")
    rng = np.random.default_rng(0)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    draws = (("train/good", train, train.labels == normal, n_train), ("test/good", test, test.labels == normal, n_test),
             ("test/other", test, test.labels != normal, n_test))
    for folder, split, chosen, n in draws:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(split.images[rng.choice(np.flatnonzero(chosen), n, False)]):
            out = img if size is None else cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), out)
    return root


def washers(root: Path, size: int, n_train: int = 50, n_test: int = 20, seed: int = 7) -> Path:
    """Generated washers with every planted surface-defect kind: ``n_train`` good to fit, ``n_test`` good and
    ``n_test`` defective to test."""
    return make_dataset(root, n_train=n_train, n_test_good=n_test, n_test_defect=n_test, size=size, seed=seed,
                        kinds=DEFECT_KINDS)


def fit_on_washers(config_text: str, parts: Path, engines: Path) -> Path:
    """``edge-train fit``'s pipeline on ``parts`` with the given config; prints the lines a reader of the test
    log wants (epochs kept, test metrics, parity) and returns the bundle."""
    lines: list[str] = []
    path = fit_bundle(parse_train_config(config_text), parts, engines, log=lines.append)
    print("\n".join(line for line in lines if line.startswith(("kept epoch", "test:", "parity"))))
    return path


def labelled_test_frames(parts: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test folder's frames (BGR uint8) and labels (0 good, 1 defect)."""
    paths = sorted((parts / "test" / "good").glob("*.png"))
    bad = sorted(p for d in (parts / "test").iterdir() if d.name != "good" for p in d.glob("*.png"))
    frames = np.stack([np.asarray(cv2.imread(str(p), cv2.IMREAD_COLOR)) for p in paths + bad])
    return frames, np.r_[np.zeros(len(paths)), np.ones(len(bad))]


def image_and_pixel_auroc(bundle: Path, parts: Path, name: str) -> tuple[float, Optional[float]]:
    """Both AUROCs of the test folder scored through the bundle's ONNX graph (printed for the log)."""
    m = evaluate_bundle(bundle, parts).metrics
    pixel = m.get("pixel_auroc")
    print(f"{name}: image AUROC {m['image_auroc']:.3f}, pixel AUROC "
          f"{'n/a' if pixel is None else format(pixel, '.3f')}")
    return float(m["image_auroc"]), None if pixel is None else float(pixel)


def check_exported_bundle(bundle: Path, parts: Path, size: int | tuple[int, int],
                          fp32_scopes: Sequence[str] = ()) -> None:
    """Parity, FP16 order, TensorRT readiness, the map's shape and any batch size, on a fitted bundle."""
    hw = (size, size) if isinstance(size, int) else size
    loaded = load_bundle(bundle)
    f32 = loaded.manifest["parity"]["onnx_fp32"]
    assert f32["score_max_rel_diff"] < FP32_TOLERANCE and f32["map_max_rel_diff"] < FP32_TOLERANCE, f32
    frames, labels = labelled_test_frames(parts)
    fp16 = fp16_parity(bundle / "model.onnx", bundle / "model.fp16.onnx", frames, labels)
    print(f"FP32 parity score {f32['score_max_rel_diff']:.1e} map {f32['map_max_rel_diff']:.1e}; FP16 pairs swapped "
          f"{fp16['pairs_swapped_fraction']}, AUROC {fp16['auroc_fp32']:.4f} -> {fp16['auroc_fp16']:.4f}")
    assert fp16["pairs_swapped_fraction"] == 0.0, fp16  # no good/defect pair that FP32 orders is reversed
    max_batch = int(json.loads((bundle / "report.json").read_text())["export"]["max_batch"])
    for name in ("model.onnx", "model.fp16.onnx"):
        result = check_graph(bundle / name, max_batch, fp32_scopes)
        assert result.ready, (name, result.problems)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).integers(0, 256, (min(5, max_batch), *hw, 3), dtype=np.uint8)
    whole = session.run(None, {"frames": probe})
    assert list(whole[1].shape[1:]) == loaded.manifest["outputs"][1]["shape"][1:]  # the map the manifest declares
    for batch in (1, 3):
        part = session.run(None, {"frames": probe[:batch]})
        assert np.allclose(part[0], whole[0][:batch], rtol=1e-5, atol=1e-6)
        assert np.allclose(part[1], whole[1][:batch], rtol=1e-5, atol=1e-5)
