"""Threshold calibration: normals-only is a high quantile (never the minimum); F1 with labelled defects."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import UserError
from trainer.calibrate import calibrate, f1_threshold, quantile_threshold, split_holdout


def test_normals_only_threshold_is_high_quantile_not_minimum() -> None:
    scores = np.random.default_rng(0).normal(10.0, 1.0, 200)
    cal = calibrate(scores, method="auto", quantile=0.99, margin=0.1)
    assert cal["method"] == "quantile"
    assert cal["threshold"] > np.quantile(scores, 0.99) > np.median(scores) > scores.min()
    assert np.mean(scores >= cal["threshold"]) <= 0.01
    for key in ("normal_mean", "normal_std", "normal_min", "normal_max", "normal_median"):
        assert np.isfinite(cal[key])


def test_quantile_threshold_few_samples() -> None:
    scores = np.array([20.0, 21.0, 21.5, 22.0, 23.0])
    thr = quantile_threshold(scores, 0.99, 0.1)
    assert thr > scores.max() - 0.1 and thr > scores.min()


def test_f1_threshold_separates() -> None:
    scores = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    thr, f1 = f1_threshold(scores, labels)
    assert f1 == 1.0 and 3.0 < thr < 10.0


def test_f1_used_when_validation_has_defects() -> None:
    normals = np.array([1.0, 1.5, 2.0, 2.5])
    cal = calibrate(normals, val_scores=np.array([2.2, 9.0, 10.0]), val_labels=np.array([0, 1, 1]))
    assert cal["method"] == "f1" and 2.5 < cal["threshold"] < 9.0
    assert cal["n_normal"] == 5 and cal["n_anomalous"] == 2
    forced = calibrate(normals, method="quantile", val_scores=np.array([9.0]), val_labels=np.array([1]))
    assert forced["method"] == "quantile"
    with pytest.raises(UserError, match="no defect images"):
        calibrate(normals, method="f1")


def test_holdout_split_disjoint_and_seeded() -> None:
    fit, hold = split_holdout(40, 0.2, seed=1)
    assert len(hold) == 8 and len(fit) == 32 and not set(fit) & set(hold)
    assert np.array_equal(hold, split_holdout(40, 0.2, seed=1)[1])
    assert len(split_holdout(2, 0.2, seed=0)[1]) == 1
    with pytest.raises(UserError, match="at least 2"):
        split_holdout(1, 0.2, seed=0)


def test_few_held_out_images_get_a_spread_based_floor() -> None:
    """Eight held-out scores: their 0.99 quantile is about their maximum, which good frames often exceed."""
    rng = np.random.default_rng(0)
    held_out = rng.normal(20.0, 1.0, size=8)
    thr = quantile_threshold(held_out, 0.99, 0.5, sigmas=3.0)
    assert thr >= held_out.mean() + 3.0 * held_out.std()
    fresh_good = rng.normal(20.0, 1.0, size=10_000)
    quantile_only = quantile_threshold(held_out, 0.99, 0.5, sigmas=0.0)
    assert quantile_only < thr
    # single good frames over the threshold: fewer with the floor, and few (k-of-n filters the rest)
    assert (fresh_good >= thr).mean() < min(0.05, (fresh_good >= quantile_only).mean())
