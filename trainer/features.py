"""Pretrained-feature taps inside the exported graph: uint8 BGR frames -> the backbone's feature maps.

The pretrained-feature models need no training beyond feature extraction: their whole model is a frozen
ImageNet backbone plus statistics of normal features. This module is the shared front of their graphs (cast,
BGR -> RGB, ImageNet normalisation, the taps); what each model does with the maps lives in its own file.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainer.backbones import FEATURE_INFO, IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0
from trainer.ingraph import ImageNetInput


def tap_channels(taps: Sequence[int]) -> list[int]:
    """Channels of each tap's feature map."""
    return [FEATURE_INFO[t][0] for t in taps]


class BackboneTaps(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> the feature maps of ``taps`` [N,C_i,h_i,w_i], in ascending tap order."""

    def __init__(self, backbone: EfficientNetLite0, taps: Sequence[int]) -> None:
        super().__init__()
        self.input = ImageNetInput(IMAGENET_MEAN, IMAGENET_STD)
        self.backbone = backbone.eval()
        self.taps = tuple(sorted(taps))

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.features(self.input(frames), self.taps)


def pooled(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Global average pool of each map: [N,C,h,w] -> [N,C] (the image-level models' features)."""
    return [m.mean((2, 3)) for m in maps]
