"""The backbones: EfficientNet-Lite0/1/2's shipped ImageNet weights load into our architecture and classify real
photos; timm backbones (WideResNet-50) load from a weights file the config names, and without one the error is
one line naming the file to bring."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.errors import UserError
from trainer.backbones import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0, load_backbone, load_efficientnet_lite0
from trainer.efficientnet_lite import load_efficientnet_lite

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


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_classify_sample_photos(variant: str) -> None:
    """Lite1/Lite2 (the other weights the package registries ship): the same architecture scaled, same photo."""
    net = load_efficientnet_lite(variant)
    with torch.no_grad():
        china = net(_centre_crop("china.jpg")).softmax(1)[0]
    print(f"{variant}: china top-1 {int(china.argmax())} p={float(china.max()):.3f}")
    assert float(china[list(CHINA_OK)].sum()) > 0.6


WRN50_CONFIG = "model: patchcore\ninput: {height: 64, width: 64}\nbackbone: {name: wide_resnet50_2, weights: %s}\n"


def test_wide_resnet50_loads_from_the_weights_file_the_config_names(tmp_path: Path) -> None:
    """A state dict saved from a randomly initialised timm WideResNet-50 (the test has no ImageNet file): the
    PatchCore built from the config carries exactly those weights, at the paper's taps (layer 2 and 3)."""
    from trainer.backbones import _import_timm
    from trainer.config import parse_train_config
    from trainer.models import create_model, get_model_class

    timm = _import_timm()
    torch.manual_seed(3)
    reference = timm.create_model("wide_resnet50_2", pretrained=False).eval()
    path = tmp_path / "wrn50.pth"
    torch.save(reference.state_dict(), path)
    cfg = parse_train_config(WRN50_CONFIG % path)
    cfg.resolve(get_model_class("patchcore").defaults)
    model = create_model("patchcore", cfg)
    backbone = model.features.backbone  # type: ignore[attr-defined]
    assert backbone.name == "wide_resnet50_2" and backbone.levels == {2: (512, 8), 3: (1024, 16)}
    loaded = dict(backbone.net.named_parameters())
    assert torch.equal(loaded["layer2.0.conv1.weight"], reference.layer2[0].conv1.weight)
    assert "layer4.0.conv1.weight" not in loaded  # nothing deeper than the last tap is built
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer3(reference.layer2(reference.layer1(reference.maxpool(reference.act1(
            reference.bn1(reference.conv1(x)))))))
        got = backbone.features(x, (2, 3))[1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_wide_resnet50_without_weights_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine that cannot reach the hub, without waiting for it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError) as err:
        load_backbone("wide_resnet50_2", None, [2, 3])
    message = str(err.value)
    print(message)
    assert "\n" not in message and "wide_resnet50_2" in message and "backbone.weights" in message
    assert "timm/wide_resnet50_2" in message  # the file to bring
    with pytest.raises(UserError, match="not found"):
        load_backbone("wide_resnet50_2", str(tmp_path / "missing.pth"), [2, 3])
    wrong = tmp_path / "lite0.pth"
    torch.save(load_efficientnet_lite0().state_dict(), wrong)
    with pytest.raises(UserError, match="not a wide_resnet50_2 state dict") as err:
        load_backbone("wide_resnet50_2", str(wrong), [2, 3])
    assert "\n" not in str(err.value)
