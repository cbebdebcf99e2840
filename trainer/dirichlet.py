"""Maximum-likelihood Dirichlet fit by Minka's fixed point (Minka 2000, "Estimating a Dirichlet distribution").

The transformation classifier fits one Dirichlet per transformation to its softmax outputs on the training
normals, as the paper's official code does: the starting point is the moment estimate (the mean times Minka's
approximate precision ``s = (K - 1)(-psi(1)) / sum_k f_k (log f_k - mean log p_k)``), then
``alpha <- psi^-1(psi(sum alpha) + mean log p)``, with psi^-1 by five Newton steps from Minka's initial guess,
until the step is below 1e-9. Only the per-component means of p and of log p are needed, so the fit streams.
"""

from __future__ import annotations

import numpy as np
from scipy.special import polygamma, psi

MAX_ITER = 1000
TOLERANCE = 1e-9


def inverse_digamma(y: np.ndarray, iters: int = 5) -> np.ndarray:
    """x with psi(x) = y: Minka's initial guess, then Newton steps."""
    x = np.where(y >= -2.22, np.exp(y) + 0.5, -1.0 / (y - psi(1.0)))
    for _ in range(iters):
        x = x - (psi(x) - y) / polygamma(1, x)
    return x


def approximate_precision(mean_p: np.ndarray, mean_log_p: np.ndarray) -> float:
    """Minka's closed-form estimate of sum(alpha) from E[p] and E[log p]."""
    k = mean_p.shape[-1]
    return float((k - 1) * -psi(1.0) / np.sum(mean_p * (np.log(mean_p) - mean_log_p)))


def fit_dirichlet(mean_p: np.ndarray, mean_log_p: np.ndarray) -> np.ndarray:
    """alpha [K] of the maximum-likelihood Dirichlet given the samples' E[p] [K] and E[log p] [K] (float64)."""
    mean_p = np.asarray(mean_p, np.float64)
    mean_log_p = np.asarray(mean_log_p, np.float64)
    alpha = mean_p * approximate_precision(mean_p, mean_log_p)
    for _ in range(MAX_ITER):
        new = inverse_digamma(psi(alpha.sum()) + mean_log_p)
        if np.sqrt(np.sum((new - alpha) ** 2)) < TOLERANCE:
            return new
        alpha = new
    return alpha
