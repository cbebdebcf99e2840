"""Small modules that run inside every exported graph: frame conversion in, score scaling and map smoothing out.

The bundle contract puts all of this in the ONNX file (uint8 BGR frames in, score and map out), so the
station never needs Python to prepare a frame or interpret a score; each model composes these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ITU-R BT.601 luma, the weights cv2.cvtColor(BGR2GRAY) uses: a grey image read as BGR (B = G = R) maps back exactly.
_LUMA_BGR = (0.114, 0.587, 0.299)


class FrameInput(nn.Module):
    """uint8 BGR frames [N,H,W,3] -> float [N,C,H,W] in [-1, 1]: RGB (C = 3) or luma (C = 1)."""

    weights: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        self.channels = channels
        if channels == 1:
            self.register_buffer("weights", (torch.tensor(_LUMA_BGR) * (2.0 / 255.0)).view(1, 3, 1, 1))
        else:
            self.register_buffer("weights", torch.full((1, 3, 1, 1), 2.0 / 255.0))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(torch.float32).permute(0, 3, 1, 2)
        if self.channels == 1:
            return (x * self.weights).sum(1, keepdim=True) - 1.0
        return x.flip(1) * self.weights - 1.0  # BGR -> RGB, then [0, 255] -> [-1, 1]


class ImageNetInput(nn.Module):
    """uint8 BGR frames [N,H,W,3] -> ImageNet-normalised RGB float [N,3,H,W], for the pretrained backbones.

    ``(x/255 - mean)/std = x * scale - offset``: one multiply-add per pixel.
    """

    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("offset", torch.tensor(mean).view(1, 3, 1, 1) / std_t)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # Cast first (TensorRT takes UINT8 only at the graph's edge), then BGR -> RGB on the channel planes: a
        # reversed Slice over the innermost axis of size 3 cost ONNX Runtime 0.29 ms a 160 px frame, over the
        # planes a few hundredths (same values)
        x = frames.to(torch.float32).permute(0, 3, 1, 2).flip(1)
        return x * self.scale - self.offset


class ScoreScale(nn.Module):
    """(raw - low) / (high - low) with constants from calibration data, never from the test set."""

    low: torch.Tensor
    inv_range: torch.Tensor

    def __init__(self, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("inv_range", torch.tensor(1.0))
        self.set(low, high)

    def set(self, low: float, high: float) -> None:
        span = high - low
        self.low.fill_(float(low))
        self.inv_range.fill_(1.0 / span if span > 1e-12 else 1.0)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.low) * self.inv_range


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class MapBlur(nn.Module):
    """Separable Gaussian blur with zero padding, divided by the blurred ones-map (no dark borders, no Pad op)."""

    kx: torch.Tensor
    ky: torch.Tensor
    norm: torch.Tensor

    def __init__(self, sigma: float, hw: tuple[int, int]):
        super().__init__()
        k = _gaussian_kernel(sigma)
        self.pad = len(k) // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1).clone())
        self.register_buffer("ky", k.view(1, 1, -1, 1).clone())
        ones = torch.ones(1, 1, *hw)
        self.register_buffer("norm", 1.0 / self._blur(ones))

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.kx, padding=(0, self.pad))
        return F.conv2d(x, self.ky, padding=(self.pad, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._blur(x) * self.norm


class ReconstructionMap(nn.Module):
    """Per-pixel |x - reconstruction| (mean over channels, in [0, 1] pixel units), smoothed: where a part differs."""

    def __init__(self, sigma: float, hw: tuple[int, int]) -> None:
        super().__init__()
        self.blur = MapBlur(sigma, hw) if sigma > 0 else None

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        amap = (x - reconstruction).abs().mean(1, keepdim=True) * 0.5
        if self.blur is not None:
            amap = self.blur(amap)
        return amap.squeeze(1)
