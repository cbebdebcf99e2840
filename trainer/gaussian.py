"""Gaussian models of normal features and their Mahalanobis distance inside the exported graph.

Shared by the Gaussian models: one Gaussian per feature-map position, or one per backbone level. Fitted in
float64: per position from streamed sums (the images never sit in memory together), per level from the pooled
features with Ledoit-Wolf shrinkage. In the graph the squared distance is ``||A (x - mu)||^2`` with
``A = G^-1`` and ``G`` the Cholesky factor of the covariance: the features are centred first (no cancellation
between large terms) and one matmul gives standardised values. The sum of their squares grows with the
dimension and with the anomaly (past FP16's 65 504 on a strong one), so it has a scope of its own (``norm``)
that a model lists in its ``fp32_scopes``; a model whose whitening is ill-conditioned keeps the matmul FP32 too
(the per-position model: see its ``fp32_scopes``).
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError


class GaussianSums:
    """Running count, sum and sum of outer products of features [B, G, d]: G Gaussians of dimension d."""

    def __init__(self, groups: int, dim: int) -> None:
        self.n = 0
        self.s1 = torch.zeros(groups, dim, dtype=torch.float64)
        self.s2 = torch.zeros(groups, dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        self.n += int(x.shape[0])
        self.s1 += x.sum(0)
        self.s2 += torch.einsum("bgi,bgj->gij", x, x)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [G, d] and unbiased covariance [G, d, d] (divided by n - 1, as numpy.cov)."""
        if self.n < 2:
            raise UserError(f"{self.n} training image(s): a covariance needs at least 2; add images to train/good")
        mu = self.s1 / self.n
        cov = (self.s2 - self.n * mu[:, :, None] * mu[:, None, :]) / (self.n - 1)
        return mu, cov


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, Ledoit-Wolf shrunk covariance and the shrinkage of samples ``x`` [n, d] (as scikit-learn's LedoitWolf).

    ``(1 - s) S + s (tr S / d) I`` with S the empirical covariance (divided by n) and s the estimate of the
    optimal shrinkage (Ledoit & Wolf 2004): a well-conditioned covariance even with fewer images than dimensions.
    """
    x = x.to(torch.float64)
    n, d = x.shape
    if n < 2:
        raise UserError(f"{n} training image(s): a covariance needs at least 2; add images to train/good")
    mu = x.mean(0)
    xc = x - mu
    emp = xc.T @ xc / n
    trace_mean = float(torch.diagonal(emp).sum()) / d
    x2 = xc * xc
    beta_ = float((x2.T @ x2).sum())
    delta_ = float((emp * emp).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * trace_mean * float(torch.diagonal(emp).sum()) + d * trace_mean ** 2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    cov = (1.0 - shrinkage) * emp + shrinkage * trace_mean * torch.eye(d, dtype=torch.float64)
    return mu, cov, shrinkage


def whitening(cov: torch.Tensor, what: str) -> torch.Tensor:
    """``A = G^-1`` for each covariance [..., d, d] = G G^T (lower Cholesky): ``||A v||^2 = v^T cov^-1 v``."""
    g, info = torch.linalg.cholesky_ex(cov.to(torch.float64))
    if int(info.max()) > 0:
        raise UserError(f"{what}: covariance is not positive definite (constant images?); "
                        "add varied training images or raise the regularisation")
    eye = torch.eye(cov.shape[-1], dtype=torch.float64).expand_as(g)
    return torch.linalg.solve_triangular(g, eye, upper=False)


class SquaredNorm(nn.Module):
    """Sum of squares over the last axis; its own scope so the FP16 graph keeps it in FP32."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y * y).sum(-1)


class MahalanobisDistance(nn.Module):
    """Features [N, G, d] -> Mahalanobis distance [N, G] of each to its own Gaussian (G Gaussians of dim d).

    The matmul runs as G batched [N, d] x [d, d] products: the largest intermediate is G x N x d.
    """

    mu: torch.Tensor
    a_t: torch.Tensor

    def __init__(self, mu: torch.Tensor, whiten: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu.to(torch.float32).contiguous())
        self.register_buffer("a_t", whiten.transpose(-1, -2).to(torch.float32).contiguous())  # [G, d, d]
        self.norm = SquaredNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (x - self.mu).transpose(0, 1)  # [G, N, d]
        y = torch.matmul(v, self.a_t)  # [G, N, d]
        return self.norm(y).clamp_min(0.0).sqrt().transpose(0, 1)
