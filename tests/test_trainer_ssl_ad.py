"""SSL-AD end to end and its parts: fitted by ``fit_bundle`` on generated parts with a planted foreign object (a
stray nut, the kind of anomaly the self-supervised family is for), scored through the exported ONNX graph, the
shared export checks (FP32 parity, FP16 order, TensorRT readiness, any batch); the 36 in-graph transformations
against OpenCV's shift with ``BORDER_REFLECT_101`` (the official ``cv2f.affine``) and numpy's rot90, the loss
against (CE_x + CE_y + CE_rot) / 3 computed by hand, and the score against the sum of the heads' negative
log-probabilities computed by hand from the network's outputs on each copy.

The generated plates are symmetric under 90-degree rotations, so the rotation head has nothing to learn on them
(its accuracy stays at 1/4); the translation heads learn, and the score ranks the parts with a nut above the
clean ones. Recipe for time: WRN-10-1 at 32 px, 60 parts, 6 epochs (the official 5 at WRN-16-4 on real data).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc

from core.errors import ConfigError, UserError
from trainer.config import TrainConfig, parse_train_config
from trainer.models import FOREIGN_OBJECTS, SELF_SUPERVISED, create_model, get_model_class
from trainer.models.ssl_ad import HEADS, SslAd, cosine_factor, ssl_loss, transformation_labels
from trainer.synthetic import OBJECT_KINDS, make_dataset
from trainer.transformations import GeometricCopies, translation_rotation_list

SIZE = 32
CONFIG = f"""model: ssl-ad
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 6
batch_size: 8
training: {{workers: 0}}
ssl_ad: {{depth: 10, width: 1}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ssl_ad") / "ds", n_train=60, n_test_good=20, n_test_defect=20,
                        size=SIZE, seed=1, kinds=OBJECT_KINDS)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(CONFIG, parts, tmp_path_factory.mktemp("engines"))


def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    image, _pixel = image_and_pixel_auroc(bundle, parts, "ssl-ad")
    assert image >= 0.7  # the parts with a stray nut rank above the clean ones
    report = json.loads((bundle / "report.json").read_text())
    fit = report["fit"]
    assert fit["transformations"] == 36 and fit["network"] == "WRN-10-1" and len(fit["history"]) == 6
    kept = fit["history"][fit["selected_epoch"] - 1]
    assert kept["acc_x"] > 0.5 and kept["acc_y"] > 0.5  # the translation heads learned (chance: 1/3)
    assert report["export"]["network_passes_per_frame"] == 36


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, SslAd.fp32_scopes)


# --- the paper's parts against independent references ---------------------------------------------------------

def _reference(img: np.ndarray, tx: int, ty: int, k: int) -> np.ndarray:
    """The official order: OpenCV's shift with BORDER_REFLECT_101, then numpy's rot90."""
    if tx or ty:
        m = np.float32([[1, 0, tx], [0, 1, ty]])
        img = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_REFLECT_101)
    return np.rot90(img, k)


def test_the_36_transformations_are_the_official_ones() -> None:
    listed = translation_rotation_list(SIZE)
    assert len(listed) == len(set(listed)) == 36 and listed[0] == (False, 0, 0, 0)
    assert not any(t[0] for t in listed) and {abs(t[1]) for t in listed} == {0, 8}  # no flip; 8 px at 32 px
    labels = transformation_labels(SIZE)
    steps = (0, -8, 8)
    for (_f, tx, ty, k), row in zip(listed, labels.tolist(), strict=True):
        assert row == [steps.index(tx), steps.index(ty), k]
    copies = GeometricCopies(SIZE, transformations=listed, fill="reflect")
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    got = copies(torch.from_numpy(x)).numpy().reshape(2, 36, 3, SIZE, SIZE)
    for n in range(2):
        img = x[n].transpose(1, 2, 0)
        for t, (_f, tx, ty, k) in enumerate(listed):
            np.testing.assert_array_equal(got[n, t], _reference(img, tx, ty, k).transpose(2, 0, 1))
    # GEOM's border (the edge pixel repeated) is not OpenCV's REFLECT_101: the fill matters
    shifted = GeometricCopies(SIZE, transformations=[(False, 8, 0, 0)])(torch.from_numpy(x)).numpy()
    assert not np.array_equal(shifted[0], _reference(x[0].transpose(1, 2, 0), 8, 0, 0).transpose(2, 0, 1))


def test_the_loss_is_the_mean_of_the_three_heads_cross_entropies() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, sum(HEADS))).astype(np.float32) * 3
    labels = np.stack([rng.integers(0, 3, 5), rng.integers(0, 3, 5), rng.integers(0, 4, 5)], 1)
    expected = np.zeros(5)
    for i in range(5):
        for lo, hi, col in ((0, 3, 0), (3, 6, 1), (6, 10, 2)):
            part = logits[i, lo:hi].astype(np.float64)
            expected[i] += (np.log(np.exp(part).sum()) - part[labels[i, col]]) / 3
    got = ssl_loss(torch.from_numpy(logits), torch.from_numpy(labels))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert cosine_factor(1, 5) == 1.0 and cosine_factor(5, 5) < 0.1  # annealed over the epochs


def _small(extra: str = "") -> SslAd:
    cfg = parse_train_config(f"model: ssl-ad\ninput: {{height: {SIZE}, width: {SIZE}}}\n"
                             f"ssl_ad: {{depth: 10, width: 1{extra}}}\n")
    model = create_model("ssl-ad", cfg)
    assert isinstance(model, SslAd)
    return model


@pytest.mark.parametrize("kind", ["cross_entropy", "probability"])
def test_the_score_is_the_sum_over_copies_computed_by_hand(kind: str) -> None:
    torch.manual_seed(0)
    model = _small(f", score: {kind}")
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so eval mode matters
        for m in model.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    export = model.export_module()
    frames = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        score, amap = export(torch.from_numpy(frames))
    assert amap.shape == (2, SIZE, SIZE)
    listed = translation_rotation_list(SIZE)
    labels = transformation_labels(SIZE).numpy()
    for n in range(2):
        rgb = frames[n, :, :, ::-1].astype(np.float32) * (2 / 255) - 1  # the graph's BGR -> RGB in [-1, 1]
        copies = np.stack([_reference(rgb, tx, ty, k).transpose(2, 0, 1) for _f, tx, ty, k in listed])
        with torch.no_grad():
            logits = model.net(torch.from_numpy(np.ascontiguousarray(copies)))[0].double().numpy()
        total = 0.0
        for t in range(36):
            for lo, hi, col in ((0, 3, 0), (3, 6, 1), (6, 10, 2)):
                part = logits[t, lo:hi]
                logp = part[labels[t, col]] - np.log(np.exp(part).sum())
                total += -logp if kind == "cross_entropy" else -np.exp(logp)
        assert float(score[n]) == pytest.approx(total, rel=1e-4)


def test_config_is_checked_and_ssl_ad_catches_foreign_objects() -> None:
    cls = get_model_class("ssl-ad")
    assert cls.catches == FOREIGN_OBJECTS and cls.family == SELF_SUPERVISED
    for bad, key in (("{translations: 10}", "translations"), ("{depth: 12}", "depth"), ("{score: dirichlet}", "score")):
        with pytest.raises(ConfigError, match=f"ssl_ad.{key}"):
            parse_train_config(f"ssl_ad: {bad}\n")
    cfg = TrainConfig()
    cfg.input.height, cfg.input.width = 32, 64
    with pytest.raises(UserError, match="square"):
        create_model("ssl-ad", cfg)
    with pytest.raises(UserError, match="max_batch"):
        create_model("ssl-ad", parse_train_config("input: {height: 256, width: 256}\n")).export_checks(64, 2**21)
