"""Ranking and calibration metrics for churn scores, and the curves behind the plots.

Every function takes ``y_true`` (1 = churned) and ``y_score`` (higher = riskier). Curves return
frames on a fixed grid so several models share one plot file.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn import metrics as skm

GRID = np.linspace(0.0, 1.0, 101)


def _ranked(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Labels ordered riskiest first; ties keep input order (stable)."""
    return np.asarray(y_true)[np.argsort(-np.asarray(y_score), kind="stable")]


def _top(y_true: np.ndarray, y_score: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels of the riskiest ``fraction``, all labels ranked riskiest first)."""
    ranked = _ranked(y_true, y_score)
    return ranked[: max(1, math.ceil(fraction * len(ranked)))], ranked


def lift_at(y_true: np.ndarray, y_score: np.ndarray, *, fraction: float) -> float:
    """Churn rate among the riskiest ``fraction`` of customers over the overall churn rate.

    >>> lift_at(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3]), fraction=0.25)
    4.0
    """
    top, ranked = _top(y_true, y_score, fraction)
    return float(top.mean() / ranked.mean())


def capture_at(y_true: np.ndarray, y_score: np.ndarray, *, fraction: float) -> float:
    """Share of all churners found among the riskiest ``fraction`` of customers.

    >>> capture_at(np.array([1, 1, 0, 0]), np.array([0.9, 0.1, 0.8, 0.3]), fraction=0.5)
    0.5
    """
    top, ranked = _top(y_true, y_score, fraction)
    return float(top.sum() / ranked.sum())


def score_ranks(y_score: np.ndarray) -> np.ndarray:
    """Each score's rank among the distinct scores, lowest first; ties share a rank."""
    return np.unique(np.asarray(y_score), return_inverse=True)[1].ravel()


def weighted_auc(y_true: np.ndarray, ranks: np.ndarray, weights: np.ndarray) -> float:
    """ROC-AUC with each row counted ``weights`` times (a bootstrap resample's counts), from
    the scores' :func:`score_ranks`, so resamples need no sort: the share of (churner,
    non-churner) pairs the score orders right, ties counting half.

    >>> ranks = score_ranks(np.array([0.9, 0.9, 0.3, 0.1]))
    >>> weighted_auc(np.array([1, 0, 1, 0]), ranks, np.array([2, 1, 0, 3]))
    0.875
    """
    groups, churned = int(ranks.max()) + 1, np.asarray(y_true, dtype="float64")
    churners = np.bincount(ranks, weights=weights * churned, minlength=groups)
    others = np.bincount(ranks, weights=weights * (1 - churned), minlength=groups)
    below = np.cumsum(others) - others
    return float(churners @ (below + 0.5 * others) / (churners.sum() * others.sum()))


def expected_calibration_error(
    y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10
) -> float:
    """Mean |observed rate - mean probability| over equal-frequency bins, weighted by size."""
    order = np.argsort(np.asarray(y_prob), kind="stable")
    bins = np.array_split(order, n_bins)
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    total = sum(len(b) * abs(y_true[b].mean() - y_prob[b].mean()) for b in bins if len(b))
    return float(total / len(y_true))


def classification_report(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    top_fraction: float = 0.1,
    capture_fraction: float = 0.2,
    n_bins: int = 10,
) -> dict[str, float]:
    """The metric set of ``reports/metrics.json`` for one scorer; ``y_prob`` in (0, 1)."""
    clipped = np.clip(y_prob, 1e-6, 1 - 1e-6)
    return {
        "roc_auc": float(skm.roc_auc_score(y_true, y_prob)),
        "pr_auc": float(skm.average_precision_score(y_true, y_prob)),
        "brier": float(skm.brier_score_loss(y_true, y_prob)),
        "log_loss": float(skm.log_loss(y_true, clipped, labels=[0, 1])),
        "lift_at_10": lift_at(y_true, y_prob, fraction=top_fraction),
        "capture_at_20": capture_at(y_true, y_prob, fraction=capture_fraction),
        "ece": expected_calibration_error(y_true, y_prob, n_bins=n_bins),
    }


def roc_points(y_true: np.ndarray, y_score: np.ndarray) -> pd.Series:
    """True-positive rate at each false-positive rate of :data:`GRID`."""
    fpr, tpr, _ = skm.roc_curve(y_true, y_score)
    return pd.Series(np.interp(GRID, fpr, tpr), index=GRID)


def precision_recall_points(y_true: np.ndarray, y_score: np.ndarray) -> pd.Series:
    """Best precision reachable at each recall of :data:`GRID` (interpolated PR curve)."""
    precision, recall, _ = skm.precision_recall_curve(y_true, y_score)
    best = np.maximum.accumulate(precision[::-1])[::-1]  # envelope: precision at recall >= r
    order = np.argsort(recall, kind="stable")
    return pd.Series(np.interp(GRID, recall[order], best[order]), index=GRID)


def gains_points(y_true: np.ndarray, y_score: np.ndarray) -> pd.Series:
    """Share of churners captured when targeting each share of :data:`GRID`, riskiest first."""
    ranked = _ranked(y_true, y_score)
    captured = np.concatenate([[0.0], np.cumsum(ranked) / ranked.sum()])
    targeted = np.arange(len(ranked) + 1) / len(ranked)
    return pd.Series(np.interp(GRID, targeted, captured), index=GRID)


def calibration_table(y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10) -> pd.DataFrame:
    """Mean predicted probability and observed churn rate in equal-frequency bins."""
    frame = pd.DataFrame({"y_true": np.asarray(y_true), "y_prob": np.asarray(y_prob)})
    frame = frame.sort_values("y_prob", kind="stable").reset_index(drop=True)
    frame["bin"] = np.arange(len(frame)) * n_bins // len(frame)
    table = frame.groupby("bin").agg(
        mean_predicted=("y_prob", "mean"), observed_rate=("y_true", "mean")
    )
    return table.reset_index(drop=True)
