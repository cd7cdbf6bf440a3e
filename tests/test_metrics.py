from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from churn.metrics import (
    calibration_table,
    capture_at,
    classification_report,
    expected_calibration_error,
    gains_points,
    lift_at,
    roc_points,
    score_ranks,
    weighted_auc,
)


def _slow_auc(y, s):
    """Probability that a random churner outranks a random non-churner (ties count half)."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.fixture
def sample():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0.001, 0.999).round(2)  # with ties
    return y, s


def test_roc_auc_matches_pairwise_count(sample):
    y, s = sample
    assert classification_report(y, s)["roc_auc"] == pytest.approx(_slow_auc(y, s))


def test_weighted_auc_is_the_auc_of_the_repeated_rows(sample):
    y, s = sample
    ranks = score_ranks(s)
    rng = np.random.default_rng(3)
    for _ in range(5):
        rows = rng.integers(0, len(y), len(y))  # a bootstrap resample, ties included
        counts = np.bincount(rows, minlength=len(y))
        assert weighted_auc(y, ranks, counts) == pytest.approx(roc_auc_score(y[rows], s[rows]))
    assert weighted_auc(y, ranks, np.ones(len(y))) == pytest.approx(_slow_auc(y, s))


def test_lift_and_capture_by_hand():
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    assert lift_at(y, s, fraction=0.1) == pytest.approx(1 / 0.3)
    assert lift_at(y, s, fraction=0.3) == pytest.approx((2 / 3) / 0.3)
    assert capture_at(y, s, fraction=0.2) == pytest.approx(1 / 3)
    assert capture_at(y, s, fraction=1.0) == 1.0


def test_ece_of_perfect_calibration_is_zero():
    y = np.array([0, 1] * 50)
    assert expected_calibration_error(y, np.full(100, 0.5), n_bins=10) == 0.0
    assert expected_calibration_error(y, np.full(100, 0.8), n_bins=10) == pytest.approx(0.3)


def test_curves_run_from_corner_to_corner(sample):
    y, s = sample
    roc, gains = roc_points(y, s), gains_points(y, s)
    assert roc.iloc[-1] == 1.0
    assert (np.diff(roc.to_numpy()) >= -1e-12).all()
    assert gains.iloc[0] == 0.0
    assert gains.iloc[-1] == 1.0
    assert (np.diff(gains.to_numpy()) >= -1e-12).all()
    # The trapezoid area under the gridded ROC matches the exact AUC closely.
    area = float(np.sum(np.diff(roc.index) * (roc.to_numpy()[1:] + roc.to_numpy()[:-1]) / 2))
    assert area == pytest.approx(_slow_auc(y, s), abs=0.01)


def test_calibration_table_bins_by_prediction():
    y = np.array([0, 0, 1, 1])
    table = calibration_table(y, np.array([0.1, 0.2, 0.8, 0.9]), n_bins=2)
    assert table["mean_predicted"].tolist() == pytest.approx([0.15, 0.85])
    assert table["observed_rate"].tolist() == [0.0, 1.0]
