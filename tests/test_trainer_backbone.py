"""EfficientNet-Lite0: the shipped ImageNet weights load into our architecture and classify real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from core.errors import UserError
from trainer.backbones import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0, load_efficientnet_lite0

sklearn_datasets = pytest.importorskip("sklearn.datasets")

# ImageNet classes that describe sklearn's sample photos.
CHINA_OK = {442, 483, 497, 663, 698}  # bell cote, castle, church, monastery, palace
FLOWER_OK = {985}  # daisy (the photo is a pompom dahlia, not an ImageNet class)


def _centre_crop(name: str) -> torch.Tensor:
    img = sklearn_datasets.load_sample_image(name)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return load_efficientnet_lite0()


def test_classifies_sample_photos(lite0: EfficientNetLite0) -> None:
    """Wrong padding, BN eps, block order or weights give a flat or wrong distribution here."""
    with torch.no_grad():
        china = lite0(_centre_crop("china.jpg")).softmax(1)[0]
        flower = lite0(_centre_crop("flower.jpg")).softmax(1)[0]
    top1 = int(china.argmax())
    print(f"china top-1 {top1} p={float(china.max()):.3f}; building mass {float(china[list(CHINA_OK)].sum()):.3f}")
    assert top1 == 698 and float(china.max()) > 0.35  # palace
    assert float(china[list(CHINA_OK)].sum()) > 0.75
    assert FLOWER_OK & set(flower.topk(5).indices.tolist())


def test_feature_taps(lite0: EfficientNetLite0) -> None:
    x = torch.zeros(2, 3, 160, 160)
    with torch.no_grad():
        f2, f4, f10 = lite0.features(x, (2, 4, 10))
    assert tuple(f2.shape) == (2, 24, 40, 40)
    assert tuple(f4.shape) == (2, 40, 20, 20)
    assert tuple(f10.shape) == (2, 112, 10, 10)


def test_local_weights_file(tmp_path, lite0: EfficientNetLite0) -> None:
    path = tmp_path / "w.pth"
    torch.save(lite0.state_dict(), path)
    again = load_efficientnet_lite0(path)
    assert torch.equal(again._fc.weight, lite0._fc.weight)


def test_bad_weights_files(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_efficientnet_lite0(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_efficientnet_lite0(junk)
    partial = tmp_path / "partial.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(UserError, match="not an EfficientNet-Lite0"):
        load_efficientnet_lite0(partial)


def test_padding_choice_is_symmetric() -> None:
    """Symmetric k//2 padding gave the confident top-1 on the sample photos (TF-'same' picked bell cote)."""
    model = EfficientNetLite0()
    assert model._conv_stem.padding == (1, 1) and not model._conv_stem.tf_same
    assert np.isclose(model._bn0.eps, 1e-3)
