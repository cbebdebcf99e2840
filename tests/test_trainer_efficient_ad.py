"""EfficientAD end to end and its parts: fitted by ``fit_bundle`` on generated washers (both stages on the shared
loop: the teacher PDN distilled from Lite0's taps, then the student and the autoencoder), scored through the
exported ONNX graph (the issue's bar: image AUROC >= 0.95), FP32/FP16 parity, TensorRT readiness and any batch
(tests/model_checks.py); and against independent computations: the hard feature loss (numpy's quantile), the
map (the paper's formula written out), the autoencoder's augmentation (PIL's ImageEnhance, what torchvision's
ColorJitter runs on images), the penalty, and the one-line errors of ``efficient_ad.imagenet_dir``.

Recipe for time (make test): 64 px washers, 15 parts (12 fitted), batch 1 (the paper's), codec copies off, teacher
1 epoch and student 2: the fit checks the exported graph (parity, FP16 order, TensorRT readiness, any batch), not
the accuracy; 17 s of CPU for the file (user + sys; 86 s of wall time on the 2-core VM at load average 11). The
issue's bar (image AUROC >= 0.95) is a slow test at 96 px (64 px plateaus near 0.8): 80 washers fitted (20 held out),
teacher 10 + student 38 epochs (3 040 steps), the last epoch kept: 0.958 through the ONNX graph (pixel 0.938), 752 s
of wall time at load average 4 (the measured table is in trainer/models/efficient_ad.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc, washers
from PIL import Image, ImageEnhance

from core.errors import UserError
from trainer.config import parse_train_config
from trainer.flows import pack_maps
from trainer.models import SURFACE_DEFECTS, create_model
from trainer.models.efficient_ad import (
    CHANNELS,
    PDN,
    Autoencoder,
    EfficientAd,
    color_jitter,
    hard_feature_loss,
    natural_images,
    pdn_grid,
)

SIZE = 64  # the fast fit (make test): the exported graph's checks, not the accuracy bar
TEACHER_EPOCHS = 1
EPOCHS = 2
SLOW_SIZE = 96  # the accuracy bar's fit (make test-slow): 64 px plateaus near 0.8 (8x8 grid), see the model
SLOW_TEACHER_EPOCHS = 10
SLOW_TRAIN = 100  # 80 fitted, 20 held out (the map's quantiles and the threshold)
SLOW_EPOCHS = 38  # 80 fitted washers at batch 1: 3 040 student steps


def config(size: int, teacher_epochs: int, epochs: int) -> str:
    return f"""model: efficient-ad
input: {{height: {size}, width: {size}}}
epochs: {epochs}
batch_size: 1
training: {{workers: 0}}
codec_augment: {{enabled: false}}
efficient_ad: {{teacher_epochs: {teacher_epochs}}}
export: {{max_batch: 4}}
report: {{overlays: 1}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return washers(tmp_path_factory.mktemp("efficient_ad") / "ds", SIZE, n_train=15, n_test=10)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(config(SIZE, TEACHER_EPOCHS, EPOCHS), parts, tmp_path_factory.mktemp("engines"))


def small_model(size: int = 64, extra: str = "") -> EfficientAd:
    model = create_model("efficient-ad", parse_train_config(
        f"model: efficient-ad\ninput: {{height: {size}, width: {size}}}\n{extra}"))
    assert isinstance(model, EfficientAd)
    return model


def test_both_stages_ran_on_the_loop_and_the_bundle_passes_every_check(bundle: Path, parts: Path) -> None:
    image_auroc, pixel_auroc = image_and_pixel_auroc(bundle, parts, "efficient-ad (fast fit)")
    assert 0.0 <= image_auroc <= 1.0 and pixel_auroc is not None
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert len(fit["history"]) == EPOCHS and fit["teacher_selected_epoch"] <= TEACHER_EPOCHS  # both stages ran
    assert (fit["selection_rule"], fit["selected_epoch"]) == ("last", EPOCHS)  # the paper's: no validation choice
    assert fit["teacher_images"] == fit["n_train_images"] and fit["penalty"] is False  # no imagenet_dir
    assert fit["feature_cache"]["hits"] > 0
    check_exported_bundle(bundle, parts, SIZE, EfficientAd.fp32_scopes)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 12 minutes of CPU
def test_accuracy_bar_through_the_onnx_graph(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    parts = washers(tmp_path / "ds", SLOW_SIZE, n_train=SLOW_TRAIN)
    bundle = fit_on_washers(config(SLOW_SIZE, SLOW_TEACHER_EPOCHS, SLOW_EPOCHS), parts, tmp_path / "engines")
    image_auroc, _pixel = image_and_pixel_auroc(bundle, parts, "efficient-ad")
    assert image_auroc >= 0.95  # the bar


def test_the_hard_feature_loss_is_the_mean_above_the_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 384, 7, 9, generator=gen), torch.randn(2, 384, 7, 9, generator=gen)
    d = ((teacher - student) ** 2).numpy().astype(np.float64).ravel()
    threshold = np.quantile(d, 0.999)
    expected = d[d >= threshold].mean()
    assert hard_feature_loss(teacher, student).item() == pytest.approx(expected, rel=1e-5)
    assert 0 < (d >= threshold).sum() <= 0.001 * d.size + 1
    assert hard_feature_loss(teacher, student, 0.0).item() == pytest.approx(d.mean(), rel=1e-5)


def test_the_shapes_are_the_papers_at_256_px() -> None:
    assert pdn_grid((256, 256)) == (56, 56) and pdn_grid((256, 256), padded=True) == (64, 64)
    ae = Autoencoder((256, 256), (56, 56))
    assert ae.bottleneck.kernel_size == (8, 8)  # the paper's last encoder conv at 256 px
    with torch.no_grad():
        assert ae.eval()(torch.zeros(1, 3, 256, 256)).shape == (1, CHANNELS, 56, 56)
    # the PDN-S's weights, layer by layer (kernel x kernel x in x out + bias)
    expected = (16 * 3 * 128 + 128) + (16 * 128 * 256 + 256) + (9 * 256 * 256 + 256) + (16 * 256 * 384 + 384)
    assert sum(p.numel() for p in PDN(CHANNELS).parameters()) == expected


def test_the_map_is_the_papers_formula_and_the_score_its_max() -> None:
    model = small_model()
    assert model.catches == SURFACE_DEFECTS and model.display_name == "EfficientAD"
    gen = torch.Generator().manual_seed(1)
    model.head.mean.copy_(torch.randn(1, CHANNELS, 1, 1, generator=gen))
    model.head.std.copy_(torch.rand(1, CHANNELS, 1, 1, generator=gen) + 0.5)
    model.head.quantiles.copy_(torch.tensor([0.5, 2.0, 0.1, 0.4]))
    frames = torch.randint(0, 256, (2, 64, 64, 3), generator=gen, dtype=torch.uint8)
    graph = model.export_module()
    with torch.no_grad():
        score, amap = graph(frames)
        rgb = frames.float().flip(-1) / 255.0  # BGR -> RGB in [0, 1], then ImageNet's normalisation
        x = ((rgb - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).permute(0, 3, 1, 2)
        t = (model.teacher(x) - model.head.mean) / model.head.std
        s = model.student(x)
        a = model.autoencoder(x)
        local = ((t - s[:, :384]) ** 2).mean(1, keepdim=True)
        glob = ((a - s[:, 384:]) ** 2).mean(1, keepdim=True)
        combined = 0.5 * 0.1 * (local - 0.5) / 1.5 + 0.5 * 0.1 * (glob - 0.1) / 0.3
        expected = F.interpolate(F.pad(combined, (4, 4, 4, 4)), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(amap, expected[:, 0], atol=1e-5)
    assert torch.allclose(score, expected.flatten(1).amax(1), atol=1e-5)
    cached = pack_maps([model.image(frames), model.teacher(model.image(frames))])
    with torch.no_grad():
        assert torch.allclose(model.raw_score(cached), combined.flatten(1).amax(1), atol=1e-5)


def test_the_augmentation_is_colorjitters_formula() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    pil = Image.fromarray(image)
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    for kind, enhancer in enumerate((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)):
        for factor in (0.8, 1.17):
            expected = np.asarray(enhancer(pil).enhance(factor), dtype=np.float64) / 255.0
            out = color_jitter(rgb, torch.tensor([kind]), torch.tensor([factor]))[0].permute(1, 2, 0).numpy()
            # PIL rounds to uint8 (and its contrast to an integer mean grey): within 2 levels
            assert np.abs(out - expected).max() <= 2.5 / 255.0, (kind, factor)


def test_the_penalty_is_the_students_squared_output_on_a_natural_image(tmp_path: Path) -> None:
    model = small_model()
    natural = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    model.penalty_frames = natural
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.manual_seed(3)
    with torch.no_grad():
        _loss, parts = model._loss(model.prepare(frames), {})
        expected = (model.student(model.image(natural))[:, :CHANNELS] ** 2).mean()
    assert parts["penalty"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(sum(parts[k].item() for k in ("hard", "penalty", "ae", "st_ae")),
                                                 rel=1e-5)


def test_imagenet_dir_missing_or_empty_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        natural_images(str(tmp_path / "nowhere"), 10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images"):
        natural_images(str(tmp_path / "empty"), 10)
    folder = tmp_path / "natural"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert [p.name for p in natural_images(str(folder), 2)] == ["0.png", "1.png"]
