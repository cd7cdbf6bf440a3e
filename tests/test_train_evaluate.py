"""Train and evaluate on the bundled data, with a real MLflow store and real LightGBM."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import pandas as pd
import pytest

from churn import evaluate, train
from churn.config import GateSettings, TrainSettings
from churn.evaluate import gate_decision
from churn.model import load_model


def test_metrics_json_shape_and_model_beats_recency(pipeline):
    metrics = json.loads(pipeline.settings.paths.metrics.read_text())
    keys = {"roc_auc", "pr_auc", "brier", "log_loss", "lift_at_10", "capture_at_20"}
    assert metrics["test_cutoff"] == "2011-09-11"
    assert metrics["horizon_days"] == 90
    assert metrics["n_customers"] > 4000
    assert 0 < metrics["churn_rate"] < 1
    assert set(metrics["baselines"]) == {"recency", "rfm", "bgnbd", "pareto_nbd"}
    for scorer in (metrics["model"], *metrics["baselines"].values()):
        assert keys <= set(scorer)
    # BTYD baselines score by P(no purchase in the horizon): strong rankers on this data.
    assert metrics["baselines"]["bgnbd"]["roc_auc"] > metrics["baselines"]["recency"]["roc_auc"]
    assert metrics["model"]["roc_auc"] > metrics["baselines"]["recency"]["roc_auc"] + 0.03
    for kind in ("roc", "precision_recall", "gains", "calibration"):
        assert (pipeline.settings.paths.plots / f"{kind}.csv").exists()


def test_model_is_registered_with_aliases_and_logged(pipeline):
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("churn", "champion")
    assert pipeline.promoted
    assert str(champion.version) == pipeline.model_version
    run = client.get_run(pipeline.run_id)
    assert run.data.metrics["test_roc_auc"] == pytest.approx(pipeline.metrics["model"]["roc_auc"])
    assert "validation_auc" in run.data.metrics
    assert run.data.tags["gate_decision"] == "promoted"
    registered = load_model(f"models:/churn/{pipeline.model_version}")
    local = load_model(str(pipeline.settings.paths.model))
    test = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    pd.testing.assert_series_equal(
        pd.Series(registered.predict_proba(test)), pd.Series(local.predict_proba(test))
    )


def test_weaker_model_does_not_replace_champion(pipeline, tmp_path):
    s = pipeline.settings
    paths = dataclasses.replace(
        s.paths,
        model=tmp_path / "model",
        model_info=tmp_path / "info.json",
        metrics=tmp_path / "metrics.json",
        gate_report=tmp_path / "gate.json",
        plots=tmp_path / "plots",
    )
    weak = train.run(
        TrainSettings(max_rounds=2, num_leaves=2, early_stopping_rounds=1),
        s.mlflow,
        paths,
        seed=s.seed,
    )
    outcome = evaluate.run(s.evaluate, s.gate, s.mlflow, paths, horizon_days=90)
    assert outcome.metrics["model"]["roc_auc"] < pipeline.metrics["model"]["roc_auc"]
    assert not outcome.promoted
    gate = json.loads(paths.gate_report.read_text())
    assert gate["champion"]["version"] == pipeline.model_version
    assert gate["champion"]["roc_auc"] == pytest.approx(pipeline.metrics["model"]["roc_auc"])
    assert "below the champion's" in gate["reasons"][0]
    client = mlflow.MlflowClient()
    assert (
        str(client.get_model_version_by_alias("churn", "champion").version)
        == pipeline.model_version
    )
    assert (
        str(client.get_model_version_by_alias("churn", "challenger").version) == weak.model_version
    )


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "reason"),
    [
        ({"roc_auc": 0.80, "ece": 0.02}, None, True, "no champion"),
        ({"roc_auc": 0.80, "ece": 0.02}, {"roc_auc": 0.81}, True, "within the gate"),
        ({"roc_auc": 0.80, "ece": 0.02}, {"roc_auc": 0.83}, False, "max_auc_drop"),
        ({"roc_auc": 0.90, "ece": 0.08}, {"roc_auc": 0.80}, False, "max_ece"),
    ],
    ids=["first", "small-drop", "big-drop", "badly-calibrated"],
)
def test_gate_decision(challenger, champion, promoted, reason):
    decision, reasons = gate_decision(
        challenger, champion, GateSettings(max_auc_drop=0.02, max_ece=0.05)
    )
    assert decision is promoted
    assert reason in " ".join(reasons)
