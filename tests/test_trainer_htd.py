"""HTD end to end: a few-shot fit by the shared loop on 10 good images, exported, scored through the ONNX graph,
check_exported_bundle (FP32 parity, FP16 order, TensorRT readiness, any batch size); and the paper's parts against
independent references: the official 42 transformations (numpy/scipy), the pyramid's sides (SinGAN's rule), the
score (the right transformation's softmax, the fake output left out, averaged over patches, summed over
transformations, averaged over scales), the losses' targets (fake = class T), the noise amplitudes and the scale
schedule.

The planted anomaly is the kind HTD is for, another object, and the training set what it is for, a handful of
images: 10 Fashion-MNIST trousers (the Debian package's files, as tests/test_protocol.py reads them), the anomalies
garments of the other nine classes. Not the generated washers: they are nearly symmetric under flips and 90-degree
rotations, so a transformation classifier has nothing to learn (GEOM is at chance there, tests/test_trainer_geom.py;
HTD's discriminators stayed at chance on them too, image AUROC 0.38-0.5 with a planted nut, measured while writing
this). The recipe is reduced: nfc 8 (the paper's 32), 4 transformations an image a step, 30 epochs (15 a scale).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from model_checks import check_exported_bundle, fashion_mnist_one_class, image_and_pixel_auroc
from scipy import ndimage

from core.errors import ConfigError, UserError
from trainer.config import parse_train_config
from trainer.models import FOREIGN_OBJECTS, SELF_SUPERVISED, create_model, get_model_class
from trainer.models.htd import RightTransformation, ScaleScorer, htd_transformations, normality_score, pyramid_sizes
from trainer.pipeline import fit_bundle
from trainer.transformations import GeometricCopies

SIZE = 32
NORMAL = 1  # Trouser
N_TRAIN = 12  # 10 in the model, 2 held out for the threshold
CONFIG = f"""model: htd
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 30
batch_size: 16
training: {{workers: 0, select: last}}
calibration: {{holdout_fraction: {2 / N_TRAIN}}}
htd: {{nfc: 8, per_image: 4}}
export: {{max_batch: 8}}
report: {{overlays: 1}}
codec_augment: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/good: 12 trousers; test/good: 20 other trousers; test/other: 20 garments of the other classes."""
    return fashion_mnist_one_class(tmp_path_factory.mktemp("htd") / "ds", N_TRAIN, 20, SIZE)


@pytest.fixture(scope="module")
def bundle(garments: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    lines: list[str] = []
    path = fit_bundle(parse_train_config(CONFIG), garments, tmp_path_factory.mktemp("engines"), log=lines.append)
    print("\n".join(line for line in lines if line.startswith(("htd", "test:", "parity", "kept"))))
    return path


def test_few_shot_fit_export_and_accuracy_through_the_graph(bundle: Path, garments: Path) -> None:
    auroc, _ = image_and_pixel_auroc(bundle, garments, "htd")
    assert auroc >= 0.8  # chance 0.5; 0.99 with nfc 16 and 60 epochs on the same draw
    report = json.loads((bundle / "report.json").read_text())
    fit = report["fit"]
    assert fit["n_train_images"] == 10 and fit["scales"] == [25, 32] and fit["transformations"] == 42
    assert fit["epochs_per_scale"] == [15, 15] and len(fit["history"]) == 30
    amps = fit["noise_amplitudes"]
    assert amps[0] == 1.0 and 0 < amps[1] < 0.1  # 0.1 x the coarse scale's reconstruction error (in [0, 2])
    export = report["export"]
    assert export["discriminator_passes_per_frame"] == 84 and export["scales"] == [25, 32]
    check_exported_bundle(bundle, garments, SIZE)


# --- the paper's parts ----------------------------------------------------------------------------------------

def _reference(img: np.ndarray, flip: bool, tx: int, ty: int, k: int) -> np.ndarray:
    """The official order: hflip, shift with a reflected border (edge repeated: scipy's 'reflect'), rot90."""
    if flip:
        img = np.fliplr(img)
    if tx or ty:
        img = ndimage.shift(img, (ty, tx, 0), order=0, mode="reflect")
    return np.rot90(img, k)


@pytest.mark.parametrize("size", [25, 32])
def test_the_official_42_transformations_in_the_graph(size: int, tmp_path: Path) -> None:
    listed = htd_transformations(size)
    s = int(0.15 * size)  # 3 px at 25, 4 at 32
    signs = {(f, tx // s, ty // s, k) for f, tx, ty, k in listed}
    official = ({(f, tx, -1, 0) for f in (False, True) for tx in (-1, 1, 0)}
                | {(f, tx, ty, k) for f in (False, True) for tx in (0, 1) for ty in (0, 1) for k in range(4)}
                | {(f, -1, ty, 0) for f in (False, True) for ty in (1, 0)})
    assert len(listed) == len(set(listed)) == 42 and signs == official and listed[0] == (False, 0, 0, 0)
    copies = GeometricCopies(size, transformations=listed)
    path = tmp_path / "copies.onnx"
    x = np.random.default_rng(1).standard_normal((2, 1, size, size)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copies, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["copies"], dynamic_axes={"x": {0: "N"}, "copies": {0: "N"}})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = got.reshape(2, 42, 1, size, size)
    for n in range(2):
        img = x[n].transpose(1, 2, 0)
        for t, transform in enumerate(listed):
            np.testing.assert_array_equal(got[n, t], _reference(img, *transform).transpose(2, 0, 1))


def test_pyramid_follows_singans_rule() -> None:
    assert pyramid_sizes(32, 25) == [25, 32]
    assert pyramid_sizes(64, 25) == [25, 32, 40, 51, 64]  # 4 steps of (25/64)^(1/4) = 0.79
    assert pyramid_sizes(128, 25) == [25, 33, 43, 57, 74, 97, 128]  # 6 steps of 0.76
    assert pyramid_sizes(24, 25) == [24]


class _Designed(torch.nn.Module):
    """Logits [N*T, T+1, 3, 3]: copy t's right class gets ``right``, every other 0, the fake output 50."""

    def __init__(self, count: int, right: float) -> None:
        super().__init__()
        self.count, self.right = count, right

    def forward(self, copies: torch.Tensor) -> torch.Tensor:
        n = int(copies.shape[0])
        logits = torch.zeros(n, self.count + 1, 3, 3)
        logits[torch.arange(n), torch.arange(n) % self.count] = self.right
        logits[:, self.count] = 50.0  # left out before the softmax, as in the official score
        return logits


def test_score_is_the_right_transformations_softmax_summed_and_averaged_over_scales() -> None:
    t = 42
    copies = GeometricCopies(32, transformations=htd_transformations(32))
    frames = torch.zeros(2, 1, 32, 32)
    for right in (0.0, 3.0):
        logits = ScaleScorer(32, 32, copies, _Designed(t, right))(frames)  # type: ignore[arg-type]
        normality, identity = RightTransformation(t)(logits)
        p = np.exp(right) / (np.exp(right) + t - 1)
        np.testing.assert_allclose(normality.numpy(), [t * p] * 2, rtol=1e-5)  # sum over t of the patches' mean
        np.testing.assert_allclose(identity.numpy(), np.full((2, 3, 3), p), rtol=1e-5)
    scales = [torch.tensor([10.0, 2.0]), torch.tensor([20.0, 4.0])]
    np.testing.assert_allclose(normality_score(scales).numpy(), [-15.0, -3.0])  # mean over scales, negated


def _model(epochs: int = 8) -> object:
    cfg = parse_train_config(f"model: htd\ninput: {{height: 32, width: 32, channels: gray}}\nepochs: {epochs}\n"
                             "htd: {nfc: 4, per_image: 3}\n")
    return create_model("htd", cfg)


def test_losses_targets_noise_amplitudes_and_the_scale_schedule() -> None:
    from trainer.models.htd import Htd, HtdState

    torch.manual_seed(0)
    model = _model(7)
    assert isinstance(model, Htd)
    assert model.epochs_per_scale() == [3, 4] and [model.scale_of(e) for e in (1, 3, 4, 7)] == [
        (0, 0), (0, 2), (1, 0), (1, 3)]
    bank = torch.rand(3, 1, 32, 32) * 2 - 1
    model.bank = bank
    model.state = HtdState(model.sides, 1, 3, 0)
    model.updates()
    model._start_epoch(1, 1000)
    x = bank[[2, 0]]
    _, parts = model.generator_loss(x, shared := {})
    real, labels, ids = model._batch
    assert ids.tolist() == [2, 0] and labels.shape == (2, 3)  # each frame's nearest training image
    fake = shared["fake"].detach()
    loss, d_parts = model.discriminator_loss(x, fake)
    d = model.discs[0]
    ce = torch.nn.functional.cross_entropy
    on_real = ce(d(model._sampled_copies(real, 0, labels)), labels.reshape(-1, 1, 1).expand(-1, 15, 15))
    on_fake = ce(d(model._sampled_copies(fake, 0, labels)), torch.full((6, 15, 15), 42))  # fake = class T
    torch.testing.assert_close(d_parts["d_real"], on_real)
    torch.testing.assert_close(d_parts["d_fake"], on_fake)
    torch.testing.assert_close(loss, on_real + on_fake)
    g = {k: float(v.detach()) for k, v in parts.items()}
    assert g["rec"] > 0 and g["loss_g"] == pytest.approx(g["adv"] + 100 * g["rec"])  # alpha 100

    model._start_epoch(4, 1000)  # scale 1 starts: weights copied (same width), amplitudes from the reconstruction
    assert model.scale_now == 1
    for a, b in zip(model.gens[0].state_dict().values(), model.gens[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        g0 = model.gens[0].eval()
        ids3 = torch.arange(3)
        z = model.state.z_opt(0).expand(3, -1, -1, -1)
        rec = g0(z, torch.zeros(3, 1, 25, 25), ids3)  # scale 0: amplitude 1, nothing coarser
        rec = torch.nn.functional.interpolate(rec, size=(32, 32), mode="bilinear", align_corners=False)
        expected = 0.1 * (bank - rec).abs().flatten(1).mean(1)
    torch.testing.assert_close(model.state.amps[1], expected)
    assert model._drop(4, 2) == 1.0 and model._drop(6, 2) == 0.1  # a tenth from the scale's epoch 2 on


def test_config_family_and_bounds() -> None:
    cls = get_model_class("htd")
    assert cls.catches == FOREIGN_OBJECTS and cls.family == SELF_SUPERVISED and cls.display_name == "HTD"
    with pytest.raises(ConfigError, match="htd.min_size"):
        parse_train_config("htd: {min_size: 10}\n")
    with pytest.raises(ConfigError, match="htd.per_image"):
        parse_train_config("htd: {per_image: 0}\n")
    with pytest.raises(UserError, match="power of two|square"):
        create_model("htd", parse_train_config("model: htd\ninput: {height: 32, width: 64}\n"))
    with pytest.raises(UserError, match="max_batch"):
        create_model("htd", parse_train_config("model: htd\ninput: {height: 256, width: 256}\n")).export_checks(
            64, 2**21)
