"""STPM end to end and its two formulas: fitted by ``fit_bundle`` on generated washers (the shared loop, a randomly
initialised Lite0 student against the frozen Lite0 teacher's cached features, codec-robust training on as
shipped), scored through the exported ONNX graph (the issue's bar: image AUROC >= 0.95), the checks every exported
model passes (tests/model_checks.py); then the loss against the official code's ``cal_loss`` and the map against
its ``cal_anomaly_map``, both computed independently here (F.normalize, a summed MSE, bilinear upsampling, product).

Recipe for time: 64 px, 100 parts (80 fitted), 12 epochs at batch 4 and the paper's lr 0.4. A student trained
from scratch generalises by the variety of its images more than by epochs: with 50 parts, 25 epochs at batch 2 gave
image AUROC 0.92-0.94 (64 or 80 px, blur or none, lr 0.2 or 0.4); 100 parts, 12 epochs at batch 4 gave 1.00, in
less time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc, washers

from trainer.config import parse_train_config
from trainer.models import SURFACE_DEFECTS, create_model
from trainer.models.stpm import STUDENT_BN_MOMENTUM, Stpm

SIZE = 64
EPOCHS = 12
CONFIG = f"""model: stpm
input: {{height: {SIZE}, width: {SIZE}}}
epochs: {EPOCHS}
batch_size: 4
training: {{workers: 0}}
export: {{max_batch: 8}}
report: {{overlays: 1}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return washers(tmp_path_factory.mktemp("stpm") / "ds", SIZE, n_train=100)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(CONFIG, parts, tmp_path_factory.mktemp("engines"))


def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    image_auroc, pixel_auroc = image_and_pixel_auroc(bundle, parts, "stpm")
    assert image_auroc >= 0.95  # the bar
    assert pixel_auroc is not None
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert len(fit["history"]) == EPOCHS and fit["feature_cache"]["hits"] > 0  # trained by the loop, teacher cached
    assert fit["history"][-1]["loss"] < 0.5 * fit["history"][0]["loss"]  # the student learnt the teacher's features
    assert fit["taps"] == [2, 4, 7] and 0 < fit["student_parameters"] < 1_000_000  # Lite0 up to block 7 only


def test_parity_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, Stpm.fp32_scopes)


def _model(blur: float = 0.0, statistics: bool = False) -> Stpm:
    """An untrained STPM at 64 px; with ``statistics`` its student's batch norms have seen 20 batches of frames, as
    after training (an untrained student's eval-mode features at block 7 have squared norms near 1e-7, where the
    distance's guard EPS 1e-8 would show; after the statistics they are above 1)."""
    model = create_model("stpm", parse_train_config(f"model: stpm\ninput: {{height: {SIZE}, width: {SIZE}}}\n"
                                                    f"stpm: {{blur_sigma: {blur}}}\n"))
    assert isinstance(model, Stpm) and model.catches == SURFACE_DEFECTS and model.display_name == "STPM"
    if statistics:
        model.student.train()
        with torch.no_grad():
            for _ in range(20):
                model.student(torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8))
    return model


def test_the_loss_is_the_official_cal_loss_and_trains_the_student_alone() -> None:
    model = _model()
    frames = torch.randint(0, 256, (3, SIZE, SIZE, 3), dtype=torch.uint8)
    model.student.train()
    x = model.prepare(frames)
    loss, parts = model.updates()[0].loss(x, {})
    with torch.no_grad():
        teacher = model.teacher(frames)
    student = model.student(frames)
    terms = []
    for t, s in zip(teacher, student, strict=True):  # the official cal_loss: MSELoss(reduction="sum") x 0.5 / (h w)
        h, w = t.shape[-2:]
        terms.append(0.5 / (h * w) * F.mse_loss(F.normalize(s, dim=1), F.normalize(t, dim=1), reduction="sum"))
    value = loss.detach().item()
    assert value == pytest.approx(float(torch.stack(terms).sum().detach()), rel=1e-5)
    assert sum(float(v.detach()) for k, v in parts.items() if k.startswith("level")) == pytest.approx(value, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # the teacher stays frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    norms = [m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == STUDENT_BN_MOMENTUM for m in norms)


@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_the_map_is_the_product_of_the_upsampled_levels_and_the_score_its_max(blur: float) -> None:
    model = _model(blur, statistics=True)
    model.student.eval()
    frames = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = model.export_module()(frames)
        expected = torch.ones(2, 1, SIZE, SIZE)
        for t, s in zip(model.teacher(frames), model.student(frames), strict=True):  # the official cal_anomaly_map
            level = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
            expected = expected * F.interpolate(level, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        if blur:
            assert model.head.blur is not None
            expected = model.head.blur(expected)
        assert torch.allclose(amap, expected[:, 0], rtol=1e-4, atol=1e-9)
        assert torch.allclose(score, expected.flatten(1).amax(1), rtol=1e-4)
        assert torch.allclose(model.raw_score(model.prepare(frames)), score, rtol=1e-5)
        assert model.validation_loss(model.prepare(frames)).shape == (2,)
