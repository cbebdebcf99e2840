"""SSD end to end and its parts: SimCLR trained by the shared loop, exported, scored through the ONNX graph, the
shared export checks (FP32 parity, FP16 order, TensorRT readiness, any batch); the score against the official
``eval_ssd.py`` steps in numpy (L2 normalisation, standardisation, k-means clusters, pinv of the biased
covariance, min over clusters), the training loss against NT-Xent of the augmented views.

The accuracy fit is on wrong objects, as GEOM's test: Fashion-MNIST trousers normal, the other garments anomalous
(250 trousers, 200 fitted, 32 px, ResNet-18 at width 8, 12 epochs at lr 0.5: with 80 fitted and 30 epochs
the 64-dim covariance was too poorly estimated, image AUROC 0.86-0.98 between runs). A second, short fit runs on
generated parts with a planted foreign object: there SimCLR has nothing to learn (the parts are near-identical,
so after crops and colour jitter no instance can be told from another: the NT-Xent stays at chance, log(2B - 1),
measured while writing this), so that fit checks the pipeline and the foreign-object data end to end, not accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_checks import check_exported_bundle, fashion_mnist_one_class, fit_on_washers, image_and_pixel_auroc

from trainer.config import parse_train_config
from trainer.contrastive import nt_xent
from trainer.models import FOREIGN_OBJECTS, SELF_SUPERVISED, create_model
from trainer.models.ssd import Ssd
from trainer.synthetic import OBJECT_KINDS, make_dataset

SIZE = 32
NORMAL = 1  # Trouser
CONFIG = f"""model: ssd
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 12
batch_size: 32
training: {{workers: 0, select: last}}
ssd: {{width: 8, lr: 0.5}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
codec_augment: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/good: 250 trousers; test/good: 40 other trousers; test/other: 40 garments of the other classes."""
    return fashion_mnist_one_class(tmp_path_factory.mktemp("ssd") / "ds", 250, 40, SIZE)


@pytest.fixture(scope="module")
def bundle(garments: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(CONFIG, garments, tmp_path_factory.mktemp("engines"))


def test_accuracy_through_the_onnx_graph(bundle: Path, garments: Path) -> None:
    image, _ = image_and_pixel_auroc(bundle, garments, "ssd")
    assert image >= 0.95  # measured 0.97-0.99; the untrained encoder's features: 0.89
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert fit["scorer"]["clusters"] == 1 and fit["scorer"]["images"] == fit["n_train_images"] == 200
    assert fit["network"] == "ResNet-18 width 8" and len(fit["history"]) == 12
    losses = [h["nt_xent"] for h in fit["history"]]
    assert max(losses) <= math.log(2 * 32 - 1) + 0.1 and np.mean(losses[-5:]) < np.mean(losses[:5])  # it learned


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, garments: Path) -> None:
    check_exported_bundle(bundle, garments, SIZE, Ssd.fp32_scopes)
    export = json.loads((bundle / "report.json").read_text())["export"]
    assert export["forward_passes_per_frame"] == 1


def test_foreign_objects_on_generated_parts_end_to_end(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    parts = make_dataset(tmp_path / "ds", n_train=30, n_test_good=8, n_test_defect=8, size=SIZE, seed=1,
                         kinds=OBJECT_KINDS)
    bundle = fit_on_washers(CONFIG.replace("epochs: 12", "epochs: 2"), parts, tmp_path / "engines")
    image, pixel = image_and_pixel_auroc(bundle, parts, "ssd on parts (2 epochs; no accuracy claim)")
    assert 0 <= image <= 1 and pixel is not None
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["outputs"][1]["shape"] == ["N", SIZE, SIZE]


def _small(extra: str = "") -> Ssd:
    cfg = parse_train_config(f"model: ssd\ninput: {{height: 32, width: 32}}\nepochs: 1\nssd: {{width: 4{extra}}}\n")
    model = create_model("ssd", cfg)
    assert isinstance(model, Ssd)
    return model


def test_the_score_is_the_official_eval_ssd_in_numpy() -> None:
    model = _small(", clusters: 2")
    assert model.catches == FOREIGN_OBJECTS and model.family == SELF_SUPERVISED and model.display_name == "SSD"
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(1, 1, (60, 32)), rng.normal(-1, 0.5, (50, 32))]) + rng.normal(0, 3, 32)
    facts = model.fit_scorer(torch.from_numpy(train).float(), [], lambda _m: None)
    assert facts["clusters"] == 2 and sorted(facts["cluster_sizes"]) == [50, 60]
    # the official steps: L2 normalise, standardise by the training m, s, pinv(cov(bias=True)) per cluster, min
    ftrain = train / (np.linalg.norm(train, axis=-1, keepdims=True) + 1e-10)
    m, s = ftrain.mean(0, keepdims=True), ftrain.std(0, keepdims=True)
    ftrain = (ftrain - m) / (s + 1e-10)
    labels = (ftrain @ np.ones(32) < 0).astype(int)  # the two clusters are the two blobs
    test = rng.normal(0, 2, (7, 32))
    ftest = (test / (np.linalg.norm(test, axis=-1, keepdims=True) + 1e-10) - m) / (s + 1e-10)
    expected = np.min([np.sum((ftest - x.mean(0)) * np.linalg.pinv(np.cov(x.T, bias=True)).dot((ftest - x.mean(0)).T).T,
                              -1) for x in (ftrain[labels == 0], ftrain[labels == 1])], 0)
    assert model.scorer is not None
    got = model.scorer(torch.from_numpy(test).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-3)


def test_the_training_loss_is_nt_xent_of_two_augmented_views() -> None:
    model = _small()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    model.encoder.eval()  # BN from running stats: the same network output for the same views
    with torch.no_grad():
        got, parts = model.contrastive_loss(x, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)
        a, b = model.augment_views(x, gen), model.augment_views(x, gen)
        expected = nt_xent(model.head(model.encoder(a)[0]), model.head(model.encoder(b)[0]), 0.5, reduce=False)
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(parts["nt_xent"], got)
    assert model.augment_views.scale_min == 0.2  # the official ssl transform's crop


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(Exception, match="ssd.clusters"):
        parse_train_config("model: ssd\nssd: {clusters: 0}\n")
    with pytest.raises(Exception, match="ssd.temperature"):
        parse_train_config("model: ssd\nssd: {temperature: 0}\n")
