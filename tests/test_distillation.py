"""The student-teacher family's shared steps (trainer/distillation.py): the per-position distances against their
definitions, the fusion of levels, and a teacher that stays frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.distillation import cosine_distance, flattened_cosine_distance, frozen, fuse_levels, squared_distance


def test_cosine_distance_is_one_minus_cosine_and_half_the_normalised_squared_distance() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    d = cosine_distance(t, s)
    assert d.shape == (2, 1, 3, 4)
    assert torch.allclose(d[:, 0], 1 - F.cosine_similarity(t, s, dim=1), atol=1e-6)
    half_sq = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1)  # STPM's loss
    assert torch.allclose(d[:, 0], half_sq, atol=1e-6)
    assert torch.allclose(cosine_distance(t, 3 * t), torch.zeros(2, 1, 3, 4), atol=1e-6)
    assert torch.isfinite(cosine_distance(torch.zeros(1, 5, 2, 2), s[:1, :, :2, :2])).all()  # a dead position


def test_flattened_cosine_distance_takes_each_image_as_one_vector() -> None:
    torch.manual_seed(1)
    t, s = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    d = flattened_cosine_distance(t, s)
    assert d.shape == (3,)
    assert torch.allclose(d, 1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1), atol=1e-6)
    assert not torch.allclose(d, cosine_distance(t, s).flatten(1).mean(1), atol=1e-3)  # not the per-position mean


def test_squared_distance_is_the_channel_mean() -> None:
    t, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(squared_distance(t, s)[:, 0], ((t - s) ** 2).mean(1))


def test_fuse_levels_upsamples_then_adds_multiplies_or_averages() -> None:
    a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 2, 2)
    up = [F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in (a, b)]
    assert torch.allclose(fuse_levels([a, b], (8, 8), "sum"), up[0] + up[1])
    assert torch.allclose(fuse_levels([a, b], (8, 8), "product"), up[0] * up[1])
    assert torch.allclose(fuse_levels([a, b], (8, 8), "mean"), (up[0] + up[1]) / 2)
    with pytest.raises(ValueError, match="fusion"):
        fuse_levels([a], (8, 8), "max")


def test_a_frozen_teacher_trains_nothing_and_keeps_its_statistics() -> None:
    norm = nn.BatchNorm2d(4)
    net = frozen(nn.Sequential(nn.Conv2d(3, 4, 3), norm))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert norm.running_mean is not None
    before = norm.running_mean.clone()
    net(torch.randn(2, 3, 8, 8))
    assert torch.equal(norm.running_mean, before)
