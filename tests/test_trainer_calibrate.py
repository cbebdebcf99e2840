"""Threshold calibration by policy: each policy picks the threshold it promises on synthetic scores, the config's
policy and the old ``method`` key parse (or fail in one line), and a fit says what it expects at its threshold."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from core.errors import ConfigError, UserError
from core.thresholds import (
    EMPIRICAL_TAIL,
    NeedsDefects,
    Policy,
    choose_threshold,
    f1_threshold,
    false_alarm_rate,
    rate_threshold,
    recall_threshold,
    recorded_policy,
)
from trainer.calibrate import calibrate, expectation_lines, quantile_threshold, split_holdout
from trainer.config import parse_train_config


def test_false_alarm_rate_policy_hits_its_target_on_a_large_sample() -> None:
    """Thousands of normals: the sample quantile; fresh normals from the same distribution cross it at the rate."""
    rng = np.random.default_rng(0)
    normals = rng.normal(10.0, 1.0, 5000)
    cal = calibrate(normals, Policy("false-alarm-rate", target_false_alarm_rate=0.02))
    assert cal["policy"] == cal["method"] == "false-alarm-rate" and cal["estimator"] == "empirical quantile"
    assert cal["threshold"] == pytest.approx(np.quantile(normals, 0.98))
    assert np.mean(rng.normal(10.0, 1.0, 100_000) >= cal["threshold"]) == pytest.approx(0.02, abs=0.004)
    assert cal["expected_false_alarm_rate"] == pytest.approx(0.02, abs=0.001)
    assert "expected_recall" not in cal and cal["n_anomalous"] == 0


def test_false_alarm_rate_on_few_normals_uses_a_gaussian_tail_not_their_maximum() -> None:
    """60 held-out normals: their 0.99 quantile is about their maximum (the old rule then sat above every defect);
    the Gaussian tail puts the 1 % point where the distribution has it."""
    rng = np.random.default_rng(1)
    normals = rng.normal(20.0, 2.0, 60)
    thr, how = rate_threshold(normals, 0.01)
    assert how == "gaussian tail" and EMPIRICAL_TAIL > 60 * 0.01
    assert thr == pytest.approx(normals.mean() + 2.3263 * normals.std(ddof=1), rel=1e-4)
    assert thr < quantile_threshold(normals, 0.99, 0.5, 3.0)  # the old rule: above the sample maximum
    assert false_alarm_rate(normals, thr) == pytest.approx(0.01, rel=1e-6)
    # over many hold-outs of 60: the good parts a line then flags, at the median, are the target's 1 %; the old
    # rule's are a few in ten thousand (and so are the defects it catches)
    line = NormalDist(20.0, 2.0)
    new, old = [], []
    for _ in range(300):
        sample = rng.normal(20.0, 2.0, 60)
        new.append(1 - line.cdf(rate_threshold(sample, 0.01)[0]))
        old.append(1 - line.cdf(quantile_threshold(sample, 0.99, 0.5, 3.0)))
    assert 0.007 < float(np.median(new)) < 0.014 and float(np.median(old)) < 0.002
    same = np.full(10, 3.0)  # no spread: just above them, so none of them is flagged
    assert rate_threshold(same, 0.01)[0] > 3.0


def test_recall_policy_catches_the_target_share_of_labelled_defects() -> None:
    normals = np.linspace(0.0, 5.0, 50)
    defects = np.arange(1.0, 21.0)  # 20 defects scoring 1..20, several among the normals
    cal = calibrate(normals, Policy("recall", target_recall=0.75), np.r_[defects, 0.5], np.r_[np.ones(20), 0])
    assert np.mean(defects >= cal["threshold"]) == 0.75 and cal["expected_recall"] == 0.75
    assert 5.0 < cal["threshold"] < 6.0  # the highest that keeps 15 of 20: halfway below the 15th
    assert cal["n_normal"] == 51 and cal["n_anomalous"] == 20  # DIR/val/good joined the normals
    assert recall_threshold(normals, defects, 1.0) < 1.0 <= defects.min()


def test_best_f1_policy_picks_the_f1_optimum() -> None:
    normals = np.array([1.0, 2.0, 3.0, 4.0, 6.5])
    defects = np.array([5.0, 6.0, 7.0, 8.0])
    thr, f1 = f1_threshold(normals, defects)
    candidates = np.unique(np.r_[normals, defects])
    best = max(2 * np.sum(defects >= t) / (np.sum(defects >= t) + np.sum(normals >= t) + defects.size)
               for t in candidates)
    assert f1 == pytest.approx(best) and 4.0 < thr < 5.0
    cal = calibrate(normals, Policy("best-f1"), defects, np.ones(4))
    assert cal["threshold"] == thr and cal["f1"] == pytest.approx(f1)


def test_policies_that_need_defects_fail_in_one_line_without_them() -> None:
    normals = np.random.default_rng(0).normal(10.0, 1.0, 40)
    for name in ("recall", "best-f1"):
        with pytest.raises(UserError) as err:
            calibrate(normals, Policy(name), np.array([9.0]), np.array([0]))
        text = str(err.value)
        assert "\n" not in text and "DIR/val/<defect>/" in text and "policy: false-alarm-rate" in text
        with pytest.raises(NeedsDefects):
            choose_threshold(Policy(name), normals)


def test_the_warning_when_most_labelled_defects_fall_below() -> None:
    normals = np.random.default_rng(0).normal(10.0, 1.0, 60)
    missed = np.r_[np.full(8, 10.5), np.full(2, 30.0)]  # 8 of 10 defects among the normals
    cal = calibrate(normals, Policy(), missed, np.ones(10))
    assert cal["most_defects_missed"] is True and cal["expected_recall"] == 0.2
    lines, warning = expectation_lines(cal)
    assert warning is not None and warning.startswith("WARNING: 80% of the 10 labelled defects")
    assert "expected recall at the threshold: 20.0% of 10 labelled defects" in lines[1]
    assert "expected false-alarm rate" in lines[0]
    caught = calibrate(normals, Policy(), np.full(10, 30.0), np.ones(10))
    assert caught["most_defects_missed"] is False and expectation_lines(caught)[1] is None
    alone = expectation_lines(calibrate(normals, Policy()))
    assert len(alone[0]) == 1 and alone[1] is None  # the false-alarm rate always, recall only with defects


def test_quantile_policy_is_the_rule_from_before() -> None:
    held_out = np.random.default_rng(0).normal(20.0, 1.0, size=8)
    cal = calibrate(held_out, Policy("quantile", quantile=0.99, margin=0.5, sigmas=3.0))
    assert cal["method"] == "quantile"
    assert cal["threshold"] == quantile_threshold(held_out, 0.99, 0.5, sigmas=3.0)
    assert cal["threshold"] >= held_out.mean() + 3.0 * held_out.std()


def test_config_policy_and_the_old_method_key() -> None:
    assert parse_train_config("").calibration.rule() == Policy()
    cfg = parse_train_config("calibration:\n  policy: recall\n  target_recall: 0.8\n").calibration
    assert cfg.rule() == Policy("recall", target_recall=0.8) and cfg.legacy_note() is None
    # a config from before policies (and every bundle's report.json recipe) still loads
    assert parse_train_config("calibration:\n  method: f1\n").calibration.rule().name == "best-f1"
    assert parse_train_config("calibration:\n  method: quantile\n").calibration.rule().name == "quantile"
    old = parse_train_config("calibration:\n  method: auto\n").calibration
    assert old.rule() == Policy() and "write that instead" in (old.legacy_note() or "")
    for text, message in (
        ("calibration:\n  policy: fastest\n", "calibration.policy 'fastest' is not one of"),
        ("calibration:\n  target_false_alarm_rate: 1.5\n", "target_false_alarm_rate must be in (0, 0.5)"),
        ("calibration:\n  method: mean\n", "calibration.method is replaced by calibration.policy"),
        ("calibration:\n  method: f1\n  policy: recall\n", "keep only policy"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_train_config(text, source="train.yaml")
        assert message in str(err.value) and "\n" not in str(err.value)


def test_recorded_policy_round_trips_through_a_calibration_dict() -> None:
    normals = np.random.default_rng(0).normal(10.0, 1.0, 40)
    for policy in (Policy(), Policy("false-alarm-rate", 0.05), Policy("quantile", quantile=0.95, margin=0.0)):
        assert recorded_policy(choose_threshold(policy, normals)) == policy
    assert recorded_policy({"threshold": 1.0, "method": "f1"}) is None  # a bundle from before policies


def test_holdout_split_disjoint_and_seeded() -> None:
    fit, hold = split_holdout(40, 0.2, seed=1)
    assert len(hold) == 8 and len(fit) == 32 and not set(fit) & set(hold)
    assert np.array_equal(hold, split_holdout(40, 0.2, seed=1)[1])
    assert len(split_holdout(2, 0.2, seed=0)[1]) == 1
    with pytest.raises(UserError, match="at least 2"):
        split_holdout(1, 0.2, seed=0)
