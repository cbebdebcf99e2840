"""What the student-teacher (knowledge-distillation) models in trainer/models/ share: a frozen teacher,
per-position discrepancy maps between teacher and student features, and the fusion of several levels' maps into
one image-sized map.

Why here: every model of the family scores a position by how far its student's feature is from the teacher's,
level by level, then brings the levels to the input's size and fuses them (the feature-pyramid matching paper
multiplies them, the reverse and multiresolution distillation papers add them). Written once, those steps export
the same ONNX ops for every model (Reduce, Resize, Mul/Add: nothing TensorRT's readiness check refuses) and are
tested once (tests/test_distillation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8  # keeps a zero feature vector's norm away from 0 (a dead ReLU position), in FP16 too (> 6e-8 after x^2 sums)
Module = TypeVar("Module", bound=nn.Module)


def frozen(module: Module) -> Module:
    """``module`` in eval mode with no parameter trained: a teacher (its batch norms keep their statistics)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """[N,C,h,w] x2 -> [N,1,h,w]: 1 - cosine similarity over channels at every position (0 = same direction).

    Equal to half the squared distance of the two L2-normalised vectors, the feature-pyramid matching loss."""
    return _one_minus_cosine(teacher, student)


def flattened_cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """[N,...] x2 -> [N]: 1 - cosine similarity of each image's whole map taken as one vector (the reverse and
    multiresolution distillation codes' loss terms)."""
    return _one_minus_cosine(teacher.flatten(1), student.flatten(1))[:, 0]


def _one_minus_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over dim 1, kept: norms by sum of squares + EPS (exports, and safe in FP16)."""
    dot = (a * b).sum(1, keepdim=True)
    norms = a.pow(2).sum(1, keepdim=True).add(EPS).sqrt() * b.pow(2).sum(1, keepdim=True).add(EPS).sqrt()
    return 1.0 - dot / norms


def squared_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """[N,C,h,w] x2 -> [N,1,h,w]: the mean over channels of the squared difference (the value losses)."""
    return (teacher - student).pow(2).mean(1, keepdim=True)


FUSIONS = ("sum", "product", "mean")


def fuse_levels(maps: Sequence[torch.Tensor], hw: tuple[int, int], how: str = "sum") -> torch.Tensor:
    """Per-level maps [N,1,h_i,w_i] -> one map [N,1,H,W]: each upsampled (bilinear) to ``hw``, then summed,
    multiplied (feature-pyramid matching) or averaged."""
    if how not in FUSIONS:
        raise ValueError(f"fusion {how!r}: expected one of {', '.join(FUSIONS)}")
    if not maps:
        raise ValueError("fuse_levels needs at least one map")
    ups = [F.interpolate(m, size=hw, mode="bilinear", align_corners=False) for m in maps]
    out = ups[0]
    for up in ups[1:]:
        out = out * up if how == "product" else out + up
    return out / float(len(maps)) if how == "mean" else out
