"""Network building blocks shared by the models: the DCGAN encoder/decoder/discriminator and the U-Net generator.

Written after the official code of the GAN-based anomaly models (DCGAN layout; pix2pix's U-Net): 4x4 convolutions
of stride 2 without bias, BatchNorm, LeakyReLU(0.2) going down and ReLU coming up, tanh out, and DCGAN's
initialisation. Every input size that is a power of two from 32 works.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation (the official code's ``weights_init``): conv N(0, 0.02), BatchNorm N(1, 0.02), bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def check_power_of_two(hw: tuple[int, int], model: str) -> int:
    """The side of a square power-of-two input from 32; anything else is a one-line config error."""
    h, w = hw
    if h != w or h < 32 or h & (h - 1):
        from core.errors import UserError

        raise UserError(f"input {h}x{w}: {model} needs a square input whose side is a power of two from 32 "
                        f"(32, 64, 128, 256); set input: {{height: 64, width: 64}} in the train config")
    return h


class DcganEncoder(nn.Module):
    """x [N,C,S,S] -> [N,nz,1,1]: conv(4,2,1) down to 4x4 (channels doubling from ``width``), then a 4x4 conv."""

    def __init__(self, size: int, channels: int, nz: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        side, c = size // 2, width
        while side > 4:
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, inplace=True)]
            side, c = side // 2, c * 2
        self.features = nn.Sequential(*layers)  # [N, c, 4, 4]: the discriminator's feature map
        self.final = nn.Conv2d(c, nz, 4, 1, 0, bias=False)
        self.feature_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.features(x))


class DcganDecoder(nn.Module):
    """z [N,nz,1,1] -> [N,C,S,S] in [-1, 1]: the encoder mirrored with transposed convolutions."""

    def __init__(self, size: int, channels: int, nz: int, width: int) -> None:
        super().__init__()
        c = width * size // 8  # channels at 4x4, so that the last hidden layer has ``width``
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        side = 4
        while side < size // 2:
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            side, c = side * 2, c // 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class DcganDiscriminator(nn.Module):
    """x -> (logit [N], features [N,c,4,4]): a DCGAN encoder with one output; its last feature map is what
    the GAN-based models' feature-matching and latent losses compare. Returns logits (the official
    code's sigmoid is folded into the loss as BCE-with-logits, which is the same function, stable under AMP)."""

    def __init__(self, size: int, channels: int, width: int) -> None:
        super().__init__()
        self.encoder = DcganEncoder(size, channels, 1, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.features(x)
        return self.encoder.final(features).flatten(), features


class UnetBlock(nn.Module):
    """One level of pix2pix's U-Net: down, the inner levels, up, and the skip connection (concatenation)."""

    def __init__(self, outer: int, inner: int, inner_block: Optional[nn.Module] = None,
                 in_channels: Optional[int] = None, outermost: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        in_channels = outer if in_channels is None else in_channels
        down = nn.Conv2d(in_channels, inner, 4, 2, 1, bias=False)
        if outermost:
            assert inner_block is not None
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1)
            layers: list[nn.Module] = [down, inner_block, nn.ReLU(True), up, nn.Tanh()]
        elif inner_block is None:  # innermost: 2x2 -> 1x1 and back, no BatchNorm at 1x1
            up = nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, nn.BatchNorm2d(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.BatchNorm2d(inner), inner_block, nn.ReLU(True), up,
                      nn.BatchNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix's U-Net with log2(size) levels down to 1x1 (a skip-connected GAN generator), channels up to 8 x width."""

    def __init__(self, size: int, channels: int, width: int) -> None:
        super().__init__()
        levels = int(math.log2(size))
        block = UnetBlock(width * 8, width * 8)
        for _ in range(levels - 5):
            block = UnetBlock(width * 8, width * 8, block)
        block = UnetBlock(width * 4, width * 8, block)
        block = UnetBlock(width * 2, width * 4, block)
        block = UnetBlock(width, width * 2, block)
        self.model = UnetBlock(channels, width, block, in_channels=channels, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class WideBasicBlock(nn.Module):
    """Pre-activation residual block of a Wide ResNet: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, 1x1 projection
    shortcut when the shape changes (Zagoruyko & Komodakis 2016; the transformation classifier's official net)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width classifier: a 3x3 conv of 16, three groups of (depth - 4) / 6 blocks of 16, 32 and 64 x
    width channels (strides 1, 2, 2), BN-ReLU, global average pool, linear. Returns (logits, last feature map)."""

    def __init__(self, channels: int, classes: int, depth: int = 10, width: int = 4) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError("Wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28)")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)]
        for group, stride in zip(range(3), (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(WideBasicBlock(widths[group] if i == 0 else widths[group + 1], widths[group + 1],
                                             stride if i == 0 else 1))
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], classes)
        self.widths = widths
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = torch.relu(self.bn(self.features(x)))
        return self.fc(feat.mean((2, 3))), feat
