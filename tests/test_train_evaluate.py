"""Train and evaluate on the bundled data, with a real MLflow store and real LightGBM."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import numpy as np
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


def _stacked(sizes: dict[tuple[str, int], int]) -> pd.DataFrame:
    """Stacked snapshots with ``sizes[(cutoff, churned)]`` rows per stratum."""
    parts = [
        pd.DataFrame({"cutoff": cutoff, "churned": label, "row": range(n)})
        for (cutoff, label), n in sizes.items()
    ]
    return pd.concat(parts, ignore_index=True)


def test_stratified_sample_keeps_cutoff_and_label_shares():
    # 1000 rows: 600 at the first cutoff (450 kept, 150 churned), 400 at the second (100/300).
    snapshots = _stacked({("a", 0): 450, ("a", 1): 150, ("b", 0): 100, ("b", 1): 300})
    sample = train.stratified_sample(snapshots, 100, seed=7)
    counts = sample.groupby(["cutoff", "churned"]).size().to_dict()
    assert counts == {("a", 0): 45, ("a", 1): 15, ("b", 0): 10, ("b", 1): 30}
    assert sample.index.is_monotonic_increasing  # rows keep their order
    assert sample.index.is_unique
    again = train.stratified_sample(snapshots, 100, seed=7)
    assert again.index.equals(sample.index)


def test_stratified_sample_gives_leftover_rows_to_largest_remainders():
    # Shares of 7 rows over strata of 5, 3, 2: 3.5, 2.1, 1.4 -> floors 3, 2, 1 and one left,
    # which goes to the largest remainder (0.5, the first stratum).
    snapshots = _stacked({("a", 0): 5, ("a", 1): 3, ("b", 0): 2})
    sample = train.stratified_sample(snapshots, 7, seed=0)
    assert sample.groupby(["cutoff", "churned"]).size().tolist() == [4, 2, 1]


def test_stratified_sample_returns_everything_when_under_the_cap():
    snapshots = _stacked({("a", 0): 3, ("b", 1): 2})
    assert train.stratified_sample(snapshots, 5, seed=0) is snapshots


def test_training_above_max_rows_samples_and_logs_it(make_settings, tracking):
    rng = np.random.default_rng(3)
    n = 800
    recency = rng.integers(1, 365, n)
    snapshots = pd.DataFrame(
        {
            "customer_id": [f"C{i:04d}" for i in range(n)],
            "cutoff": np.repeat(pd.to_datetime(["2024-01-01", "2024-04-01"]).date, n // 2),
            "recency_days": recency,
            "frequency": rng.integers(1, 20, n),
            "churned": (recency + rng.normal(0, 60, n) > 180).astype("int8"),
        }
    )
    settings = make_settings(train={"max_rows": 500, "max_rounds": 20})
    paths = settings.paths
    paths.features.mkdir(parents=True)
    snapshots.to_parquet(paths.features / "train.parquet", index=False)
    (paths.features / "spec.json").write_text('{"horizon_days": 90, "feature_hash": "h"}')
    summary = train.run(settings.train, settings.mlflow, paths, seed=1)
    run = mlflow.MlflowClient().get_run(summary.run_id)
    assert run.data.params["train_rows_total"] == "800"
    assert run.data.params["train_rows_used"] == "500"
    assert run.data.params["train_sampled"] == "True"
    assert run.data.tags["train_sampled"] == "true"
