"""The contrastive models' shared parts (trainer/contrastive.py) against independent references: the NT-Xent and
cross-view losses against their formulas computed by hand, SimCLR's augmentations (deterministic per seed, in
range, each op doing what torchvision's does), the rotations against torch.rot90, and the Mahalanobis scorer
against numpy's pinv of the biased covariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.contrastive import (
    FeatureMapDeviation,
    NearestClusterDistance,
    ProjectionHead,
    ResNet18,
    Rotations,
    SimClrAugment,
    bounded_bank,
    cluster_gaussians,
    color_jitter,
    cosine_schedule,
    cross_view_infonce,
    nt_xent,
    random_grayscale,
    random_resized_crop,
    rotate_each,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_nt_xent_is_the_formula_by_hand() -> None:
    rng = np.random.default_rng(0)
    z1, z2, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), 0.5
    views = np.concatenate([z1, z2])
    n = len(z1)
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        denominator = sum(math.exp(_cos(views[i], views[k]) / t) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(_cos(views[i], views[partner]) / t) / denominator))
    got = nt_xent(torch.from_numpy(z1), torch.from_numpy(z2), t)
    assert got.item() == pytest.approx(np.mean(losses), rel=1e-5)
    per = nt_xent(torch.from_numpy(z1), torch.from_numpy(z2), t, reduce=False)
    np.testing.assert_allclose(per.numpy(), (np.array(losses[:n]) + np.array(losses[n:])) / 2, rtol=1e-5)
    # aligned views give a lower loss than shuffled ones
    assert nt_xent(torch.from_numpy(z1), torch.from_numpy(z1 + 0.01), t) < nt_xent(torch.from_numpy(z1),
                                                                                  torch.from_numpy(z2), t)


def test_cross_view_infonce_is_the_formula_by_hand() -> None:
    rng = np.random.default_rng(1)
    z1, z2, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), 0.2
    expected = [-math.log(math.exp(_cos(z1[i], z2[i]) / t) / sum(math.exp(_cos(z1[i], z2[k]) / t) for k in range(3)))
                for i in range(3)]
    got = cross_view_infonce(torch.from_numpy(z1), torch.from_numpy(z2), t, reduce=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def _batch(channels: int = 3, n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_is_deterministic_per_seed_and_in_range(channels: int) -> None:
    x = _batch(channels)
    aug = SimClrAugment()
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    assert not torch.allclose(a, x)


def test_crop_at_full_scale_is_the_image_or_its_mirror() -> None:
    x = _batch()
    same = random_resized_crop(x, 1.0, flip_p=0.0, generator=torch.Generator().manual_seed(0))
    mirrored = random_resized_crop(x, 1.0, flip_p=1.0, generator=torch.Generator().manual_seed(0))
    # area 1 fits only at ratio 1: after 10 tries the whole image (up to the bilinear resampling)
    assert torch.allclose(same, x, atol=1e-5) and torch.allclose(mirrored, x.flip(3), atol=1e-5)
    small = random_resized_crop(x, 0.1, flip_p=0.0, generator=torch.Generator().manual_seed(0))
    assert (small - x).abs().mean() > 0.1  # a zoomed part


def test_colour_ops_do_what_torchvision_does() -> None:
    y = (_batch() + 1) / 2
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(color_jitter(y, 0.4, 0.4, 0.4, 0.1, p=0.0, generator=gen), y, atol=1e-6)  # p 0: untouched
    grey = random_grayscale(y, 1.0)
    luma = 0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]
    assert all(torch.allclose(grey[:, c], luma, atol=1e-6) for c in range(3))
    # brightness alone scales; contrast alone keeps the grey mean; hue alone keeps grey pixels and luma
    b = color_jitter(y * 0.5, 0.4, 0.0, 0.0, 0.0, p=1.0, generator=torch.Generator().manual_seed(1))
    factor = b.sum((1, 2, 3), keepdim=True) / (y * 0.5).sum((1, 2, 3), keepdim=True)
    assert torch.allclose(b, y * 0.5 * factor, atol=1e-5) and not torch.allclose(factor, torch.ones(1))
    assert factor.min() >= 0.6 - 1e-6 and factor.max() <= 1.4 + 1e-6
    g = torch.full((2, 3, 4, 4), 0.3)
    h = color_jitter(torch.cat([g, y[:2, :, :4, :4]]), 0.0, 0.0, 0.0, 0.5, p=1.0,
                     generator=torch.Generator().manual_seed(2))
    assert torch.allclose(h[:2], g, atol=1e-5)
    luma_of = (lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2])  # noqa: E731
    assert not torch.allclose(h[2:], y[:2, :, :4, :4], atol=1e-3)
    inside = (h[2:] > 0.01).all(1) & (h[2:] < 0.99).all(1)  # unclamped pixels keep their luma
    assert torch.allclose(luma_of(h[2:])[inside], luma_of(y[:2, :, :4, :4])[inside], atol=1e-4)


def test_rotations_equal_torch_rot90_rotation_major() -> None:
    x = _batch(2, n=3, size=8)
    got = Rotations(8)(x)
    expected = torch.cat([torch.rot90(x, k, (2, 3)) for k in range(4)])
    assert torch.equal(got, expected)
    k = torch.tensor([0, 3, 1])
    each = rotate_each(x, k)
    assert all(torch.equal(each[i], torch.rot90(x[i], int(k[i]), (1, 2))) for i in range(3))


def test_mahalanobis_clusters_is_the_official_pinv_of_the_biased_covariance() -> None:
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (30, 4)), rng.normal(5, 2, (40, 4))])
    labels = np.r_[np.zeros(30, int), np.ones(40, int)]
    means, precisions = cluster_gaussians(feats, labels, 2)
    for c in range(2):
        np.testing.assert_allclose(precisions[c], np.linalg.pinv(np.cov(feats[labels == c].T, bias=True)), rtol=1e-6)
    q = rng.normal(2, 3, (5, 4))
    expected = np.min([np.sum((q - means[c]) * (precisions[c] @ (q - means[c]).T).T, 1) for c in range(2)], 0)
    got = NearestClusterDistance(means, precisions)(torch.from_numpy(q).float())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_networks_bank_map_and_schedule() -> None:
    enc = ResNet18(1, 4)
    pooled, fmap = enc(torch.zeros(2, 1, 32, 32))
    assert pooled.shape == (2, 32) and fmap.shape == (2, 32, 4, 4) and enc.dim == 32
    assert ProjectionHead(32, [32], 128)(pooled).shape == (2, 128)
    bank = bounded_bank(torch.arange(100.0)[:, None], 10, seed=0)
    assert bank.shape == (10, 1) and len(set(bank[:, 0].tolist())) == 10
    assert torch.equal(bounded_bank(torch.arange(5.0)[:, None], 10, 0), torch.arange(5.0)[:, None])
    dev = FeatureMapDeviation(2, (2, 2), (8, 8))
    maps = torch.randn(50, 2, 2, 2)
    dev.fit(maps)
    far = dev(maps.mean(0, keepdim=True) + 10)
    near = dev(maps.mean(0, keepdim=True))
    assert far.shape == (1, 8, 8) and far.min() > near.max()
    assert cosine_schedule(1, 10) == 1.0 and cosine_schedule(6, 10) == pytest.approx(0.5)
