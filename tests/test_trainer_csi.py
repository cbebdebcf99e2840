"""CSI end to end and its parts: trained by the shared loop, exported (the 4 rotations and the score in the graph),
scored through the ONNX graph, the shared export checks (FP32 parity, FP16 order, TensorRT readiness, any batch);
the score against ``ood_pre.py``'s CSI score computed by hand, the loss against NT-Xent over the rotated instances
plus the rotation head's cross-entropy rebuilt from the same draws.

The accuracy fit is on wrong objects, as GEOM's test: Fashion-MNIST trousers normal, the other garments anomalous
(100 trousers, 80 fitted, 32 px, ResNet-18 at width 8, 8 epochs at lr 0.1). A second, short fit runs on generated
parts with a planted foreign object, for the pipeline end to end (no accuracy claim: trainer/models/csi.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_checks import check_exported_bundle, fashion_mnist_one_class, fit_on_washers, image_and_pixel_auroc

from core.errors import UserError
from trainer.config import TrainConfig, parse_train_config
from trainer.contrastive import nt_xent, random_flip
from trainer.models import FOREIGN_OBJECTS, SELF_SUPERVISED, create_model
from trainer.models.csi import Csi, CsiScore
from trainer.synthetic import OBJECT_KINDS, make_dataset

SIZE = 32
NORMAL = 1  # Trouser
CONFIG = f"""model: csi
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 8
batch_size: 32
training: {{workers: 0, select: last}}
csi: {{width: 8}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
codec_augment: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/good: 100 trousers; test/good: 40 other trousers; test/other: 40 garments of the other classes."""
    return fashion_mnist_one_class(tmp_path_factory.mktemp("csi") / "ds", 100, 40, SIZE)


@pytest.fixture(scope="module")
def bundle(garments: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(CONFIG, garments, tmp_path_factory.mktemp("engines"))


def test_accuracy_through_the_onnx_graph(bundle: Path, garments: Path) -> None:
    image, _ = image_and_pixel_auroc(bundle, garments, "csi")
    assert image >= 0.9  # measured 0.99; the untrained network: 0.47
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert fit["scorer"]["images"] == fit["n_train_images"] == 80 and fit["scorer"]["bank"] == 80
    assert len(fit["history"]) == 8 and fit["history"][-1]["shift"] < fit["history"][0]["shift"]  # rotations learnt


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, garments: Path) -> None:
    check_exported_bundle(bundle, garments, SIZE, Csi.fp32_scopes)
    export = json.loads((bundle / "report.json").read_text())["export"]
    assert export["forward_passes_per_frame"] == 4
    assert export["largest_activation_elements"] == 8 * 4 * 8 * SIZE * SIZE


def test_foreign_objects_on_generated_parts_end_to_end(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    parts = make_dataset(tmp_path / "ds", n_train=20, n_test_good=6, n_test_defect=6, size=SIZE, seed=1,
                         kinds=OBJECT_KINDS)
    bundle = fit_on_washers(CONFIG.replace("epochs: 8", "epochs: 1"), parts, tmp_path / "engines")
    image, pixel = image_and_pixel_auroc(bundle, parts, "csi on parts (1 epoch; no accuracy claim)")
    assert 0 <= image <= 1 and pixel is not None
    assert json.loads((bundle / "manifest.json").read_text())["outputs"][1]["shape"] == ["N", SIZE, SIZE]


def _small() -> Csi:
    model = create_model("csi", parse_train_config("model: csi\ninput: {height: 32, width: 32}\ncsi: {width: 4}\n"))
    assert isinstance(model, Csi)
    return model


def test_the_score_is_the_official_csi_score_by_hand() -> None:
    rng = np.random.default_rng(0)
    k, m, n, d = 4, 12, 3, 5
    z_train = rng.normal(0, 1, (k, m, d)) + 2
    logits_train = rng.normal(0, 1, (k, m, k)) + 3 * np.eye(k)[:, None, :]
    model = _small()
    assert model.catches == FOREIGN_OBJECTS and model.family == SELF_SUPERVISED and model.display_name == "CSI"
    model.fit_scorer(torch.zeros(m, 32), [(torch.from_numpy(z_train).float(), torch.from_numpy(logits_train).float())],
                     lambda _m: None)
    z, logits = rng.normal(0, 1, (k, n, d)) + 1, rng.normal(0, 1, (k, n, k))
    expected = np.zeros(n)
    for i in range(n):
        for s in range(k):
            axis = z_train[s] / np.linalg.norm(z_train[s], axis=1, keepdims=True)
            w_sim = 1 / np.linalg.norm(z_train[s], axis=1).mean()
            w_shi = 1 / logits_train[s, :, s].mean()
            expected[i] += (z[s, i] @ axis.T).max() * w_sim + logits[s, i, s] * w_shi
    expected /= k
    assert isinstance(model.scorer, CsiScore)
    got = model.scorer(torch.from_numpy(z.reshape(k * n, d)).float(),
                       torch.from_numpy(logits.reshape(k * n, k)).float())
    np.testing.assert_allclose(got.numpy(), -expected, rtol=1e-5)  # negated: higher = more anomalous


def test_the_loss_is_nt_xent_over_rotated_instances_plus_rotation_prediction() -> None:
    model = _small()
    for net in model.trained().values():
        net.eval()  # BN from running stats: the same outputs for the same images
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        got, parts = model.contrastive_loss(x, torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        views = []
        for _ in range(2):
            flipped = random_flip(x, 0.5, gen)
            rotated = torch.cat([torch.rot90(flipped, r, (2, 3)) for r in range(4)])  # 4 instances per image
            views.append(model.augment_views(rotated, gen))
        pooled = model.encoder(torch.cat(views))[0]
        z = model.head(pooled)
        sim = nt_xent(z[:12], z[12:], 0.5, reduce=False)  # the other rotations are negatives
        labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] * 2)
        ce = F.cross_entropy(model.shift_head(pooled), labels, reduction="none")
    assert torch.allclose(parts["sim"], sim.view(4, 3).mean(0), atol=1e-5)
    assert torch.allclose(parts["shift"], ce.view(8, 3).mean(0), atol=1e-5)
    assert torch.allclose(got.mean(), sim.mean() + ce.mean(), atol=1e-5)  # the official loss_sim + loss_shift
    assert model.augment_views.flip_p == 0 and model.augment_views.scale_min == 0.08  # flipped before rotating


def test_non_square_input_and_bad_settings_are_one_line() -> None:
    cfg = TrainConfig()
    cfg.input.height, cfg.input.width = 32, 64
    with pytest.raises(UserError, match="square"):
        create_model("csi", cfg)
    with pytest.raises(Exception, match="csi.bank_size"):
        parse_train_config("model: csi\ncsi: {bank_size: 0}\n")
