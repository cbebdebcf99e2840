"""edge-train as a user runs it (subprocess): fit -> promoted bundle, eval --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.bundle import load_bundle
from trainer.evaluate import METRIC_KEYS
from trainer.synthetic import make_dataset

REPO = Path(__file__).resolve().parent.parent
SMALL = "input: {height: 128, width: 128}\nexport: {max_batch: 8}\n"


def edge_train(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("edge-train: error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "train.yaml"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cli") / "ds", n_train=30, n_test_good=10, n_test_defect=16,
                        size=128, seed=3)


@pytest.fixture(scope="module")
def fitted(dataset, config, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    engines = tmp_path_factory.mktemp("engines")
    proc = edge_train("fit", "--data", dataset, "--out", engines, "--config", config, "--epochs", "5", "--seed", "1")
    return proc, engines


def test_fit_prints_bundle_path_last_and_promotes(fitted) -> None:
    proc, engines = fitted
    assert proc.returncode == 0, proc.stderr
    bundle_path = Path(proc.stdout.strip().splitlines()[-1])
    bundle = load_bundle(engines / "patchcore")  # via 'current'
    assert bundle.path == bundle_path
    m = bundle.manifest
    assert bundle.input_hw == (128, 128) and m["input"]["max_batch"] == 8
    assert bundle.output_names == ["score", "anomaly_map"]
    cal = m["calibration"]
    assert cal["method"] == "false-alarm-rate" and cal["threshold"] > cal["normal_median"]
    assert m["training_data"]["count"] == 30 and len(m["training_data"]["sha256"]) == 64
    for key in METRIC_KEYS:
        assert key in m["metrics"]
    assert bundle.onnx_fp16_path is not None
    fp16 = m["fp16"]  # what the FP16 graph keeps in FP32, for readers and for TensorRT 8.6's FP16-flag build
    assert fp16["fp32_scopes"] == ["/distance/"] and "MatMul" in fp16["fp32_ops"] and fp16["fp32_nodes"]
    for name in ("report.json", "roc.png", "pr.png", "score_histogram.png", "hardest_cases.png"):
        assert name in m["files"], name
    report = json.loads((bundle.path / "report.json").read_text())
    assert report["parity"]["onnx_fp16"]["score_max_rel_diff"] < 1e-2
    assert any("epochs" in note for note in report["notes"])
    assert "epochs=5 ignored" in proc.stderr
    assert not list(bundle.path.rglob("*.pkl")) and not list(bundle.path.rglob("*.pt"))


def test_check_engine_on_the_fitted_bundle(fitted, dataset) -> None:
    """TensorRT readiness of a bundle as fit wrote it, at its max batch, with FP16 parity on DIR/test."""
    proc, engines = fitted
    check = edge_train("check-engine", engines / "patchcore", "--data", dataset)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "model.onnx: ready" in check.stdout and "model.fp16.onnx: ready" in check.stdout
    assert check.stdout.strip().splitlines()[-1] == "TensorRT readiness at batch 8: ready"


def test_eval_json(fitted, dataset) -> None:
    proc, engines = fitted
    out = edge_train("eval", engines / "patchcore", "--data", dataset, "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["n_normal"] == 10 and metrics["n_anomalous"] == 16
    assert metrics["image_auroc"] >= 0.95
    print("eval --json:", metrics)


def test_rerun_evaluate_and_report_gives_the_fits_metrics(fitted, dataset, tmp_path) -> None:
    """`edge-train rerun` scores DIR/test through the bundle's ONNX graph: the fit's metrics, the bundle untouched."""
    proc, engines = fitted
    bundle = load_bundle(engines / "patchcore")
    before = {p.name: p.read_bytes() for p in bundle.path.iterdir() if p.is_file()}
    out = edge_train("rerun", engines / "patchcore", "--data", dataset, "--out", tmp_path / "again", "--json")
    assert out.returncode == 0, out.stderr
    rerun = json.loads(out.stdout)
    fitted_metrics = json.loads((bundle.path / "report.json").read_text())["metrics"]
    for key in METRIC_KEYS:
        assert rerun["metrics"][key] == pytest.approx(fitted_metrics[key], abs=1e-6), key
    assert (tmp_path / "again" / "report.json").is_file()
    assert {p.name: p.read_bytes() for p in bundle.path.iterdir() if p.is_file()} == before
    refused = edge_train("rerun", engines / "patchcore", "--data", dataset, "--stages", "export")
    assert_one_line_error(refused, "export")


def test_missing_data_dir(tmp_path, config) -> None:
    proc = edge_train("fit", "--data", tmp_path / "nope", "--out", tmp_path / "e", "--config", config)
    assert_one_line_error(proc, "nope", "data folder not found")
    assert proc.stdout == ""


def test_empty_train_good(tmp_path, config) -> None:
    (tmp_path / "ds" / "train" / "good").mkdir(parents=True)
    proc = edge_train("fit", "--data", tmp_path / "ds", "--out", tmp_path / "e", "--config", config)
    assert_one_line_error(proc, "train/good", "no images")


def test_unreadable_image(tmp_path, config) -> None:
    good = tmp_path / "ds" / "train" / "good"
    good.mkdir(parents=True)
    (good / "bad.jpg").write_bytes(b"garbage")
    proc = edge_train("fit", "--data", tmp_path / "ds", "--out", tmp_path / "e", "--config", config)
    assert_one_line_error(proc, "bad.jpg", "cannot read")


def test_unknown_config_key(tmp_path, dataset) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("seed: 1\ncalibration:\n  quantle: 0.9\n")
    proc = edge_train("fit", "--data", dataset, "--out", tmp_path / "e", "--config", cfg)
    assert_one_line_error(proc, f"{cfg}:3:", "calibration.quantle")


def test_unknown_model(tmp_path, dataset, config) -> None:
    proc = edge_train("fit", "--data", dataset, "--out", tmp_path / "e", "--config", config, "--model", "resnet9000")
    assert_one_line_error(proc, "unknown model 'resnet9000'", "patchcore")
    assert not (tmp_path / "e").exists()


def test_eval_missing_bundle(tmp_path, dataset) -> None:
    proc = edge_train("eval", tmp_path / "no-bundle", "--data", dataset, "--json")
    assert_one_line_error(proc, "no-bundle")


def test_usage_error_is_one_line() -> None:
    proc = edge_train("fit")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "edge-train fit: error: the following arguments are required: --data (see --help)"]


def _truncated_copy(dataset: Path, tmp_path: Path, names: tuple[str, ...]) -> Path:
    """A copy of train/good with the PNGs ``names`` cut to half their bytes (their headers still read)."""
    data = tmp_path / "ds"
    good = data / "train" / "good"
    good.mkdir(parents=True)
    for p in sorted((dataset / "train" / "good").iterdir()):
        good.joinpath(p.name).write_bytes(p.read_bytes()[:p.stat().st_size // 2] if p.name in names else p.read_bytes())
    return data


def test_a_truncated_png_is_one_line_before_training(tmp_path, dataset) -> None:
    """A half-copied PNG (its header whole) stops the fit at the data check, in one line naming it, even for a
    model whose images are read by DataLoader workers (issue 21 A: it was a worker traceback mid-training)."""
    data = _truncated_copy(dataset, tmp_path, ("003.png",))
    cfg = tmp_path / "train.yaml"
    cfg.write_text("input: {height: 64, width: 64}\ntraining: {workers: 2}\n")
    proc = edge_train("fit", "--data", data, "--out", tmp_path / "e", "--config", cfg, "--model", "ganomaly",
                      "--epochs", "1", "--batch-size", "2")
    assert_one_line_error(proc, "003.png", "cannot decode", "fix or remove")
    assert "training ganomaly" not in proc.stderr  # refused before any training
    assert not (tmp_path / "e" / "ganomaly" / "current").exists()


def test_several_truncated_images_are_named_in_one_line(tmp_path, dataset, config) -> None:
    data = _truncated_copy(dataset, tmp_path, ("001.png", "004.png", "007.png"))
    proc = edge_train("fit", "--data", data, "--out", tmp_path / "e", "--config", config)
    assert_one_line_error(proc, "3 images", "001.png", "004.png", "007.png", "fix or remove")


def test_resume_of_a_model_not_trained_by_epochs_is_refused(tmp_path, dataset, config) -> None:
    """--resume has nothing to continue for the default (pretrained-feature) model: one line, not silence
    (issue 21 G)."""
    proc = edge_train("fit", "--data", dataset, "--out", tmp_path / "e", "--config", config, "--resume")
    assert_one_line_error(proc, "--resume", "patchcore", "not trained by epochs")
    assert not (tmp_path / "e").exists()
