"""The documented examples: their params change only the data mapping and the protocol."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from churn import features, ingest
from churn.config import load_settings
from tests.conftest import ROOT, needs_shared, project_params, snapshot_aucs

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
    test, auc = snapshot_aucs(paths.features, settings, tmp_path / "model")
    assert str(test["cutoff"].iloc[0]) == "1997-10-01"
    assert auc["model"] > max(auc["bgnbd"], auc["pareto_nbd"])
