"""Train and evaluate on the bundled data, with a real MLflow store and real LightGBM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import yaml

from churn import evaluate, features, ingest, score, train
from churn.config import settings_from_dict
from churn.model import load_model
from tests.conftest import SAMPLE, merge, project_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    settings = settings_from_dict(
        merge(project_params(), {"data": {"transactions": {"path": str(SAMPLE)}}}), root
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    ingest.run(settings.data.transactions, settings.paths)
    features.run(settings.features, settings.paths)
    trained = train.run(
        settings.train, settings.mlflow, settings.paths, horizon_days=90, seed=settings.seed
    )
    evaluated = evaluate.run(settings.evaluate, settings.mlflow, settings.paths, horizon_days=90)
    yield settings, uri, trained, evaluated
    mlflow.set_tracking_uri(previous)


def test_metrics_json_shape_and_model_beats_recency(trained):
    settings, _, _, _ = trained
    metrics = json.loads(settings.paths.metrics.read_text())
    keys = {"roc_auc", "pr_auc", "brier", "log_loss", "lift_at_10", "capture_at_20"}
    assert metrics["test_cutoff"] == "2011-09-11"
    assert metrics["horizon_days"] == 90
    assert metrics["n_customers"] > 4000
    assert 0 < metrics["churn_rate"] < 1
    assert keys <= set(metrics["model"])
    assert keys <= set(metrics["baselines"]["recency"])
    assert keys <= set(metrics["baselines"]["rfm"])
    assert metrics["model"]["roc_auc"] > metrics["baselines"]["recency"]["roc_auc"] + 0.03
    for kind in ("roc", "precision_recall", "gains", "calibration"):
        assert (settings.paths.plots / f"{kind}.csv").exists()


def test_model_is_registered_with_aliases_and_logged(trained):
    settings, _, result, evaluated = trained
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("churn", "champion")
    challenger = client.get_model_version_by_alias("churn", "challenger")
    assert str(champion.version) == str(challenger.version) == result.model_version
    assert evaluated.promoted
    run = client.get_run(result.run_id)
    assert run.data.metrics["test_roc_auc"] == pytest.approx(evaluated.metrics["model"]["roc_auc"])
    assert "validation_auc" in run.data.metrics
    registered = load_model("models:/churn@champion")
    local = load_model(str(settings.paths.model))
    test = pd.read_parquet(settings.paths.features / "test.parquet")
    pd.testing.assert_series_equal(
        pd.Series(registered.predict_proba(test)), pd.Series(local.predict_proba(test))
    )


def test_weaker_model_does_not_replace_champion(trained):
    settings, _, result, evaluated = trained
    weak = train.run(
        type(settings.train)(max_rounds=2, num_leaves=2, early_stopping_rounds=1),
        settings.mlflow,
        settings.paths,
        horizon_days=90,
        seed=settings.seed,
    )
    outcome = evaluate.run(settings.evaluate, settings.mlflow, settings.paths, horizon_days=90)
    assert outcome.metrics["model"]["roc_auc"] < evaluated.metrics["model"]["roc_auc"]
    assert not outcome.promoted
    client = mlflow.MlflowClient()
    assert (
        str(client.get_model_version_by_alias("churn", "champion").version) == result.model_version
    )
    assert (
        str(client.get_model_version_by_alias("churn", "challenger").version) == weak.model_version
    )


def test_cli_scores_registered_champion(trained, tmp_path):
    settings, uri, result, _ = trained
    out = tmp_path / "list.csv"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params()))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "churn",
            "--params",
            str(tmp_path / "params.yaml"),
            "score",
            "--model",
            "models:/churn@champion",
            "--transactions",
            str(settings.paths.transactions),
            "--as-of",
            "2011-12-10",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    scored = pd.read_csv(out, dtype={"customer_id": str})
    assert list(scored.columns) == list(score.RETENTION_COLUMNS)
    snapshot = pd.read_parquet(settings.paths.features / "score.parquet")
    assert sorted(scored["customer_id"]) == sorted(snapshot["customer_id"])
    assert (scored["model_version"].astype(str) == result.model_version).all()
    assert scored["churn_probability"].is_monotonic_decreasing
    assert (scored["as_of"] == "2011-12-10").all()
    assert scored["top_reasons"].fillna("").str.count(";").max() <= 2
