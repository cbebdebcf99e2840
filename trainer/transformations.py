"""Geometric transformation sets of the self-supervised models, written once.

A transformation is (flip, tx, ty, k): horizontal flip, then a translation by (tx, ty) px (+tx moves the content
right, +ty down) with a reflected border, then rot90 k times (numpy's, counter-clockwise). Every one of them is a
fixed permutation-with-repeats of the pixels, so all the copies of a frame are one Gather with constant indices
(``GeometricCopies``), in training and in the exported graph alike.

Sets:
- ``transformation_list(size, 72)``: Golan & El-Yaniv's (NeurIPS 2018; Bergman & Hoshen's official code takes the
  same ``Transformer``): flip {no, yes} x tx {0, -s, +s} x ty {0, -s, +s} x k {0, 1, 2, 3}, in that product order;
  ``count = 8``: flip x rot90 only. Border ``symmetric`` (Keras' ``apply_affine_transform`` with scipy's
  ``reflect``: the edge pixel repeats, d c b a | a b c d).
- ``translation_rotation_list(size)``: Hendrycks et al.'s (NeurIPS 2019, ss-ood): tx {0, -s, +s} x ty {0, -s, +s}
  x k {0, 1, 2, 3}, no flip (36); their official code shifts with OpenCV's ``BORDER_REFLECT_101`` (the edge pixel
  not repeated, d c b | a b c d): ``fill="reflect"``.
s = size / 4 (8 px at 32 px, 56 px at 224 px: both papers' values). Index 0 is the identity in every set.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

Transformation = tuple[bool, int, int, int]  # (flip, tx, ty, k_rot90)
FILLS = ("symmetric", "reflect")  # numpy.pad modes: edge repeated (scipy/Keras 'reflect'), not (OpenCV REFLECT_101)


def square_side(hw: tuple[int, int], model: str) -> int:
    """The side of a square input; one line naming ``model`` otherwise (its copies rotate by 90 degrees)."""
    h, w = hw
    if h != w:
        raise UserError(f"input {h}x{w}: {model} rotates by 90 degrees and needs a square input; set input: "
                        "{height: 32, width: 32} in the train config")
    return h


def transformation_list(size: int, count: int) -> list[Transformation]:
    """(flip, tx, ty, k_rot90) of the 72 transformations (or the 8 flips x rotations), the identity first."""
    s = size // 4
    if count == 8:
        return [(f, 0, 0, k) for f, k in itertools.product((False, True), range(4))]
    return list(itertools.product((False, True), (0, -s, s), (0, -s, s), range(4)))


def translation_rotation_list(size: int) -> list[Transformation]:
    """Hendrycks et al.'s 36: translate x {0, -s, +s} x translate y {0, -s, +s} x rot90 {0, 1, 2, 3}, identity first."""
    s = size // 4
    return [(False, tx, ty, k) for tx, ty, k in itertools.product((0, -s, s), (0, -s, s), range(4))]


def transform_image(img: np.ndarray, flip: bool, tx: int, ty: int, k: int, fill: str = "symmetric") -> np.ndarray:
    """One transformation of an [H, W, ...] array: flip, translate with a reflected border (``fill``), rot90 x k."""
    if flip:
        img = img[:, ::-1]
    if tx or ty:
        p = max(abs(tx), abs(ty))
        pad = [(p, p), (p, p)] + [(0, 0)] * (img.ndim - 2)
        padded = np.pad(img, pad, mode=fill)  # type: ignore[call-overload]
        h, w = img.shape[:2]
        img = padded[p - ty:p - ty + h, p - tx:p - tx + w]
    return np.rot90(img, k) if k else img


class GeometricCopies(nn.Module):
    """x [N,C,S,S] -> the T transformed copies [N*T,C,S,S] (copy t of image n at row n*T + t): one constant Gather.

    ``transformations`` (default: ``transformation_list(size, count)``) and ``fill`` choose the set."""

    index: torch.Tensor

    def __init__(self, size: int, count: int = 72, transformations: Optional[Sequence[Transformation]] = None,
                 fill: str = "symmetric") -> None:
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)}")
        self.transformations = (list(transformations) if transformations is not None
                                else transformation_list(size, count))
        self.count = len(self.transformations)
        self.size = size
        self.fill = fill
        base = np.arange(size * size).reshape(size, size)
        index = np.stack([transform_image(base, *t, fill=fill).reshape(-1) for t in self.transformations])
        self.register_buffer("index", torch.from_numpy(index.reshape(-1).astype(np.int64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = int(x.shape[1]), self.size
        copies = x.flatten(2).index_select(2, self.index).reshape(-1, c, self.count, s, s)
        return copies.transpose(1, 2).reshape(-1, c, s, s)


def copies_activation_elements(widths: Sequence[int], count: int, size: int) -> int:
    """Elements of the largest activation one frame's T copies make in a Wide ResNet (its first group, at the
    input's resolution): the bound a batch of frames must keep within TensorRT's 2^31."""
    return count * max(widths[:2]) * size * size


class CopiesClassifierExport(nn.Module):
    """frames uint8 [N,S,S,3] BGR -> (score float32 [N], anomaly_map float32 [N,S,S]) of a network that classifies
    the transformation applied to each copy: ``net`` returns (logits, last feature map) of every copy, ``score``
    turns the logits of a frame's copies into its score. The map (a coarse pointer, not a localisation): on the
    identity copy, each position's share of the logit margin for "untransformed" (``margin`` [C]: the last
    layer's weight of that class less the mean of the others, summed over heads where there are several), negated
    and upsampled: where the frame looks least like an untransformed normal one."""

    margin: torch.Tensor

    def __init__(self, frame_input: nn.Module, copies: GeometricCopies, net: nn.Module, score: nn.Module,
                 margin: torch.Tensor) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.copies = copies
        self.net = net
        self.score = score
        self.register_buffer("margin", margin.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        logits, feat = self.net(self.copies(x))
        c, h, w = int(feat.shape[1]), int(feat.shape[2]), int(feat.shape[3])
        identity = feat.reshape(-1, self.copies.count, c, h, w)[:, 0]
        cells = -(identity * self.margin).sum(1, keepdim=True)
        amap = F.interpolate(cells, size=(self.copies.size, self.copies.size), mode="bilinear", align_corners=False)
        return self.score(logits), amap[:, 0]  # not squeeze(1): traced, it became an If of unknown rank
