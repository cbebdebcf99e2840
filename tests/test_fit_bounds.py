"""Every registered model fits with the shipped settings whatever the data's size: the export bounds a model must
meet are checked from the data's size before anything is fitted (``AnomalyModel.preflight``), so a bound that
cannot be met fails at once, and one the export batch can meet lowers it, never refusing a fit because the
user's data is larger than a test set.

The sizes: the generated washers of `make demo`, the solar-cell protocol (300 functional cells, 240 fitted after
the hold-out), and a 1 000-image set; each doubled by the codec copies the shipped config makes of stills.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.errors import UserError
from trainer.config import load_train_config, parse_train_config
from trainer.degrade import Degradation
from trainer.frames import TrainingData
from trainer.models import create_model, get_model_class, list_models
from trainer.pipeline import fit_bundle
from trainer.stages import fitted_frames
from trainer.synthetic import OBJECT_KINDS, make_dataset

# Training images before the 20 % hold-out: the demo's washers, elpv mono's functional training cells, a large set.
DATA_SIZES = {"washers": 120, "solar cells": 300, "1000 images": 1000}


def _fitted(n_images: int, copies: int, holdout: float) -> int:
    n_fit = n_images - round(n_images * holdout)
    data = TrainingData(fit_paths=[Path(f"{i}.png") for i in range(n_fit)], holdout_paths=[], hw=(64, 64),
                        degradation=Degradation((30, 90), 0.1, 0.1) if copies else None, degraded_copies=copies)
    return fitted_frames(data)


@pytest.mark.parametrize("model", list_models())
def test_shipped_settings_meet_every_bound_for_any_data_size(model: str) -> None:
    """The shipped config/train.yaml, each model at its own default input size, grey (solar cells) and colour."""
    for gray in (False, True):
        cfg = load_train_config()
        cfg.model = model
        cfg.resolve(get_model_class(model).defaults, all_gray=gray)
        instance = create_model(model, cfg)
        for name, n_images in DATA_SIZES.items():
            frames = _fitted(n_images, 0 if cfg.codec_augment.enabled is False else cfg.codec_augment.copies,
                             cfg.calibration.holdout_fraction)
            batch = instance.preflight(frames, cfg.export.max_batch, cfg.export.max_distance_elements)
            print(f"{model} ({'grey' if gray else 'colour'}) on {name} ({frames} frames): export batch {batch}")
            assert 1 <= batch <= cfg.export.max_batch


def test_a_bound_the_data_cannot_meet_fails_before_the_fit(tmp_path: Path) -> None:
    """SPADE keeps every training image's features as graph constants: past an ONNX file's 2 GB it cannot export.
    That is known from the number of images, so the fit refuses at once, naming the limit, not after fitting."""
    cfg = load_train_config()
    cfg.model = "spade"
    cfg.resolve(get_model_class("spade").defaults, all_gray=False)
    spade = create_model("spade", cfg)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"spade: the feature banks of 100000 training images .*\(at most \d+\)"):
        spade.preflight(100_000, cfg.export.max_batch, cfg.export.max_distance_elements)
    assert time.monotonic() - t0 < 1.0
    # Through a fit: a bound not even one frame meets is refused before the features are extracted.
    data = make_dataset(tmp_path / "ds", n_train=10, n_test_good=2, n_test_defect=2, size=64, seed=1,
                        kinds=OBJECT_KINDS)
    tight = parse_train_config("model: spade\ninput: {height: 64, width: 64}\nexport: {max_distance_elements: 1000}\n")
    lines: list[str] = []
    with pytest.raises(UserError, match="one frame's largest intermediate already exceeds"):
        fit_bundle(tight, data, tmp_path / "engines", log=lines.append)
    assert not any(line.startswith("spade:") for line in lines), lines  # nothing was fitted


def test_the_planned_export_batch_is_the_one_the_export_uses(tmp_path: Path) -> None:
    """What preflight plans from the data's size is what the fitted model's bound gives at export."""
    data = make_dataset(tmp_path / "ds", n_train=20, n_test_good=2, n_test_defect=2, size=64, seed=1,
                        kinds=OBJECT_KINDS)
    cfg = parse_train_config("model: spade\ninput: {height: 64, width: 64}\ncodec_augment: {enabled: false}\n"
                             "export: {max_batch: 16, max_distance_elements: 20000}\n")
    lines: list[str] = []
    bundle = fit_bundle(cfg, data, tmp_path / "engines", log=lines.append)
    export = json.loads((bundle / "report.json").read_text())["export"]
    cfg2 = parse_train_config("model: spade\ninput: {height: 64, width: 64}\n")
    cfg2.resolve(get_model_class("spade").defaults)
    planned = create_model("spade", cfg2).preflight(16, 16, 20000)  # 20 images, 4 held out
    assert export["max_batch"] == planned < 16
