"""f-AnoGAN end to end and its parts: fitted by ``fit_bundle`` on generated washers carrying a foreign object (what
an image-level GAN model is for, as tests/test_trainer_gan_models.py plants for GANomaly), scored through the
exported ONNX graph (the issue's bar: image AUROC >= 0.7), the shared export checks (FP32 parity, FP16 order,
TensorRT readiness, any batch); WGAN-GP's gradient penalty and izi_f against their formulas, the exported score and
map against E -> G -> D computed by hand, the critic layer-normed, and the encoder's training leaving the GAN as
the GAN's training left it (also when resumed after it).

Recipe for time: 64 px, 60 washers (48 fitted), networks 16 wide, 50 GAN epochs at batch 16 with 2 critic steps
a generator step and lr 2e-4, then 60 encoder epochs at lr 1e-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc

from trainer.config import parse_train_config
from trainer.data import train_paths
from trainer.frames import TrainingData
from trainer.models import FOREIGN_OBJECTS, GENERATIVE, RunOptions, create_model
from trainer.models.f_anogan import ENCODER_CHECKPOINTS, FAnogan, gradient_penalty, izi_f
from trainer.synthetic import OBJECT_KINDS, make_dataset

SIZE = 64
GAN_EPOCHS = 50
CONFIG = f"""model: f-anogan
input: {{height: {SIZE}, width: {SIZE}}}
epochs: {GAN_EPOCHS}
batch_size: 16
training: {{workers: 0}}
f_anogan: {{ngf: 16, ndf: 16, lr: 0.0002, n_critic: 2, encoder_epochs: 60, encoder_lr: 0.001}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("f_anogan") / "ds", n_train=60, n_test_good=20, n_test_defect=20,
                        size=SIZE, seed=7, kinds=OBJECT_KINDS)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(CONFIG, parts, tmp_path_factory.mktemp("engines"))


def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    image, pixel = image_and_pixel_auroc(bundle, parts, "f-anogan")
    assert image >= 0.7  # the bar
    assert pixel is not None and pixel > 0.6  # the residual map points at the foreign object
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert len(fit["gan"]["history"]) == GAN_EPOCHS and fit["gan"]["selection_rule"] == "last"
    assert len(fit["history"]) == 60 and fit["selection_rule"] == "val_loss"
    izi = [row["izi_f"] for row in fit["history"]]
    assert izi[-1] < izi[0]  # the encoder learnt to map into the generator's latent space


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, FAnogan.fp32_scopes)


def _small_model(extra: str = "") -> FAnogan:
    model = create_model("f-anogan", parse_train_config(
        f"model: f-anogan\ninput: {{height: 32, width: 32}}\nepochs: 2\nbatch_size: 8\ntraining: {{workers: 0}}\n"
        f"f_anogan: {{nz: 8, ngf: 4, ndf: 4, encoder_epochs: 2, map_sigma: 0{extra}}}\n"))
    assert isinstance(model, FAnogan)
    return model


class _Linear(torch.nn.Module):
    """A critic D(x) = <w, x>: its gradient is w everywhere, so the penalty is (|w| - 1)^2."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x * self.w).flatten(1).sum(1), x


def test_the_gradient_penalty_is_wgan_gps() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)
    critic = _Linear(w.clone())
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    penalty = gradient_penalty(critic, real, fake)
    norm = w.norm()
    assert penalty.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    penalty.backward()  # differentiable in the critic's weights: d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    assert critic.w.grad is not None
    assert torch.allclose(critic.w.grad, 2 * (norm - 1) * w / norm, atol=1e-5)
    unit = _Linear(w / norm)  # a 1-Lipschitz critic pays nothing
    assert gradient_penalty(unit, real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_izi_f_is_the_image_plus_kappa_feature_residual() -> None:
    torch.manual_seed(1)
    x, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    fx, ff = torch.randn(3, 16, 2, 2), torch.randn(3, 16, 2, 2)
    got = izi_f(x, fake, fx, ff, 0.5)
    for i in range(3):
        image = float(((x[i] - fake[i]) ** 2).sum()) / x[i].numel()
        features = float(((fx[i] - ff[i]) ** 2).sum()) / fx[i].numel()
        assert got[i].item() == pytest.approx(image + 0.5 * features, rel=1e-5)
    assert torch.equal(izi_f(x, x, fx, fx, 1.0), torch.zeros(3))


def test_the_exported_score_and_map_are_izi_f_and_the_residual_of_one_pass() -> None:
    torch.manual_seed(2)
    model = _small_model(", kappa: 2.0")
    assert (model.family, model.catches, model.display_name) == (GENERATIVE, FOREIGN_OBJECTS, "f-AnoGAN")
    norms = {type(m).__name__ for m in model.discriminator.modules()}
    assert "GroupNorm" in norms and "BatchNorm2d" not in norms  # WGAN-GP's critic: no batch coupling
    module = model.export_module()
    frames = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = module(frames)
        x = model.frame_input(frames)
        fake = model.generator(model.encoder(x))
        _, fx = model.discriminator(x)
        _, ff = model.discriminator(fake)
        expected = ((x - fake) ** 2).mean((1, 2, 3)) + 2.0 * ((fx - ff) ** 2).mean((1, 2, 3))
    assert torch.allclose(score, expected, rtol=1e-5)  # scale (0, 1): the raw izi_f
    assert torch.allclose(amap, (x - fake).abs().mean(1) / 2, atol=1e-6)  # |x - G(E(x))| in [0, 1] pixel units


def test_the_encoder_trains_against_the_frozen_gan_and_resumes_after_it(parts: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    paths = train_paths(parts)[:20]
    data = TrainingData(fit_paths=paths[:16], holdout_paths=paths[16:], hw=(32, 32), workers=0, seed=0)
    run = RunOptions(device="cpu", amp=False, progress=False, checkpoint_dir=tmp_path / "ck")
    model = _small_model()
    fit = model.fit(data, run=run)
    assert fit["gan"]["selection_rule"] == "last" and len(fit["history"]) == 2
    gan = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)["networks"]  # the GAN's training, as it ended
    for name, net in (("generator", model.generator), ("discriminator", model.discriminator)):
        assert all(torch.equal(v, gan[name][k]) for k, v in net.state_dict().items())  # batch-norm statistics too
        assert not any(p.requires_grad for p in net.parameters())
    assert (tmp_path / "ck" / ENCODER_CHECKPOINTS / "best.pt").is_file()
    # resumed with the GAN's training finished and the encoder's never started: the GAN is loaded, not trained again
    shutil.rmtree(tmp_path / "ck" / ENCODER_CHECKPOINTS)
    lines: list[str] = []
    resumed = _small_model()
    fit2 = resumed.fit(data, lines.append, RunOptions(device="cpu", amp=False, progress=False, resume=True,
                                                      checkpoint_dir=tmp_path / "ck"))
    assert any("the GAN's training had finished" in line for line in lines)
    assert "resumed" in fit2["gan"] and len(fit2["history"]) == 2
    assert all(torch.equal(v, gan["generator"][k]) for k, v in resumed.generator.state_dict().items())
    assert np.isfinite(resumed.score(data.read(paths[:2]))[0]).all()


@pytest.mark.parametrize("bad", ["f_anogan: {n_critic: 0}", "f_anogan: {encoder_lr: 0}", "f_anogan: {beta1: 1}",
                                 "input: {height: 48, width: 48}"])
def test_bad_settings_are_one_line(bad: str) -> None:
    from core.errors import UserError

    with pytest.raises((UserError, ValueError)):
        cfg = parse_train_config(f"model: f-anogan\n{bad}\n")
        create_model("f-anogan", cfg)
