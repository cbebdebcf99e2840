"""The accuracy-protocol runner (benchmarks/protocol.py) and its dataset readers (trainer/datasets.py).

Fast: the readers on small files written here, splits and their layout, stratified draws, the table and the
JSON, argument errors, and one real run through `edge-train` on a tiny Fashion-MNIST subset. Slow: a larger
Fashion-MNIST run at the benchmark's 64 px.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest

from core.errors import UserError
from trainer.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    read_idx,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "protocol.py"


def _load_protocol() -> ModuleType:
    """Import benchmarks/protocol.py (a script folder, not a package) under a name no stdlib module has."""
    name = "benchmarks_protocol"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


pr = _load_protocol()


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as LeCun's format defines it: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _write_cifar_batch(path: Path, labels: list[int], rgb: np.ndarray) -> None:
    """CIFAR-10 binary records: label byte, then the R, G and B planes of a 32x32 RGB image."""
    planes = rgb.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    path.write_bytes(b"".join(bytes([lab]) + planes[i].tobytes() for i, lab in enumerate(labels)))


def _fashion_mnist_or_fail() -> None:
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FASHION_MNIST_DIR}: Fashion-MNIST not installed; install it with "
                    "`sudo apt-get install dataset-fashion-mnist` (or `make datasets`)", pytrace=False)


# --- readers -------------------------------------------------------------------------------------------------

def test_fashion_mnist_idx_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 3], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y, classes = load_fashion_mnist("test", tmp_path)
    assert x.shape == (5, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert classes == FASHION_MNIST_CLASSES


def test_mnist_idx_plain_or_gzipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", train)  # as unpacked
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 7, 7, 2], np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)  # as downloaded
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 1, 0], np.uint8))
    x, y, classes = load_dataset("mnist", "train", tmp_path)
    np.testing.assert_array_equal(x, train)
    assert y.tolist() == [0, 7, 7, 2] and classes[7] == "7"
    x, y, _ = load_dataset("mnist", "test", tmp_path)
    np.testing.assert_array_equal(x, test)
    assert y.tolist() == [9, 1, 0]


def test_missing_or_malformed_files_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_fashion_mnist("train", tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    assert "train-images-idx3-ubyte" in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(UserError, match="pass --data DIR"):
        load_dataset("mnist", "train", None)
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as fh:
        fh.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # type 0x0d = float32, not uint8
    with pytest.raises(UserError, match="bad magic") as err:
        read_idx(bad_magic)
    assert str(bad_magic) in str(err.value)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(UserError, match="declares 10 bytes"):
        read_idx(short)


def test_cifar10_binary_records_known_pixel(tmp_path: Path) -> None:
    rgb = np.zeros((2, 32, 32, 3), np.uint8)
    rgb[1, 2, 5] = (200, 100, 50)  # R, G, B at row 2, column 5 of the second record
    for i in range(1, 6):
        _write_cifar_batch(tmp_path / f"data_batch_{i}.bin", [i, 3], rgb)
    _write_cifar_batch(tmp_path / "test_batch.bin", [9, 0], rgb)
    x, y, classes = load_cifar10("train", tmp_path)
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == [1, 3, 2, 3, 3, 3, 4, 3, 5, 3]
    assert x[1, 2, 5].tolist() == [50, 100, 200]  # BGR
    assert int(x[1].sum()) == 350 and int(x[0].sum()) == 0
    assert classes == CIFAR10_CLASSES
    x, y, _ = load_dataset("cifar10", "test", tmp_path)
    assert y.tolist() == [9, 0] and x[1, 2, 5].tolist() == [50, 100, 200]

    (tmp_path / "test_batch.bin").write_bytes(b"\x01" * 3000)  # truncated record
    with pytest.raises(UserError, match="test_batch.bin") as err:
        load_cifar10("test", tmp_path)
    assert "3073" in str(err.value)


def test_cifar10_pickle_version_is_refused_without_unpickling(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"not read")  # would fail to unpickle: the reader must not try
    for root in (tmp_path, folder):
        with pytest.raises(UserError) as err:
            load_dataset("cifar10", "train", root)
        message = str(err.value)
        assert "\n" not in message and "pickle" in message and "binary version" in message


def test_image_folder_reader(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls, value in (("b_cat", 10), ("a_dog", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(tmp_path / split / cls / f"{i}.png"), np.full((8, 6), value + i, np.uint8))
    x, y, classes = load_dataset("folder", "train", tmp_path)
    assert classes == ("a_dog", "b_cat")  # sorted by folder name
    assert x.shape == (6, 8, 6) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0, 0] == 200 and x[3, 0, 0] == 10
    # the same layout is accepted for the named datasets
    assert load_dataset("cifar10", "test", tmp_path).classes == ("a_dog", "b_cat")

    colour = np.zeros((8, 6, 3), np.uint8)
    colour[..., 2] = 255
    cv2.imwrite(str(tmp_path / "test" / "a_dog" / "c.png"), colour)
    x, _, _ = load_dataset("folder", "test", tmp_path)
    assert x.shape == (5, 8, 6, 3)  # one colour image: all BGR
    assert x[0, 0, 0].tolist() == [200, 200, 200] and x[2, 0, 0].tolist() == [0, 0, 255]

    cv2.imwrite(str(tmp_path / "test" / "b_cat" / "big.png"), np.zeros((9, 6), np.uint8))
    with pytest.raises(UserError, match="big.png"):
        load_dataset("folder", "test", tmp_path)
    (tmp_path / "train" / "b_cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset("folder", "train", tmp_path)


# --- splits --------------------------------------------------------------------------------------------------

def test_stratified_subsample() -> None:
    labels = np.repeat(np.arange(10), 50)
    idx = pr.stratified_subsample(labels, 200, (1, 7))
    assert len(idx) == 200 and len(set(idx.tolist())) == 200 and (np.diff(idx) > 0).all()
    assert (np.bincount(labels[idx], minlength=10) == 20).all()
    np.testing.assert_array_equal(idx, pr.stratified_subsample(labels, 200, (1, 7)))  # seeded
    assert not np.array_equal(idx, pr.stratified_subsample(labels, 200, (2, 7)))
    assert len(pr.stratified_subsample(labels, None, (1, 7))) == 500
    assert len(pr.stratified_subsample(labels, 5000, (1, 7))) == 500
    unbalanced = np.array([0] * 60 + [1] * 30 + [2] * 10)
    counts = np.bincount(unbalanced[pr.stratified_subsample(unbalanced, 11, (0,))], minlength=3)
    assert counts.tolist() == [7, 3, 1]  # 6.6, 3.3, 1.1: the largest remainder gets the 11th


def test_plan_split_follows_each_protocol() -> None:
    train_labels = np.repeat(np.arange(4), 30)
    test_labels = np.repeat(np.arange(4), 10)
    normal = pr.plan_split(train_labels, test_labels, 2, "one-normal", 0, 12, None, 4)
    assert (train_labels[normal.train_idx] == 2).all() and len(normal.train_idx) == 12
    assert normal.n_train_pool == 30 and normal.n_test_pool == 40
    assert normal.test_anomalous.tolist() == (test_labels[normal.test_idx] != 2).tolist()

    abnormal = pr.plan_split(train_labels, test_labels, 2, "one-abnormal", 0, 12, 20, 4)
    assert np.bincount(train_labels[abnormal.train_idx], minlength=4).tolist() == [4, 4, 0, 4]
    assert abnormal.n_train_pool == 90 and len(abnormal.test_idx) == 20
    assert np.bincount(test_labels[abnormal.test_idx], minlength=4).tolist() == [5, 5, 5, 5]
    assert abnormal.test_anomalous.tolist() == (test_labels[abnormal.test_idx] == 2).tolist()


def test_labelled_anomalies_follow_deep_sads_gamma_l(tmp_path: Path) -> None:
    """Deep SAD's scenario: gamma_l = m / (n + m) of the training set are labelled anomalies of one other class,
    drawn from the training split (never the test split), in train/labelled/ where the trainer reads them."""
    train_labels = np.repeat(np.arange(4), 100)
    test_labels = np.repeat(np.arange(4), 10)
    split = pr.plan_split(train_labels, test_labels, 2, "one-normal", 0, 95, None, 4, labelled_ratio=0.05)
    assert len(split.labelled_idx) == 5 and (train_labels[split.labelled_idx] == 3).all()  # 0.05 = 5 / (95 + 5)
    assert split.test_anomalous.tolist() == (test_labels[split.test_idx] != 2).tolist()  # the test is unchanged
    again = pr.plan_split(train_labels, test_labels, 2, "one-normal", 0, 95, None, 4, labelled_ratio=0.05)
    other = pr.plan_split(train_labels, test_labels, 2, "one-normal", 1, 95, None, 4, labelled_ratio=0.05)
    assert again.labelled_idx.tolist() == split.labelled_idx.tolist() != other.labelled_idx.tolist()
    last = pr.plan_split(train_labels, test_labels, 3, "one-normal", 0, 50, None, 4, labelled_ratio=0.2,
                         labelled_class=1)
    assert (train_labels[last.labelled_idx] == 1).all() and len(last.labelled_idx) == 12  # round(0.2 * 50 / 0.8)
    assert pr.labelled_count(0.01, 10) == 1  # at least one
    assert pr.labelled_class_of(3, None, 4) == 0  # the class after the last is the first

    images = pr.LabelledImages(np.zeros((400, 8, 8), np.uint8), train_labels, tuple("abcd"))
    counts = pr.layout_split(tmp_path, images, pr.LabelledImages(np.zeros((40, 8, 8), np.uint8), test_labels,
                                                                 tuple("abcd")), split)
    assert counts["train/labelled"] == 5 and counts["train/good"] == 95
    from trainer.data import known_defect_paths
    assert {k: len(v) for k, v in known_defect_paths(tmp_path).items()} == {"labelled": 5}  # the trainer reads them
    plain = pr.plan_split(train_labels, test_labels, 2, "one-normal", 0, 95, None, 4)
    assert "train/labelled" not in pr.layout_split(tmp_path / "plain", images, images, plain)


def test_layout_split_writes_mvtec_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    train = pr.LabelledImages(rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), np.repeat(np.arange(3), 10),
                              ("a", "b", "c"))
    test = pr.LabelledImages(rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.repeat(np.arange(3), 4),
                             ("a", "b", "c"))
    split = pr.plan_split(train.labels, test.labels, 1, "one-abnormal", 0, None, None, 3)
    counts = pr.layout_split(tmp_path, train, test, split)
    assert counts == {"train/good": 20, "test/good": 8, "test/abnormal": 4}
    for sub, n in counts.items():
        assert len(list((tmp_path / sub).glob("*.png"))) == n
    for path in (tmp_path / "test" / "abnormal").glob("*.png"):
        row = int(path.stem)
        assert test.labels[row] == 1
        back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert back is not None and back.ndim == 2  # grey stays single-channel, losslessly
        np.testing.assert_array_equal(back, test.images[row])

    colour = pr.LabelledImages(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 1]), ("a", "b"))
    split = pr.plan_split(colour.labels, colour.labels, 0, "one-normal", 0, None, None, 2)
    pr.layout_split(tmp_path / "colour", colour, colour, split)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "colour" / "test" / "abnormal" / "000002.png")),
                                  colour.images[2])


def test_trainer_config_is_accepted_by_the_trainer() -> None:
    from trainer.config import parse_train_config

    cfg = pr.trainer_config("patchcore", 64)
    assert cfg["input"] == {"height": 64, "width": 64}
    assert cfg["export"]["fp16"] is False and cfg["calibration"]["holdout_fraction"] == 0.2
    assert cfg["backbone"]["layers"] == [4, 10]
    import yaml

    parsed = parse_train_config(yaml.safe_dump(cfg))
    assert parsed.input.height == 64 and parsed.backbone.layers == [4, 10] and parsed.export.fp16 is False
    assert "backbone" not in pr.trainer_config("some-other-model", 32)


# --- table and JSON ------------------------------------------------------------------------------------------

def _cell(cls: int, seed: int, auroc: float) -> Any:
    return pr.Cell(cls=cls, seed=seed, image_auroc=auroc, metrics={"image_auroc": auroc}, n_train=100,
                   n_train_pool=6000, n_test=200, n_test_pool=10000, n_test_anomalous=180, seconds=2.0,
                   fit_seconds=1.5, eval_seconds=0.5)


def _settings(**kw: Any) -> Any:
    base = dict(dataset="fashion-mnist", protocol="one-normal", model="patchcore", classes=None, seeds=2,
                epochs=None, train_limit=100, test_limit=200, device=None, data=None, size=32, json_path=None,
                keep=None, verbose=False)
    return pr.Settings(**{**base, **kw})


def _table(settings: Any, names: tuple[str, ...], classes: list[int], cells: list[Any]) -> tuple[str, dict, list]:
    refs, notes = pr.references_for(settings.dataset, settings.protocol, settings.model, names)
    seeds = list(range(settings.seeds))
    summary = pr.summarise(cells, classes, seeds, names, refs)
    train = pr.LabelledImages(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), names)
    header = pr.header_lines(settings, cells, train, refs)
    text = pr.format_table(summary, header, seeds, refs, notes, "footer")
    doc = pr.report_document(settings, ["protocol.py", "--dataset", settings.dataset], datetime.now(timezone.utc),
                             12.0, classes, names, refs, notes, cells, summary, header)
    return text, json.loads(json.dumps(doc)), refs


def test_table_other_method_reference_and_json() -> None:
    settings = _settings()
    cells = [_cell(0, 0, 0.91), _cell(0, 1, 0.93), _cell(6, 0, 0.80), _cell(6, 1, 0.84)]
    text, doc, refs = _table(settings, FASHION_MNIST_CLASSES, [0, 6], cells)
    assert [r.label for r in refs] == ["GEOM (ref., other method)"]
    assert "SUBSAMPLED: 100 of 6000 training images" in text and "200 of 10000 test images" in text
    assert "model patchcore: input 32x32" in text and "device not passed" in text
    row0 = next(line for line in text.splitlines() if line.startswith("0 T-shirt/top"))
    assert row0.split() == ["0", "T-shirt/top", "91.0", "93.0", "92.0", "±", "1.4", "99.4", "50.0"]
    mean = next(line for line in text.splitlines() if line.startswith("mean "))
    assert mean.split()[:3] == ["mean", "85.5", "88.5"]
    assert f"{(99.4 + 83.3) / 2:.1f}" in mean  # GEOM over the same two classes, with a note
    assert "GEOM mean: of its per-class numbers over the same 2 class(es)" in text
    assert doc["rows"][1]["auroc"] == pytest.approx([80.0, 84.0]) and doc["rows"][1]["published"] == {
        "GEOM (ref., other method)": 83.3}
    assert doc["mean_row"]["mean"] == pytest.approx(87.0) and doc["chance"] == 50.0
    assert len(doc["cells"]) == 4 and doc["settings"]["train_limit"] == 100
    assert doc["command_line"].startswith("protocol.py --dataset") and doc["seconds"] == 12.0
    assert doc["trainer_config"]["backbone"]["layers"] == [4, 10]


def test_table_own_method_all_classes_and_na() -> None:
    cells = [_cell(c, 0, 0.6) for c in range(10)]
    text, doc, refs = _table(_settings(dataset="cifar10", protocol="one-abnormal", model="Skip-GANomaly", seeds=1),
                             CIFAR10_CLASSES, list(range(10)), cells)
    assert [r.label for r in refs] == ["Skip-GANomaly (paper)"]
    assert "95.3" in next(line for line in text.splitlines() if line.startswith("1 automobile"))
    assert "pooled 80/20" in text and "mean: of its per-class numbers (the paper gives no mean)" in text
    assert doc["mean_row"]["published"]["Skip-GANomaly (paper)"] == pytest.approx(73.07)

    text, _, refs = _table(_settings(dataset="cifar10", protocol="one-normal", seeds=1), CIFAR10_CLASSES,
                           list(range(10)), cells)
    assert [r.label for r in refs] == ["GEOM (ref., other method)", "Deep SVDD (ref., other method)"]
    mean = next(line for line in text.splitlines() if line.startswith("mean "))
    assert mean.split()[-3:] == ["86.0", "64.8", "50.0"]  # the papers' own means

    text, doc, refs = _table(_settings(dataset="mnist", model="deep_svdd", seeds=1),
                             tuple(str(d) for d in range(10)), list(range(10)), cells)
    assert [r.label for r in refs] == ["Deep SVDD (paper)"]
    assert next(line for line in text.splitlines() if line.startswith("3 3")).split()[-2:] == ["n/a", "50.0"]
    assert next(line for line in text.splitlines() if line.startswith("mean ")).split()[-2:] == ["94.8", "50.0"]
    assert doc["rows"][3]["published"] == {"Deep SVDD (paper)": None}

    text, doc, refs = _table(_settings(protocol="one-abnormal", seeds=1), FASHION_MNIST_CLASSES, list(range(10)),
                             cells)
    assert refs == [] and "published" in text.splitlines()[text.splitlines().index("") + 1]
    assert next(line for line in text.splitlines() if line.startswith("mean ")).split()[-2:] == ["n/a", "50.0"]
    assert "n/a: nothing published for Fashion-MNIST, one-abnormal" in text
    assert doc["notes"] and doc["references"] == []

    _, _, refs = _table(_settings(dataset="cifar10", seeds=1), tuple("abcdefghij"), list(range(10)), cells)
    assert refs == []  # class folders that are not CIFAR-10's: no published number matched


# --- the command line ----------------------------------------------------------------------------------------

def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["--dataset", "folder", "--protocol", "one-normal", "--model", "patchcore", "--data", str(tmp_path)]
    for extra in (["--size", "40"], ["--seeds", "0"], ["--classes", "a,b"], ["--protocol", "both"]):
        with pytest.raises(SystemExit) as exc:
            pr.main([*base, *extra])
        assert exc.value.code == 2
    capsys.readouterr()
    assert pr.main(["--dataset", "mnist", "--protocol", "one-normal", "--model", "patchcore"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("protocol: error: --dataset mnist is read from local files only")


def _run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_failed_trainer_step_names_class_and_seed(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(tmp_path / split / cls / f"{i}.png"), np.full((32, 32), 40 * i, np.uint8))
    proc = _run_script("--dataset", "folder", "--data", str(tmp_path), "--protocol", "one-normal", "--model",
                       "no-such-model", "--classes", "1", "--seeds", "1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any("unknown model 'no-such-model'" in line for line in lines)  # the trainer's own last lines
    assert lines[-1] == "protocol: error: class 1, seed 0: edge-train fit exited with status 2"
    assert proc.stdout == ""


def test_tiny_fashion_mnist_run_through_the_cli(tmp_path: Path) -> None:
    """T-shirt/top normal, 100 training / 200 test images at 32 px; measured AUROC 0.793 (seed 0)."""
    _fashion_mnist_or_fail()
    out = tmp_path / "result.json"
    proc = _run_script("--dataset", "fashion-mnist", "--protocol", "one-normal", "--model", "patchcore",
                       "--classes", "0", "--seeds", "1", "--train-limit", "100", "--test-limit", "200", "--size", "32",
                       "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "SUBSAMPLED: 100 of 6000 training images" in proc.stdout and "GEOM (ref., other method)" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("class 0 seed 0: AUROC ")
    doc = json.loads(out.read_text())
    (cell,) = doc["cells"]
    print(f"Fashion-MNIST class 0, 100 train / 200 test, 32 px: AUROC {cell['image_auroc']:.3f} "
          f"({cell['seconds']:.1f} s)")
    assert (cell["n_train"], cell["n_test"], cell["metrics"]["n_normal"]) == (100, 200, 20)
    assert cell["image_auroc"] > 0.65  # chance is 0.5; seeds 0-4 measured 0.79-0.93


@pytest.mark.slow
def test_fashion_mnist_one_class_normal_64px(tmp_path: Path) -> None:
    """T-shirt/top normal, 200 training and 300 test images at the benchmark's 64 px: well above chance."""
    _fashion_mnist_or_fail()
    out = tmp_path / "result.json"
    proc = _run_script("--dataset", "fashion-mnist", "--protocol", "one-normal", "--model", "patchcore",
                       "--classes", "0", "--seeds", "1", "--train-limit", "200", "--test-limit", "300", "--size", "64",
                       "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    (cell,) = json.loads(out.read_text())["cells"]
    print(f"Fashion-MNIST class 0, 200 train / 300 test, 64 px: AUROC {cell['image_auroc']:.3f} "
          f"({cell['seconds']:.1f} s)")
    assert cell["n_train"] == 200 and cell["n_test"] == 300
    assert cell["image_auroc"] > 0.8


def test_set_overrides_one_trainer_key_for_every_run() -> None:
    key, value = pr.parse_override("patchcore.coreset_ratio=0.1")
    cfg = pr.trainer_config("patchcore", 64, [(key, value)])
    assert cfg["patchcore"]["coreset_ratio"] == 0.1
    assert cfg["backbone"]["layers"] == [4, 10]  # the model's own overrides stay
    with pytest.raises(argparse.ArgumentTypeError):
        pr.parse_override("coreset_ratio")


# --- surface protocols: elpv solar cells, MVTec AD -----------------------------------------------------------

def _cell_image(rng: np.random.Generator, defective: bool, side: int = 64) -> np.ndarray:
    """An elpv-like grey cell: bright, mottled, two dark bus bars; a defective one has a dark crack across it."""
    img = np.clip(rng.normal(170, 6, (side, side)), 0, 255).astype(np.uint8)
    img[:, side // 3] = img[:, 2 * side // 3] = 90
    if defective:
        row = int(rng.integers(side // 4, 3 * side // 4))
        cv2.line(img, (int(rng.integers(0, side // 4)), row), (int(rng.integers(side // 2, side)), row + 6), 40, 2)
    return img


def _elpv_fixture(root: Path, counts: dict[tuple[str, str], int], seed: int = 0) -> Path:
    """An elpv-shaped folder: labels.csv as the package ships it (path, probability, type; whitespace) + PNGs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines, n = [], 0
    for (cell_type, prob), count in counts.items():
        for _ in range(count):
            n += 1
            name = f"images/cell{n:04d}.png"
            cv2.imwrite(str(root / name), _cell_image(rng, float(prob) >= 0.5))
            lines.append(f"{name}  {prob:<20}{cell_type}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


ELPV_COUNTS = {("mono", "0.0"): 14, ("mono", "1.0"): 6, ("mono", "0.3333333333333333"): 2,
               ("mono", "0.6666666666666666"): 1, ("poly", "0.0"): 5, ("poly", "1.0"): 2}


def test_elpv_labels_and_seeded_split(tmp_path: Path) -> None:
    from trainer.datasets import elpv_data_dir, elpv_split, read_elpv_labels

    root = _elpv_fixture(tmp_path / "elpv", ELPV_COUNTS)
    cells = read_elpv_labels(elpv_data_dir(root) / "labels.csv")
    assert len(cells) == 30 and cells[0].path == root / "images" / "cell0001.png" and cells[0].cell_type == "mono"
    split = elpv_split(cells, "mono", seed=0, n_train=8)
    assert (len(split.train), len(split.test_good), len(split.test_defect), split.n_uncertain) == (8, 6, 6, 3)
    good = {c.path for c in cells if c.cell_type == "mono" and c.probability == 0.0}
    assert set(split.train) | set(split.test_good) == good and not set(split.train) & set(split.test_good)
    assert {c.probability for c in cells if c.path in split.test_defect} == {1.0}  # 1/3 and 2/3 left out
    assert elpv_split(cells, "mono", 0, 8) == split  # seeded
    assert elpv_split(cells, "mono", 1, 8).train != split.train
    assert len(elpv_split(cells, "poly", 0, 3).test_good) == 2
    with pytest.raises(UserError, match="more than 5 functional"):
        elpv_split(cells, "poly", 0, 5)

    bad = tmp_path / "bad.csv"
    for text, match in (("images/a.png 1.0\n", "bad.csv:1: expected 3 fields"),
                        ("images/a.png 0.0 mono\nimages/b.png half mono\n", "bad.csv:2: defect probability 'half'"),
                        ("images/a.png 0.0 thin-film\n", "bad.csv:1: cell type 'thin-film'")):
        bad.write_text(text)
        with pytest.raises(UserError, match=match) as err:
            read_elpv_labels(bad)
        assert "\n" not in str(err.value)


def test_elpv_missing_dataset_is_one_line_naming_make_elpv(tmp_path: Path) -> None:
    from trainer.datasets import elpv_data_dir

    for call in (lambda: elpv_data_dir(tmp_path), lambda: elpv_data_dir(None, module="no_such_elpv_package")):
        with pytest.raises(UserError) as err:
            call()
        assert "make elpv" in str(err.value) and "\n" not in str(err.value)
    if importlib.util.find_spec("elpv_dataset") is not None:  # installed by `make elpv`: its own folder
        assert (elpv_data_dir() / "labels.csv").is_file()


def test_operating_metrics_at_the_shipped_threshold() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 6.0, 4.0, 5.0, 7.0, 8.0])
    m = pr.operating_metrics(scores, labels, threshold=6.5)  # flags 7 and 8: two of four defects, no good part
    assert m["confusion"] == {"tp": 2, "fp": 0, "fn": 2, "tn": 4}
    assert m["recall"] == 0.5 and m["false_alarm_rate"] == 0.0 and m["precision"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["best_f1"] == pytest.approx(8 / 9) and m["best_f1_threshold"] == 4.0  # 4 defects + the good 6.0
    assert m["image_auroc"] == pytest.approx(14 / 16)  # the good 6.0 outranks the defects 4 and 5
    low = pr.operating_metrics(scores, labels, threshold=0.5)  # flags everything
    assert low["recall"] == 1.0 and low["false_alarm_rate"] == 1.0 and low["f1"] == pytest.approx(2 / 3)
    with pytest.raises(UserError):
        pr.operating_metrics(scores[:4], labels[:4], 1.0)


def _mvtec_fixture(root: Path, categories: tuple[str, ...], side: int = 48) -> Path:
    """MVTec AD's layout: CATEGORY/train/good, CATEGORY/test/{good,crack}, CATEGORY/ground_truth/crack/*_mask.png."""
    rng = np.random.default_rng(5)
    for category in categories:
        base = root / category
        for sub, n, defective in (("train/good", 12, False), ("test/good", 4, False), ("test/crack", 4, True)):
            (base / sub).mkdir(parents=True)
            for i in range(n):
                img = cv2.cvtColor(_cell_image(rng, defective, side), cv2.COLOR_GRAY2BGR)
                cv2.imwrite(str(base / sub / f"{i:03d}.png"), img)
                if defective:
                    (base / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
                    mask = (cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) < 60).astype(np.uint8) * 255
                    cv2.imwrite(str(base / "ground_truth" / "crack" / f"{i:03d}_mask.png"), mask)
    return root


def test_mvtec_categories_are_checked(tmp_path: Path) -> None:
    from trainer.datasets import mvtec_categories

    root = _mvtec_fixture(tmp_path / "mvtec", ("screw", "bottle"))
    (root / "license.txt").write_text("not a category")
    assert mvtec_categories(root) == ["bottle", "screw"]
    assert mvtec_categories(root, ["screw"]) == ["screw"]
    with pytest.raises(UserError, match="--classes cable: not a category folder .* bottle, screw"):
        mvtec_categories(root, ["cable"])
    shutil.rmtree(root / "screw" / "test" / "crack")
    with pytest.raises(UserError, match="at least one defect folder"):
        mvtec_categories(root)
    with pytest.raises(UserError, match="no category folders"):
        mvtec_categories(root / "bottle" / "test")


def test_surface_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for args in (["--dataset", "elpv", "--model", "patchcore"],  # no --cell
                 ["--dataset", "elpv", "--cell", "thin", "--model", "patchcore"],
                 ["--dataset", "elpv", "--cell", "mono", "--model", "patchcore", "--protocol", "one-normal"],
                 ["--dataset", "mvtec", "--model", "patchcore"],  # no --root
                 ["--dataset", "mvtec", "--root", str(tmp_path)],  # no model
                 ["--dataset", "fashion-mnist", "--protocol", "one-normal", "--models", "patchcore,padim"],
                 ["--dataset", "fashion-mnist", "--model", "patchcore"]):  # no --protocol
        with pytest.raises(SystemExit) as exc:
            pr.main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("protocol: error: ")
    assert pr.main(["--dataset", "mvtec", "--root", str(tmp_path / "none"), "--model", "patchcore"]) == 2
    assert capsys.readouterr().err.strip() == (f"protocol: error: --root {tmp_path / 'none'}: folder not found; pass "
                                               "the MVTec AD folder holding bottle/, cable/, ...")


# A protocol run through the CLI (two fits in subprocesses, 12-22 s idle): `make test-slow`; make test keeps the
# elpv layout's and table's unit tests above, and one CLI run of the one-class protocol.
@pytest.mark.slow
def test_elpv_protocol_two_models_through_the_cli(tmp_path: Path) -> None:
    """The runner on an elpv-shaped fixture: PatchCore and PaDiM, every metric, the laid-out folders."""
    root = _elpv_fixture(tmp_path / "elpv", ELPV_COUNTS)
    out, keep = tmp_path / "result.json", tmp_path / "keep"
    proc = _run_script("--dataset", "elpv", "--root", str(root), "--cell", "mono", "--models", "patchcore,padim",
                       "--seeds", "1", "--train-limit", "8", "--size", "32", "--threads", "1", "--json", str(out),
                       "--keep", str(keep), "--set", "codec_augment.enabled=false")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("command: python benchmarks/protocol.py --dataset elpv --root ")
    assert "mono: 8 train, 6 functional + 6 defective test (3 rated 1/3 or 2/3 left out)" in proc.stdout
    doc = json.loads(out.read_text())
    assert [(r["model"], r["class"]) for r in doc["rows"]] == [("patchcore", "mono"), ("padim", "mono")]
    assert len(doc["runs"]) == 2
    for run in doc["runs"]:
        m, rep = run["metrics"], run["report_metrics"]
        assert (run["n_train"], run["n_test_good"], run["n_test_defect"]) == (8, 6, 6)
        # the runner's own scoring through the graph agrees with the fit's evaluate stage (edge-train eval's numbers)
        assert m["image_auroc"] == pytest.approx(rep["image_auroc"], abs=1e-6)
        assert m["f1"] == pytest.approx(rep["f1"], abs=1e-6) and m["threshold"] == pytest.approx(rep["threshold"])
        for key in ("recall", "false_alarm_rate"):  # logged by the fit's evaluate stage since its operating point
            if key in rep:
                assert m[key] == pytest.approx(rep[key], abs=1e-5), key
        assert m["best_f1"] >= m["f1"] and 0 <= m["false_alarm_rate"] <= 1
        assert run["images_per_second"] > 0 and run["fit_seconds"] > 0 and run["input_hw"] == [32, 32]
        assert m["image_auroc"] > 0.8, run  # the planted cracks; chance is 0.5
    row = doc["rows"][0]["image_auroc"]
    assert row["values"] == [pytest.approx(100 * doc["runs"][0]["metrics"]["image_auroc"])] and row["std"] is None
    assert doc["trainer_config"]["padim"] == {"input": {"height": 32, "width": 32}, "export": {"fp16": False},
                                              "codec_augment": {"enabled": False}}  # shipped settings + --size, --set
    assert len(list((keep / "mono-seed0" / "data" / "train" / "good").iterdir())) == 8
    png = cv2.imread(str(keep / "mono-seed0" / "data" / "test" / "defect" / "cell0015.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.ndim == 2  # grey stays single-channel


# A protocol run through the CLI (two fits in subprocesses, 12-22 s idle): `make test-slow`; make test keeps the
# mvtec layout's and table's unit tests above, and one CLI run of the one-class protocol.
@pytest.mark.slow
def test_mvtec_protocol_per_category_with_published_column(tmp_path: Path) -> None:
    """MVTec AD's folders used as they are; the per-category table with PatchCore's published numbers, and the
    runner's metrics equal to what `edge-train eval --json` prints for the same bundle."""
    root = _mvtec_fixture(tmp_path / "mvtec", ("screw", "bottle"))
    out, keep = tmp_path / "result.json", tmp_path / "keep"
    proc = _run_script("--dataset", "mvtec", "--root", str(root), "--model", "patchcore", "--seeds", "1",
                       "--size", "32", "--threads", "1", "--json", str(out), "--keep", str(keep))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert [r["class"] for r in doc["rows"]] == ["bottle", "screw", "mean"]
    assert [r["published"] for r in doc["rows"]] == [100.0, 98.77, pytest.approx((100.0 + 98.77) / 2)]
    mean_line = next(line for line in proc.stdout.splitlines() if line.startswith("patchcore  mean"))
    assert mean_line.split()[-1] == "99.4"
    assert "amazon-science/patchcore-inspection" in proc.stdout and "pixel AUROC" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["bottle", "screw"]  # nothing written into the user's folder
    run = doc["runs"][0]
    assert run["metrics"]["pixel_auroc"] is not None and (run["n_train"], run["n_test_good"]) == (12, 4)
    ev = subprocess.run([sys.executable, "-m", "trainer.cli", "eval", run["bundle"], "--data", str(root / "bottle"),
                         "--out", str(tmp_path / "eval"), "--json"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ev.returncode == 0, ev.stderr
    printed = json.loads(ev.stdout.strip().splitlines()[-1])
    for key in ("image_auroc", "f1", "threshold", "average_precision"):
        assert run["metrics"][key] == pytest.approx(printed[key], abs=1e-6), key


def _run(model: str, cls: str, seed: int, auroc: float, f1: float) -> Any:
    metrics = {"image_auroc": auroc, "average_precision": auroc, "f1": f1, "best_f1": 0.9, "recall": f1,
               "false_alarm_rate": 0.01, "pixel_auroc": None}
    return pr.SurfaceRun(model=model, cls=cls, seed=seed, metrics=metrics, n_train=300, n_test_good=288,
                         n_test_defect=313, fit_seconds=10.0 + seed, trainer_seconds=30.0, images_per_second=40.0,
                         score_batch=16, input_hw=(160, 160), report_metrics={"image_auroc": auroc})


def test_surface_table_mean_std_over_seeds_and_categories() -> None:
    runs = [_run(m, c, s, a + 0.01 * s, 0.1 * s) for m in ("patchcore", "padim")
            for c, a in (("screw", 0.9), ("grid", 0.8)) for s in (0, 1, 2)]
    rows = pr.summarise_surface(runs, ["patchcore", "padim"], ["screw", "grid"], [0, 1, 2], "mvtec")
    assert [(r["model"], r["class"]) for r in rows] == [("patchcore", "screw"), ("patchcore", "grid"),
                                                        ("patchcore", "mean"), ("padim", "screw"), ("padim", "grid"),
                                                        ("padim", "mean")]
    screw = rows[0]
    assert screw["image_auroc"]["values"] == pytest.approx([90.0, 91.0, 92.0])
    assert screw["image_auroc"]["mean"] == pytest.approx(91.0) and screw["image_auroc"]["std"] == pytest.approx(1.0)
    assert screw["pixel_auroc"] == {"values": [None, None, None], "mean": None, "std": None}
    assert screw["published"] == 98.77 and rows[1]["published"] == 97.91 and screw["fit_seconds"] == 11.0
    assert rows[2]["image_auroc"]["values"] == pytest.approx([85.0, 86.0, 87.0])  # per-seed means over categories
    assert rows[2]["published"] == pytest.approx((98.77 + 97.91) / 2)
    assert rows[3]["published"] is None and rows[5]["published"] is None  # PaDiM: only its 15-category mean
    text = pr.format_surface_table(rows, ["command: python benchmarks/protocol.py ..."], ["a note"], "footer", True)
    lines = text.splitlines()
    assert lines[0].startswith("command: ") and "pixel AUROC" not in text  # no run has a pixel AUROC
    assert lines[3].split()[:8] == ["patchcore", "screw", "91.0", "±", "1.0", "91.0", "±", "1.0"]
    assert lines[3].split()[-1] == "98.8" and lines[8].split()[-1] == "n/a"
    assert pr.summarise_surface(runs[:1], ["patchcore"], ["screw"], [0], "elpv")[0]["published"] is None


def _surface_doc(path: Path, seeds: list[int], config: dict[str, Any]) -> Path:
    """A --json file as surface_main writes it (the fields --merge reads), PatchCore on mono."""
    runs = [asdict(_run("patchcore", "mono", s, 0.90 + 0.01 * s, 0.5)) for s in seeds]
    path.write_text(json.dumps({
        "command_line": f"python benchmarks/protocol.py --first-seed {seeds[0]} --seeds {len(seeds)}",
        "settings": {"dataset": "elpv", "seeds": len(seeds), "first_seed": seeds[0]},
        "trainer_config": {"patchcore": config}, "runs": runs, "notes": ["a note"],
        "header": ["command: ...", "mono: 300 train", f"seeds {','.join(map(str, seeds))}; device cpu"]}))
    return path


def test_first_seed_and_merge_make_one_table_of_several_runs(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    settings = pr.parse_args(["--dataset", "elpv", "--cell", "mono", "--model", "patchcore", "--first-seed", "1",
                              "--seeds", "2"])
    assert isinstance(settings, pr.Settings) and settings.seed_list == [1, 2]
    shipped = {"export": {"fp16": False}}
    first = _surface_doc(tmp_path / "seed0.json", [0], shipped)
    more = _surface_doc(tmp_path / "seeds12.json", [1, 2], shipped)
    out = tmp_path / "merged.json"
    assert pr.main(["--merge", str(first), str(more), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seeds 0,1,2; device cpu" in printed and "mono: 300 train" in printed
    row = next(line for line in printed.splitlines() if line.startswith("patchcore"))
    assert row.split()[2:5] == ["91.0", "±", "1.0"]  # AUROC 90, 91, 92 over the three seeds
    assert [r["seed"] for r in json.loads(out.read_text())["runs"]] == [0, 1, 2]
    other = _surface_doc(tmp_path / "other.json", [1, 2], {"export": {"fp16": False}, "epochs": 3})
    (tmp_path / "broken.json").write_text("{")
    for files, says in (([first, first], "patchcore mono seed 0 is in an earlier file too"),
                        ([first, other], "patchcore was trained with other settings"),
                        ([first, tmp_path / "broken.json"], "cannot read it as JSON")):
        assert pr.main(["--merge", *map(str, files)]) == 2
        assert says in capsys.readouterr().err


@pytest.mark.slow
def test_elpv_mono_patchcore_shipped_settings(tmp_path: Path) -> None:
    """The real elpv mono cells, one seed, PatchCore as shipped: ranks well above chance (needs `make elpv`)."""
    if importlib.util.find_spec("elpv_dataset") is None:
        pytest.skip("the elpv dataset is not installed: run `make elpv` (pip install elpv-dataset==1.0.0.post1)")
    out = tmp_path / "result.json"
    proc = _run_script("--dataset", "elpv", "--cell", "mono", "--model", "patchcore", "--seeds", "1",
                       "--json", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(out.read_text())["runs"]
    print(f"elpv mono, PatchCore shipped, seed 0: AUROC {run['metrics']['image_auroc']:.3f}, "
          f"F1 at the shipped threshold {run['metrics']['f1']:.3f}")
    assert (run["n_train"], run["n_test_good"], run["n_test_defect"]) == (300, 288, 313)
    assert run["metrics"]["image_auroc"] > 0.85


# --- few-shot: k good images of one class, several models, one column block per k ----------------------------

def test_few_shot_lays_out_k_plus_the_trainers_holdout() -> None:
    """Exactly k images stay in the model after the trainer's own hold-out split, and the hold-out is the 2 a
    threshold needs; a hold-out fraction that cannot leave exactly k is refused."""
    from trainer.calibrate import split_holdout

    for k in (1, 2, 5, 10, 50):
        fraction = pr.FEW_SHOT_HOLDOUT / (k + pr.FEW_SHOT_HOLDOUT)
        n = pr.shot_files(k, fraction)
        assert n == k + 2
        for seed in range(3):
            fit, hold = split_holdout(n, fraction, seed)
            assert (len(fit), len(hold)) == (k, 2)
    with pytest.raises(UserError, match="--shots 3"):
        pr.shot_files(3, 0.2)  # 5 -> 4 + 1, 7 -> 6 + 1, 8 -> 6 + 2: never 3 in the model with 2 held out


def test_few_shot_draws_are_nested_per_seed_and_the_test_is_one_normals() -> None:
    train_labels = np.repeat(np.arange(3), 40)
    test_labels = np.repeat(np.arange(3), 10)
    splits = {n: pr.plan_split(train_labels, test_labels, 1, "few-shot", 0, None, 12, 3, shot_count=n)
              for n in (3, 7, 12)}
    one_normal = pr.plan_split(train_labels, test_labels, 1, "one-normal", 0, None, 12, 3)
    for n, split in splits.items():
        assert len(split.train_idx) == n and (train_labels[split.train_idx] == 1).all()
        assert split.test_idx.tolist() == one_normal.test_idx.tolist()
        assert split.test_anomalous.tolist() == one_normal.test_anomalous.tolist()
    assert set(splits[3].train_idx) < set(splits[7].train_idx) < set(splits[12].train_idx)  # k=1 among k=5's
    other_seed = pr.plan_split(train_labels, test_labels, 1, "few-shot", 1, None, 12, 3, shot_count=7)
    assert other_seed.train_idx.tolist() != splits[7].train_idx.tolist()
    other_class = pr.plan_split(train_labels, test_labels, 2, "few-shot", 0, None, 12, 3, shot_count=7)
    assert (train_labels[other_class.train_idx] == 2).all()
    with pytest.raises(UserError, match="needs 41 training images"):
        pr.plan_split(train_labels, test_labels, 1, "few-shot", 0, None, None, 3, shot_count=41)


def test_few_shot_trainer_configs() -> None:
    import yaml

    from trainer.config import parse_train_config

    settings = _settings(protocol="few-shot", models=("patchcore", "geom"), shots=(1, 5), train_limit=None,
                         overrides=(("epochs", 3),))
    assert settings.run_models == ("patchcore", "geom")
    assert _settings(models=("patchcore", "geom")).run_models == ("patchcore",)  # one-normal: one model
    for model in ("patchcore", "geom"):
        for k in (1, 5):
            cfg = pr.protocol_config(settings, model, k)
            parsed = parse_train_config(yaml.safe_dump(cfg))
            assert parsed.training.select == "last" and parsed.epochs == 3
            assert parsed.calibration.holdout_fraction == pytest.approx(2 / (k + 2))
    assert pr.protocol_config(settings, "patchcore", 5)["backbone"]["layers"] == [4, 10]  # MODEL_OVERRIDES stay
    for k in (1, 5):  # the whole bank at every k: a 2.5 % coreset of a few images' patches is 1 to 4 of them
        assert pr.protocol_config(settings, "patchcore", k)["patchcore"] == {"coreset_ratio": 1.0}
    assert pr.protocol_config(_settings(protocol="few-shot", overrides=(("patchcore.coreset_ratio", 0.5),)),
                              "patchcore", 5)["patchcore"] == {"coreset_ratio": 0.5}  # --set comes last
    assert "patchcore" not in pr.protocol_config(_settings(), "patchcore")
    assert pr.protocol_config(settings, "geom", 1)["geom"] == {"score": "simple"}  # Dirichlet undefined on 1 image
    assert "geom" not in pr.protocol_config(settings, "geom", 5)
    assert "training" not in pr.protocol_config(_settings(), "patchcore")  # one-normal unchanged


def _shot_cell(model: str, k: int, cls: int, seed: int, auroc: float) -> Any:
    return pr.Cell(cls=cls, seed=seed, image_auroc=auroc, metrics={"image_auroc": auroc}, n_train=k + 2,
                   n_train_pool=6000, n_test=500, n_test_pool=10000, n_test_anomalous=450, seconds=2.0,
                   fit_seconds=1.5, eval_seconds=0.5, model=model, shots=k)


def test_few_shot_table_has_a_column_block_per_k() -> None:
    models, shots, classes, seeds = ("patchcore", "geom"), (1, 5), [0, 6], [0, 1]
    auroc = {("patchcore", 1): 0.70, ("geom", 1): 0.60, ("patchcore", 5): 0.80, ("geom", 5): 0.75}
    cells = [_shot_cell(m, k, c, s, auroc[m, k] + 0.02 * s + 0.01 * (c == 6))
             for s in seeds for c in classes for k in shots for m in models]
    settings = _settings(protocol="few-shot", models=models, shots=shots, train_limit=None, test_limit=500,
                         threads=1)
    summary = pr.summarise_few_shot(cells, classes, seeds, FASHION_MNIST_CLASSES, models, shots)
    train = pr.LabelledImages(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), FASHION_MNIST_CLASSES)
    header = pr.few_shot_header(settings, cells, train)
    text = pr.format_few_shot_table(summary, header, models, shots, [], "footer")
    lines = text.splitlines()
    blocks = lines[lines.index("") + 1]
    titles = lines[lines.index("") + 2]
    assert blocks.split() == ["k", "=", "1", "k", "=", "5"]
    assert titles.split() == ["class", "patchcore", "geom", "patchcore", "geom", "chance"]
    assert blocks.index("k = 5") + len("k = 5") == titles.index("geom", titles.index("geom") + 1) + len("geom")
    row6 = next(line for line in lines if line.startswith("6 Shirt"))
    assert row6.split() == ["6", "Shirt", "72.0", "±", "1.4", "62.0", "±", "1.4", "82.0", "±", "1.4", "77.0", "±",
                            "1.4", "50.0"]
    mean = next(line for line in lines if line.startswith("mean "))
    assert mean.split()[1:4] == ["71.5", "±", "1.4"]  # per-seed means 70.5, 72.5
    assert "hold-out (k = 1: 2, k = 5: 2" in text and "geom at k = 1 only: geom.score=\"simple\" (" in text
    assert "patchcore at every k: patchcore.coreset_ratio=1.0 (" in text
    assert "500 of 10000 test images" in text and "threads 1" in text
    assert "calibration.holdout_fraction=" not in text  # per k, not one value
    doc = pr.report_document(settings, ["protocol.py"], datetime.now(timezone.utc), 1.0, classes,
                             FASHION_MNIST_CLASSES, [], [], cells, summary, header)
    doc = json.loads(json.dumps(doc))
    assert [(e["shots"], e["model"]) for e in doc["rows"][0]["columns"]] == [(1, "patchcore"), (1, "geom"),
                                                                             (5, "patchcore"), (5, "geom")]
    assert doc["rows"][1]["columns"][3]["auroc"] == pytest.approx([76.0, 78.0])
    assert doc["trainer_config"]["geom k=1"]["geom"] == {"score": "simple"} and len(doc["trainer_config"]) == 4


def test_few_shot_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["--dataset", "folder", "--data", str(tmp_path), "--model", "patchcore"]
    for extra, message in ((["--protocol", "one-normal", "--shots", "1,5"], "--shots needs --protocol few-shot"),
                           (["--protocol", "few-shot", "--train-limit", "10"], "--train-limit is not for few-shot"),
                           (["--protocol", "few-shot", "--shots", "0,5"], "--shots 0,5: expected distinct counts"),
                           (["--protocol", "few-shot", "--shots", "5,5"], "--shots 5,5: expected distinct counts")):
        with pytest.raises(SystemExit) as exc:
            pr.main([*base, *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    settings = pr.parse_args([*base, "--protocol", "few-shot", "--models", "padim"])
    assert settings.shots == (1, 5, 10) and settings.run_models == ("patchcore", "padim")


def _few_shot_folder(root: Path) -> Path:
    """Two classes of 32x32 grey parts: 'plain' (a noisy flat surface) and 'spot' (the same with a bright disk)."""
    rng = np.random.default_rng(5)
    for split, n in (("train", 6), ("test", 8)):
        for cls in ("plain", "spot"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = (90 + rng.integers(0, 12, (32, 32))).astype(np.uint8)
                if cls == "spot":
                    cv2.circle(img, tuple(int(v) for v in rng.integers(9, 23, 2)), 5, 230, -1)
                cv2.imwrite(str(root / split / cls / f"{i}.png"), img)
    return root


# A protocol run through the CLI (two fits in subprocesses, 12-22 s idle): `make test-slow`; make test keeps the
# few-shot layout's and table's unit tests above, and one CLI run of the one-class protocol.
@pytest.mark.slow
def test_few_shot_two_models_through_the_cli(tmp_path: Path) -> None:
    """PatchCore and SPADE at k = 1 on a tiny folder, on one shared layout: the trainer fits on exactly the one
    image (its own log line) and holds 2 out; every (k, model) cell in the JSON. (k = 2 too would double the
    test's time; the column blocks per k are test_few_shot_table_has_a_column_block_per_k's.)"""
    data = _few_shot_folder(tmp_path / "data")
    out, keep = tmp_path / "result.json", tmp_path / "keep"
    proc = _run_script("--dataset", "folder", "--data", str(data), "--protocol", "few-shot", "--shots", "1",
                       "--models", "patchcore,spade", "--classes", "0", "--seeds", "1", "--threads", "1",
                       "--json", str(out), "--keep", str(keep), "-v", timeout=300)
    assert proc.returncode == 0, proc.stderr
    for model in ("patchcore", "spade"):
        assert f"fitting {model} on 1 images; 2 held out for calibration" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[lines.index("") + 2].split() == ["class", "patchcore", "spade", "chance"]
    doc = json.loads(out.read_text())
    assert sorted((c["model"], c["shots"], c["n_train"], c["n_test"]) for c in doc["cells"]) == [
        ("patchcore", 1, 3, 16), ("spade", 1, 3, 16)]
    assert len(list((keep / "class0-seed0-k1" / "data" / "train" / "good").iterdir())) == 3
    assert len(list((keep / "class0-seed0-k1" / "data" / "test" / "abnormal").iterdir())) == 8
    assert {p.name for p in (keep / "class0-seed0-k1").iterdir()} == {"data", "engines-patchcore", "engines-spade"}
    for cell in doc["cells"]:
        print(f"{cell['model']} k = {cell['shots']}: AUROC {cell['image_auroc']:.3f}")
        assert cell["image_auroc"] > 0.8, cell  # a bright disk on a flat surface; chance is 0.5
