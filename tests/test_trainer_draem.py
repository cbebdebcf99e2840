"""DRAEM end to end and its parts: fitted by ``fit_bundle`` on generated washers (the training images as the
anomalies' textures, the default), scored through the exported ONNX graph, the shared export checks (FP32 parity,
FP16 order, TensorRT readiness, any batch); the Perlin mask, the blend formula, the focal and SSIM losses against
their formulas, SSPCAB's masked convolution (blind at its centre, equal to the official four sub-kernel
convolutions) and its loss in the loop's, the score as the maximum of the mean-filtered map, the graph's BGR
[0, 1] input, and the texture sources (a folder, the training images, procedural).

Recipe for time: 64 px, 50 washers (40 fitted), widths 16 and 8, batch 8, lr 1e-3, 80 epochs (400 steps): image
AUROC 0.963, pixel 0.948 (measured on this draw: 50 epochs 0.902, 70 0.915, 80 0.963, 100 0.982, 200 0.980; over 3
seeds of benchmarks/accuracy_synthetic.py at 80 epochs 0.972 +- 0.016). The fit takes 59 s, the file 64 s of CPU
and 67 s of wall time at load average 1-2 (113 s at 8): the fewest epochs measured that reach the bar. That fit
runs in `make test-slow`; `make test`'s export checks use a 20-epoch fit of the same parts (18 s idle).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc, washers

from core.errors import UserError
from trainer.config import parse_train_config
from trainer.frames import TrainingData
from trainer.models import SURFACE_DEFECTS, RunOptions, create_model
from trainer.models.draem import (
    FOCAL_SMOOTH,
    Draem,
    MapScore,
    MaskedConv,
    Sspcab,
    blend_anomaly,
    focal_loss,
    perlin_mask,
    perlin_noise,
    rand_perlin_2d,
    rotate,
    score_window,
    ssim,
    synthesize,
)
from trainer.synthetic import make_dataset

SIZE = 64
EPOCHS = 80  # 400 steps: the fewest of those measured (50, 70, 80, 100, 200) that reach the bar here
CHECK_EPOCHS = 20  # the export checks' fit (make test); the bar's is EPOCHS (make test-slow)


def config(epochs: int) -> str:
    return f"""model: draem
input: {{height: {SIZE}, width: {SIZE}}}
epochs: {epochs}
batch_size: 8
training: {{workers: 0}}
draem: {{rec_width: 16, disc_width: 8}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return washers(tmp_path_factory.mktemp("draem") / "ds", SIZE)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short fit for the export's checks (the graph is the same after 20 epochs as after 80)."""
    torch.set_num_threads(1)
    return fit_on_washers(config(CHECK_EPOCHS), parts, tmp_path_factory.mktemp("engines"))


# The bar needs the 80-epoch fit (about 60 s on an idle core): `make test-slow`.
@pytest.mark.slow
def test_accuracy_through_the_onnx_graph(parts: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    bundle = fit_on_washers(config(EPOCHS), parts, tmp_path / "engines")
    image, pixel = image_and_pixel_auroc(bundle, parts, "draem")
    assert image >= 0.95  # the bar
    assert pixel is not None and pixel > 0.9  # the map points at the defects
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert fit["textures"] == "self" and not fit["sspcab"] and len(fit["history"]) == EPOCHS
    first, kept = fit["history"][0], fit["history"][fit["selected_epoch"] - 1]
    assert kept["focal"] < first["focal"] / 4 and kept["l2"] < first["l2"] / 4  # both networks learnt


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, Draem.fp32_scopes)


def _small_model(extra: str = "", size: int = 64) -> Draem:
    model = create_model("draem", parse_train_config(
        f"model: draem\ninput: {{height: {size}, width: {size}}}\nepochs: 2\nbatch_size: 4\ntraining: {{workers: 0}}\n"
        f"draem: {{rec_width: 4, disc_width: 4{', ' + extra if extra else ''}}}\n"))
    assert isinstance(model, Draem)
    return model


# -- the anomaly source ---------------------------------------------------------------------------------------
def test_perlin_noise_is_zero_on_its_lattice_and_the_mask_its_rotated_threshold() -> None:
    rng = np.random.default_rng(0)
    noise = rand_perlin_2d((64, 64), (4, 8), rng)
    assert noise.shape == (64, 64) and np.abs(noise).max() <= np.sqrt(2) + 1e-9 and noise.std() > 0.1
    assert np.allclose(noise[::16, ::8], 0.0)  # gradient noise vanishes at the lattice points
    assert perlin_noise((40, 72), (32, 32), rng).shape == (40, 72)  # sizes its scale does not divide
    for seed in range(6):
        mask = perlin_mask((64, 96), np.random.default_rng(seed))
        assert mask.shape == (64, 96) and mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        # the same draws by hand: scales 2^0..2^5 per axis, noise, rotation by U(-90, 90), threshold 0.5
        rng = np.random.default_rng(seed)
        res = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        noise = rotate(perlin_noise((64, 96), res, rng).astype(np.float32), float(rng.uniform(-90, 90)))
        assert np.array_equal(mask, (noise > 0.5).astype(np.float32))
    shares = [perlin_mask((64, 64), np.random.default_rng(s)).mean() for s in range(40)]
    assert 0.02 < float(np.mean(shares)) < 0.4  # patches, neither nothing nor everything


def test_the_anomaly_is_the_papers_blend_inside_the_mask_and_half_stay_normal() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((32, 32, 3)).astype(np.float32)
    texture = rng.random((32, 32, 3)).astype(np.float32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:20, 4:30] = 1
    out = blend_anomaly(image, texture, mask, 0.25)
    assert np.array_equal(out[mask == 0], image[mask == 0])  # outside the mask: the image
    assert np.allclose(out[mask == 1], 0.75 * texture[mask == 1] + 0.25 * image[mask == 1], atol=1e-6)
    # synthesize: the mask it returns is where the image changed; beta within the opacity range
    uint8_texture = (texture * 255).round().astype(np.uint8)
    anomalous = 0
    for seed in range(60):
        aug, m = synthesize(image, uint8_texture, np.random.default_rng(seed), 0.5, (0.1, 1.0))
        if not m.any():
            assert np.array_equal(aug, image)
            continue
        anomalous += 1
        assert np.array_equal(aug[m == 0], image[m == 0])
        t = uint8_texture.astype(np.float32)[m == 1] / 255
        beta = ((aug[m == 1] - t) / (image[m == 1] - t + 1e-12))  # aug = beta img + (1 - beta) T inside
        well_posed = np.abs(image[m == 1] - t) > 0.2
        assert 0.1 - 1e-3 <= np.median(beta[well_posed]) <= 1.0 + 1e-3
    assert 15 <= anomalous <= 45  # about half (the official no-anomaly chance 0.5)
    never, _ = synthesize(image, uint8_texture, np.random.default_rng(0), 0.0, (0.1, 1.0))
    assert np.array_equal(never, image)


def test_texture_sources_folder_self_and_procedural(tmp_path: Path) -> None:
    folder = tmp_path / "textures" / "striped"
    folder.mkdir(parents=True)
    stripes = np.zeros((50, 70, 3), np.uint8)
    stripes[::4] = (0, 0, 255)
    cv2.imwrite(str(folder / "a.jpg"), stripes)
    (folder / "notes.txt").write_text("not an image")
    x = torch.full((3, 3, 64, 64), 0.5)
    x[1] = 0.2
    for source in ("procedural", "self", str(tmp_path / "textures")):
        model = _small_model(f"textures: '{source}', anomaly_share: 1.0")
        clean, augmented, masks = model.anomalies(x, np.random.default_rng(3))
        assert clean.shape == augmented.shape == (3, 3, 64, 64) and masks.shape == (3, 1, 64, 64)
        changed = (augmented - clean).abs().amax(1, keepdim=True) > 1e-6
        assert bool((changed <= (masks > 0)).all()) and bool(changed.any())  # only inside the masks, somewhere
    assert len(_small_model(f"textures: '{tmp_path / 'textures'}'").texture_paths) == 1
    for bad in (tmp_path / "missing", folder / "a.jpg", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="draem.textures"):
            _small_model(f"textures: '{bad}'")


# -- the losses and the score ---------------------------------------------------------------------------------
def test_focal_loss_is_the_official_formula() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 5, 7) * 3, 1)
    target = (torch.rand(2, 1, 5, 7) > 0.7).float()
    p_true = torch.where(target[:, 0] > 0, probs[:, 1], probs[:, 0])
    pt = p_true * (1 - FOCAL_SMOOTH) + (1 - p_true) * FOCAL_SMOOTH + FOCAL_SMOOTH  # clamped one-hot, + smooth
    expected = (-(1 - pt) ** 2 * torch.log(pt)).flatten(1).mean(1)
    assert torch.allclose(focal_loss(probs, target), expected, atol=1e-7)
    plain = (-(1 - p_true) ** 2 * torch.log(p_true)).flatten(1).mean(1)  # the textbook focal loss, gamma 2
    assert torch.allclose(focal_loss(probs, target), plain, rtol=0.02)  # the smoothing moves it little
    confident = torch.stack([1 - target[:, 0], target[:, 0]], 1)
    assert focal_loss(confident, target).max() < 1e-8  # right and sure: no loss
    assert focal_loss(1 - confident, target).min() > 5  # wrong and sure: a large one


def test_ssim_loss_of_identical_images_is_zero_and_grows_with_the_difference() -> None:
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32)
    assert torch.allclose(1 - ssim(a, a), torch.zeros(2), atol=1e-6)
    slightly, very = (a + 0.05 * torch.randn_like(a)).clamp(0, 1), torch.rand(2, 3, 32, 32)
    assert (1 - ssim(a, slightly) > 0).all() and (1 - ssim(a, slightly) < 1 - ssim(a, very)).all()


def test_the_score_is_the_max_of_the_mean_filtered_anomaly_channel() -> None:
    assert [score_window(0, (s, s)) for s in (64, 96, 160, 256)] == [5, 7, 13, 21]  # 21 at 256 px, scaled
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 16, 20)
    score, amap = MapScore(5)(logits)
    p = torch.softmax(logits, 1)[:, 1].numpy()
    assert np.allclose(amap.numpy(), p, atol=1e-6)  # the map: the anomaly channel at full resolution
    padded = np.pad(p, ((0, 0), (2, 2), (2, 2)))  # zeros counted, as avg_pool2d's default
    means = np.stack([[[padded[n, i:i + 5, j:j + 5].mean() for j in range(20)] for i in range(16)]
                      for n in range(3)])
    assert np.allclose(score.numpy(), means.reshape(3, -1).max(1), atol=1e-6)
    assert not np.allclose(score.numpy(), p.reshape(3, -1).max(1), atol=1e-3)  # not the raw map's peak


def test_the_graph_scales_bgr_frames_to_0_1_without_reordering() -> None:
    model = _small_model()
    assert model.catches == SURFACE_DEFECTS
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = model.prepare(frames)
    assert torch.allclose(x, frames.permute(0, 3, 1, 2).float() / 255)  # channel 0 stays blue
    module = model.export_module()
    with torch.no_grad():
        score, amap = module(frames)
        rec = model.reconstructive(x)
        probs = torch.softmax(model.discriminative(torch.cat([rec, x], 1)), 1)
    assert amap.shape == (2, 64, 64) and torch.allclose(amap, probs[:, 1], atol=1e-6)
    assert torch.allclose(score, model.raw_score(x), atol=1e-6)


# -- SSPCAB ---------------------------------------------------------------------------------------------------
def test_sspcab_masked_convolution_is_blind_at_its_centre_and_the_official_four_convolutions() -> None:
    torch.manual_seed(0)
    conv = MaskedConv(4, 1, 1)
    x = torch.randn(1, 4, 12, 12)
    base = conv(x)
    for dy, dx in ((0, 0), (1, 0), (-1, 1)):  # the centre and the masked ring around it
        changed = x.clone()
        changed[:, :, 6 + dy, 6 + dx] += 10
        assert torch.allclose(conv(changed)[:, :, 6, 6], base[:, :, 6, 6], atol=1e-6)
    corner = x.clone()
    corner[:, :, 8, 8] += 10  # a sub-kernel's position (k + d = 2 away): seen
    assert not torch.allclose(conv(corner)[:, :, 6, 6], base[:, :, 6, 6], atol=1e-3)
    # the official forward: zero-pad by k + d, four k x k convolutions of crops shifted by k + 2d + 1, summed
    w, b, pad, border = conv.weight, conv.bias, 2, 4
    xp = F.pad(x, (pad, pad, pad, pad))
    official = (F.conv2d(xp[:, :, :-border, :-border], w[..., :1, :1], b)
                + F.conv2d(xp[:, :, border:, :-border], w[..., -1:, :1])
                + F.conv2d(xp[:, :, :-border, border:], w[..., :1, -1:])
                + F.conv2d(xp[:, :, border:, border:], w[..., -1:, -1:]))
    assert torch.allclose(base, official, atol=1e-5)
    block = Sspcab(16)
    y = block(torch.randn(2, 16, 6, 6))
    assert y.shape == (2, 16, 6, 6) and (y >= 0).all()  # ReLU, then channel weights in (0, 1)


def test_sspcab_replaces_the_encoders_last_block_and_its_loss_is_in_the_loops() -> None:
    off, on = _small_model(), _small_model("sspcab: true")
    assert isinstance(on.reconstructive.block5, Sspcab) and not isinstance(off.reconstructive.block5, Sspcab)
    x = torch.rand(4, 3, 64, 64)
    torch.manual_seed(5)
    loss, parts = on._loss(x, {})
    assert parts["sspcab"] > 0
    expected = parts["l2"] + parts["ssim"] + parts["focal"] + 0.1 * parts["sspcab"]
    assert torch.allclose(loss, expected) and torch.allclose(parts["loss"], expected)
    loss.backward()
    assert on.reconstructive.block5.masked.weight.grad is not None  # trained through the loop's loss
    torch.manual_seed(5)
    loss_off, parts_off = off._loss(x, {})
    assert "sspcab" not in parts_off
    assert torch.allclose(loss_off, parts_off["l2"] + parts_off["ssim"] + parts_off["focal"])


def test_a_short_fit_with_sspcab_logs_its_loss_and_bad_sizes_are_one_line(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    root = make_dataset(tmp_path / "ds", n_train=10, n_test_good=1, n_test_defect=1, size=64, seed=3)
    good = sorted((root / "train" / "good").glob("*.png"))
    data = TrainingData(fit_paths=good[:8], holdout_paths=good[8:], hw=(64, 64), workers=0, seed=0)
    lines: list[str] = []
    fit = _small_model("sspcab: true, textures: self").fit(data, lines.append,
                                                          RunOptions(device="cpu", amp=False, progress=False))
    assert fit["sspcab"] and fit["textures"] == "self" and all("sspcab" in row for row in fit["history"])
    assert any("the training images" in line and "SSPCAB on" in line for line in lines)
    with pytest.raises(UserError, match="multiples of 32"):
        _small_model(size=80)


@pytest.mark.parametrize("bad", ["draem: {opacity: [0.5, 0.2]}", "draem: {score_window: 4}", "draem: {rec_width: 0}",
                                 "draem: {anomaly_share: 1.5}"])
def test_bad_settings_are_one_line(bad: str) -> None:
    with pytest.raises((UserError, ValueError)):
        parse_train_config(f"model: draem\n{bad}\n")
