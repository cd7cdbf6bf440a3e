"""The documented examples: their params change only the data mapping and the protocol."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from churn import evaluate, features, ingest, train
from churn.config import load_settings
from churn.features import LABEL
from churn.model import ChurnModel, write_artifacts
from tests.conftest import ROOT, needs_shared, project_params

CDNOW = ROOT / "examples" / "cdnow" / "params.yaml"


def test_cdnow_params_are_the_defaults_but_for_data_and_protocol():
    example, default = yaml.safe_load(CDNOW.read_text()), project_params()
    assert example["features"].pop("horizon_days") == 91
    assert example["features"].pop("test_cutoff") == "1997-10-01"
    default["features"].pop("horizon_days")
    default["features"].pop("test_cutoff")
    example.pop("data")
    default.pop("data")
    assert example == default  # no per-dataset tuning


@pytest.mark.slow
def test_cdnow_example_beats_both_btyd_models(tmp_path: Path):
    """The papers' protocol on the master file: every purchase read, and the model ranks the
    test customers better than BG/NBD and Pareto/NBD fitted on the same history."""
    needs_shared("data", "cdnow", "CDNOW_master.txt")
    settings = load_settings(CDNOW)
    paths = dataclasses.replace(
        settings.paths,
        **{
            name: tmp_path / getattr(settings.paths, name).relative_to(CDNOW.parent)
            for name in ("transactions", "rejects", "events", "event_rejects", "ingest_report")
        },
        features=tmp_path / "features",
    )
    summary = ingest.run(settings.data, paths)
    assert summary.rows_read == 69_659
    assert summary.rows_kept + summary.rows_rejected + summary.duplicates_removed == 69_659
    assert summary.customers == 23_570
    features.run(settings.features, paths)
    snapshots = pd.read_parquet(paths.features / "train.parquet")
    spec = json.loads((paths.features / "spec.json").read_text())
    fitted = train.build_model(snapshots, settings.train, spec, seed=settings.seed)
    model = ChurnModel()
    artifacts = write_artifacts(fitted.booster, fitted.card, tmp_path / "model")
    model.load_context(SimpleNamespace(artifacts=artifacts))
    test = pd.read_parquet(paths.features / "test.parquet")
    assert str(test["cutoff"].iloc[0]) == "1997-10-01"
    scorers = {"model": model.predict_proba(test), **evaluate.btyd_probabilities(test, 91)}
    auc = {name: roc_auc_score(test[LABEL], p) for name, p in scorers.items()}
    assert auc["model"] > max(auc["bgnbd"], auc["pareto_nbd"])
