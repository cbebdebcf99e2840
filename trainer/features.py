"""Pretrained-feature taps inside the exported graph: uint8 BGR frames -> the backbone's feature maps.

The pretrained-feature models need no training beyond feature extraction: their whole model is a frozen
ImageNet backbone plus statistics of normal features. This module is the shared front of their graphs (cast,
BGR -> RGB, the backbone's own normalisation, the taps); what each model does with the maps lives in its file.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from trainer.backbones import Backbone, Taps, load_backbone, resolve_taps
from trainer.ingraph import ImageNetInput


class BackboneTaps(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> the feature maps of ``taps`` [N,C_i,h_i,w_i], in ascending tap order."""

    def __init__(self, backbone: Backbone, taps: Sequence[int]) -> None:
        super().__init__()
        self.input = ImageNetInput(backbone.mean, backbone.std)
        self.backbone = backbone.eval()
        self.taps = tuple(sorted(taps))

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.features(self.input(frames), self.taps)

    def channels(self) -> list[int]:
        return self.backbone.channels(self.taps)


def config_taps(backbone_config: Any, taps: Taps, role: str, key: str, at_least: int = 1) -> BackboneTaps:
    """The model's taps from the train config's ``backbone`` section: ``taps`` (a list or auto, from setting
    ``key``) resolved on the configured backbone, which is loaded with its weights."""
    name = str(backbone_config.name)
    chosen = resolve_taps(name, taps, role, key, at_least)
    return BackboneTaps(load_backbone(name, backbone_config.weights, chosen), chosen)


def pooled(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Global average pool of each map: [N,C,h,w] -> [N,C] (the image-level models' features)."""
    return [m.mean((2, 3)) for m in maps]
