"""AnoGAN end to end and its parts: ``fit_bundle`` fits it on generated washers carrying a foreign object, skips the
export in one line naming f-AnoGAN (its station form), calibrates and evaluates with the latent search in torch
and writes its report outside any bundle (no accuracy bar here: measured at chance on these washers, see
trainer/models/anogan.py); the export refused in one line;
the mapping loss against the paper's formula, the search lowering it, the score being its last value, and scores
independent of the batch an image is scored in.

Recipe for time: 64 px, 60 washers (48 fitted), networks 16 wide, the GAN 3 epochs and a 20-step search: the
pipeline's contract, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from trainer.config import parse_train_config
from trainer.models import FOREIGN_OBJECTS, GENERATIVE, create_model
from trainer.models.anogan import Anogan, anogan_loss, latent_search
from trainer.pipeline import fit_bundle
from trainer.synthetic import OBJECT_KINDS, make_dataset

SIZE = 64
STEPS = 20
CONFIG = f"""model: anogan
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 3
batch_size: 16
training: {{workers: 0}}
anogan: {{ngf: 16, ndf: 16, steps: {STEPS}, validation_steps: 2, n_critic: 2}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("anogan") / "ds", n_train=60, n_test_good=20, n_test_defect=20,
                        size=SIZE, seed=7, kinds=OBJECT_KINDS)


def _fit(config: str, parts: Path, engines: Path) -> tuple[Path, list[str]]:
    torch.set_num_threads(1)
    lines: list[str] = []
    out = fit_bundle(parse_train_config(config), parts, engines, log=lines.append)
    print("\n".join(line for line in lines if line.startswith(("kept epoch", "test:", "warning: export"))))
    return out, lines


@pytest.fixture(scope="module")
def fitted(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A brief fit (3 epochs, a 20-step search): the pipeline's contract for a model with no station export."""
    engines = tmp_path_factory.mktemp("engines")
    out, lines = _fit(CONFIG, parts, engines)
    return out, engines, lines


def test_the_fit_evaluates_with_the_search_in_torch_and_writes_no_bundle(fitted: tuple[Path, Path, list[str]]) -> None:
    out, engines, lines = fitted
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert m["image_auroc"] is not None and m["pixel_auroc"] is not None  # scored and mapped in torch
    assert m["torch_ms_per_image"] > 0 and report["fit"]["search_steps"] == STEPS
    assert out.parent.name == "evals" and out.parent.parent == engines / "anogan"
    assert not list(engines.rglob("*.onnx")) and not list(engines.rglob("manifest.json"))
    assert not (engines / "anogan" / "current").exists()  # nothing a station could load
    refusal = [line for line in lines if "station form" in line]
    assert len(refusal) == 1 and "anogan has no station export" in refusal[0]  # one line, never a silent fallback
    assert "its station form is f-anogan" in refusal[0]
    assert report["parity"] == {} and report["calibration"]["threshold"] > report["calibration"]["normal_median"]
    assert report["fit"]["selection_rule"] == "last"  # the paper trains a fixed number of epochs


def test_export_is_refused_in_one_line_naming_f_anogan() -> None:
    model = _small_model()
    assert (model.family, model.catches, model.display_name) == (GENERATIVE, FOREIGN_OBJECTS, "AnoGAN")
    assert model.station_form == "f-anogan"
    with pytest.raises(UserError, match="^anogan has no station export: .*its station form is f-anogan") as info:
        model.export_module()
    assert "\n" not in str(info.value)


def test_tiling_is_refused_before_the_fit() -> None:
    cfg = parse_train_config("model: anogan\ninput: {height: 64, width: 64, tiles: [2, 2]}\n")
    with pytest.raises(UserError, match="^anogan: input.tiles needs an exported graph"):
        create_model("anogan", cfg).preflight(10, 8, 10**9)


def _small_model(extra: str = "") -> Anogan:
    model = create_model("anogan", parse_train_config(
        f"model: anogan\ninput: {{height: 32, width: 32}}\nepochs: 1\nbatch_size: 8\ntraining: {{workers: 0}}\n"
        f"anogan: {{nz: 8, ngf: 4, ndf: 4, map_sigma: 0, steps: 20{extra}}}\n"))
    assert isinstance(model, Anogan)
    model.generator.eval()
    model.discriminator.eval()
    return model


def test_the_mapping_loss_is_the_papers() -> None:
    torch.manual_seed(0)
    x, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fx, ff = torch.randn(2, 8, 2, 2), torch.randn(2, 8, 2, 2)
    got = anogan_loss(x, fake, fx, ff, 0.1)
    for i in range(2):
        residual = float((x[i] - fake[i]).abs().sum())
        discrimination = float((fx[i] - ff[i]).abs().sum())
        assert got[i].item() == pytest.approx(0.9 * residual + 0.1 * discrimination, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_search_lowers_its_loss_and_the_score_is_its_last_value(optimizer: str) -> None:
    torch.manual_seed(1)
    model = _small_model(f", search_optimizer: {optimizer}, search_lr: {0.05 if optimizer == 'adam' else 1e-4}")
    target = model.generator(model.sample_z(3, torch.empty(0))).detach()  # images the generator can make
    start = model.start_codes(3)
    before, _ = latent_search(model.generator, model.features, target, start, 0, 0.05, 0.1)
    after, fake = model.search(target, 40, start)
    assert (after < before).all()  # every image's code moved towards it
    assert torch.allclose(after, anogan_loss(target, fake, model.features(target), model.features(fake), 0.1))
    assert all(not p.requires_grad or p.grad is None for p in model.generator.parameters())  # only z was stepped


def test_scores_do_not_depend_on_the_batch_an_image_is_scored_in() -> None:
    torch.manual_seed(2)
    model = _small_model()
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    scores, maps = model.score(frames, batch_size=5)
    in_twos, maps2 = model.score(frames, batch_size=2)
    assert np.allclose(scores, in_twos, rtol=1e-5) and np.allclose(maps, maps2, atol=1e-6)
    assert maps.shape == (5, 32, 32) and np.isfinite(scores).all()
    # the map is the residual |x - G(z)| of the searched code, in [0, 1] pixel units
    x = model.frame_input(torch.from_numpy(frames))
    _, fake = model.search(x, model.cfg.steps, model.start_codes(5))
    assert np.allclose(maps, ((x - fake).abs().mean(1) / 2).numpy(), atol=1e-5)


def test_the_papers_dcgan_objective_is_bce_with_a_batch_normed_discriminator() -> None:
    torch.manual_seed(3)
    model = _small_model(", gan: dcgan")
    norms = {type(m).__name__ for m in model.discriminator.modules()}
    assert "BatchNorm2d" in norms and "GroupNorm" not in norms
    assert [u.name for u in model.updates()] == ["generator", "discriminator"]
    x = model.frame_input(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8))
    fake = model.generated(x).detach()
    loss, parts = model.discriminator_loss(x, fake)
    real_logit, fake_logit = model.discriminator(x)[0], model.discriminator(fake)[0]
    expected = -torch.log(torch.sigmoid(real_logit)).mean() - torch.log(1 - torch.sigmoid(fake_logit)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and "loss_d" in parts
    wgan = _small_model()  # the default: f-AnoGAN's WGAN-GP, n_critic critic steps then the generator's
    assert [u.name for u in wgan.updates()] == ["critic"] * 5 + ["generator"]


@pytest.mark.parametrize("bad", ["anogan: {gan: lsgan}", "anogan: {search_optimizer: lbfgs}", "anogan: {lam: 2}",
                                 "anogan: {steps: -1}"])
def test_bad_settings_are_one_line(bad: str) -> None:
    with pytest.raises((UserError, ValueError)):
        parse_train_config(f"model: anogan\n{bad}\n")
