"""Evaluate stage: the model against honest baselines on the out-of-time test snapshot.

Baselines are one-score logistic models fitted on the training snapshots (never the test):
``recency`` uses days since the last purchase, ``rfm`` the sum of the RFM quintile scores.
All scorers go through the same metric functions on the same customers. The new model gets
the registry alias ``champion`` when its test ROC-AUC is at least the current champion's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from sklearn.linear_model import LogisticRegression

from churn.config import EvaluateSettings, MlflowSettings, Paths
from churn.features import LABEL
from churn.io import write_csv, write_json
from churn.metrics import (
    GRID,
    calibration_table,
    classification_report,
    gains_points,
    precision_recall_points,
    roc_points,
)
from churn.model import load_model

CHAMPION, AUC_TAG = "champion", "test_roc_auc"


@dataclass(frozen=True)
class EvaluateSummary:
    metrics: dict[str, Any]
    promoted: bool


def baseline_scores(snapshot: pd.DataFrame) -> dict[str, np.ndarray]:
    """The single score each baseline ranks customers by (higher = riskier)."""
    return {
        "recency": np.log1p(snapshot["recency_days"].to_numpy(dtype="float64")),
        "rfm": -(snapshot[["r_score", "f_score", "m_score"]].sum(axis=1)).to_numpy("float64"),
    }


def baseline_probabilities(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, np.ndarray]:
    """Churn probabilities of each baseline: a logistic map fitted on the training snapshots."""
    fitted, scored = baseline_scores(train), baseline_scores(test)
    probabilities = {}
    for name, score in fitted.items():
        logit = LogisticRegression().fit(score.reshape(-1, 1), train[LABEL])
        probabilities[name] = logit.predict_proba(scored[name].reshape(-1, 1))[:, 1]
    return probabilities


def evaluation(
    y_true: np.ndarray, scorers: dict[str, np.ndarray], settings: EvaluateSettings
) -> dict[str, dict[str, float]]:
    """The metric set of every scorer on the same customers."""
    return {
        name: classification_report(
            y_true,
            y_prob,
            top_fraction=settings.top_fraction,
            capture_fraction=settings.capture_fraction,
            n_bins=settings.calibration_bins,
        )
        for name, y_prob in scorers.items()
    }


def curves(y_true: np.ndarray, scorers: dict[str, np.ndarray]) -> dict[str, pd.DataFrame]:
    """ROC, precision-recall and cumulative-gains curves, one column per scorer."""
    tables = {}
    for kind, x_name, points in (
        ("roc", "fpr", roc_points),
        ("precision_recall", "recall", precision_recall_points),
        ("gains", "targeted", gains_points),
    ):
        table = pd.DataFrame({x_name: GRID})
        for name, y_score in scorers.items():
            table[name] = points(y_true, y_score).to_numpy()
        tables[kind] = table.round(6)
    return tables


def run(
    settings: EvaluateSettings, tracking: MlflowSettings, paths: Paths, *, horizon_days: int
) -> EvaluateSummary:
    """Score the test snapshot, write metrics and plot data, and gate the champion alias."""
    test = pd.read_parquet(paths.features / "test.parquet")
    train = pd.read_parquet(paths.features / "train.parquet")
    model = load_model(str(paths.model))
    y_true = test[LABEL].to_numpy()
    scorers = {"model": model.predict_proba(test), **baseline_probabilities(train, test)}
    scores = evaluation(y_true, scorers, settings)
    info = json.loads(paths.model_info.read_text())
    promoted = _gate(tracking.registered_model, info["model_version"], scores["model"]["roc_auc"])
    metrics = {
        "test_cutoff": str(test["cutoff"].iloc[0]),
        "horizon_days": horizon_days,
        "n_customers": len(test),
        "churn_rate": float(y_true.mean()),
        "model": scores.pop("model"),
        "baselines": scores,
        "model_version": info["model_version"],
        "promoted_to_champion": promoted,
    }
    write_json(metrics, paths.metrics)
    for kind, table in curves(y_true, scorers).items():
        write_csv(table, paths.plots / f"{kind}.csv")
    write_csv(
        calibration_table(y_true, scorers["model"], n_bins=settings.calibration_bins).round(6),
        paths.plots / "calibration.csv",
    )
    with mlflow.start_run(run_id=info["run_id"]):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics["model"].items()})
        mlflow.log_artifact(str(paths.metrics))
    return EvaluateSummary(metrics=metrics, promoted=promoted)


def _gate(name: str, version: str, roc_auc: float) -> bool:
    """Tag ``version`` with its test AUC; make it champion unless the champion scores higher."""
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, AUC_TAG, f"{roc_auc:.6f}")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if (
        champion is not None
        and str(champion.version) != version
        and float(champion.tags.get(AUC_TAG, "-inf")) > roc_auc
    ):
        return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def plot_files(paths: Paths) -> list[Path]:
    """The plot data files this stage writes (declared as DVC plots)."""
    return [paths.plots / f"{k}.csv" for k in ("roc", "precision_recall", "gains", "calibration")]
