"""A model is one file: a toy model written as ONE new file into a temporary package is fitted, exported and
evaluated through the real pipeline, with no other edit anywhere.

The package is found the documented way (trainer/models/base.py): ``EDGE_TRAIN_MODEL_PACKAGES`` names packages
whose modules are model files too. Its settings section loads from YAML with the loader's file:line errors,
and shows in the generated config/train.yaml sections and in ``edge-train fit --help``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from core.bundle import load_bundle
from core.errors import ConfigError
from trainer.cli import model_help
from trainer.config import DEFAULT_CONFIG, load_train_config, parse_train_config, render_train_yaml
from trainer.evaluate import METRIC_KEYS, evaluate_bundle
from trainer.models import PLUGIN_ENV, check_model_name, known_model_names, list_models, unregister_plugin_package
from trainer.pipeline import fit_bundle
from trainer.synthetic import make_dataset

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "toy_models_for_test"
TOY_MODEL = '''"""Mean image (a toy): the average good part; a frame's score is its largest smoothed difference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from trainer.models import SURFACE_DEFECTS, AnomalyModel, ModelDefaults, ModelSettings, register_model, setting


@dataclass
class MeanImageSettings(ModelSettings):
    """Mean image (a toy): how far a frame is from the average good part."""

    blur: int = setting(3, "box blur of the difference map, pixels (odd)")
    gain: float = setting(1.0, "score multiplier")

    def validate(self) -> None:
        if self.blur < 1 or self.blur % 2 == 0:
            raise ValueError("mean_image.blur must be an odd number >= 1")


class MeanImageExport(nn.Module):
    def __init__(self, mean: torch.Tensor, blur: int, gain: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.pool = nn.AvgPool2d(blur, stride=1, padding=blur // 2)
        self.gain = gain

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = (frames.float() - self.mean).abs().mean(-1, keepdim=True).permute(0, 3, 1, 2)
        smooth = self.pool(diff)  # [N, 1, H, W]
        return smooth.amax(dim=(1, 2, 3)) * self.gain, smooth[:, 0]


@register_model("mean-image", settings=MeanImageSettings)
class MeanImage(AnomalyModel):
    """The average good part; score = the largest smoothed per-pixel difference from it."""

    display_name = "Mean Image"
    catches = SURFACE_DEFECTS
    defaults = ModelDefaults(input_size=64, batch_size=8, epochs=None)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: MeanImageSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.mean = torch.zeros(*self.hw, 3)

    def fit(self, data: Any, log: Callable[[str], None] = lambda _m: None, run: Optional[Any] = None) -> dict:
        total, n = torch.zeros(*self.hw, 3, dtype=torch.float64), 0
        for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
            total += frames.double().sum(0)
            n += int(frames.shape[0])
        self.mean = (total / max(n, 1)).float()
        return {"n_train_images": n}

    def export_module(self) -> nn.Module:
        return MeanImageExport(self.mean, self.cfg.blur, self.cfg.gain).eval()

    def map_shape(self) -> tuple[int, int]:
        return self.hw
'''


@pytest.fixture()
def toy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package holding one model file, named in EDGE_TRAIN_MODEL_PACKAGES; forgotten again afterwards."""
    package = tmp_path / "plugins" / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mean_image.py").write_text(TOY_MODEL)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv(PLUGIN_ENV, PACKAGE)
    yield package
    unregister_plugin_package(PACKAGE)
    for module in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[module]


def test_a_model_in_one_new_file_fits_exports_and_evaluates(toy_package: Path, tmp_path: Path) -> None:
    assert "mean-image" in known_model_names()  # from its file name, before anything imports it
    check_model_name("mean-image")
    assert "mean-image" in list_models()

    config_file = tmp_path / "train.yaml"
    config_file.write_text("model: mean-image\nmean_image:\n  blur: 5\n  gain: 2\nexport: {max_batch: 4}\n")
    cfg = load_train_config(config_file)
    assert cfg.settings_for("mean-image").blur == 5 and cfg.settings_for("mean-image").gain == 2.0

    data = make_dataset(tmp_path / "parts", n_train=16, n_test_good=6, n_test_defect=6, size=64, seed=2)
    log: list[str] = []
    bundle_dir = fit_bundle(cfg, data, tmp_path / "engines", log=log.append)

    bundle = load_bundle(tmp_path / "engines" / "mean-image")  # promoted: 'current' points at it
    assert bundle.path == bundle_dir and bundle.model_name == "mean-image"
    assert bundle.input_hw == (64, 64)  # the toy's own default input size
    report = json.loads((bundle_dir / "report.json").read_text())
    assert report["config"]["mean_image"] == {"blur": 5, "gain": 2.0}  # the section travels with the report
    assert report["fit"]["n_train_images"] > 0

    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    score, amap = session.run(None, {"frames": frames})
    assert score.shape == (3,) and amap.shape == (3, 64, 64)

    metrics = evaluate_bundle(bundle_dir, data).metrics
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["n_normal"] == 6 and metrics["n_anomalous"] == 6


def test_the_toy_models_settings_load_check_and_show(toy_package: Path, tmp_path: Path) -> None:
    cfg = parse_train_config("mean_image:\n  gain: 0.5\n")
    assert dataclasses.asdict(cfg)["mean_image"] == {"blur": 3, "gain": 0.5}
    path = tmp_path / "train.yaml"
    path.write_text("seed: 1\nmean_image:\n  blurr: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: unknown key 'mean_image.blurr' \(known keys: blur, gain\)"):
        load_train_config(path)
    path.write_text("mean_image:\n  blur: wide\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: key 'mean_image.blur' must be an integer"):
        load_train_config(path)
    path.write_text("mean_image:\n  blur: 4\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: mean_image.blur must be an odd number"):
        load_train_config(path)

    generated = render_train_yaml(DEFAULT_CONFIG.read_text())
    assert "mean_image:\n  # Mean image (a toy): how far a frame is from the average good part.\n" in generated
    assert "  blur: 3                 # box blur of the difference map, pixels (odd)\n" in generated
    assert "  gain: 1.0               # score multiplier\n" in generated
    assert parse_train_config(generated).settings_for("mean-image").blur == 3  # the generated file loads

    assert "mean-image (Mean Image)" in model_help() and "mean_image: blur=3, gain=1.0" in model_help()


def test_fit_help_lists_a_model_from_the_environments_package(toy_package: Path) -> None:
    env = {**os.environ, PLUGIN_ENV: PACKAGE,
           "PYTHONPATH": os.pathsep.join([str(toy_package.parent), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mean-image (Mean Image)" in proc.stdout
    assert "mean_image: blur=3, gain=1.0" in proc.stdout


def test_a_missing_model_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGIN_ENV, "no_such_model_package_here")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", "nowhere", "--model", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edge-train: error: model package 'no_such_model_package_here' ({PLUGIN_ENV} or register_plugin_package) "
        "is not an importable package; put it on PYTHONPATH or remove it"]
