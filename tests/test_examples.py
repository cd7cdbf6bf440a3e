"""The documented examples: their params change only the data mapping and the protocol."""

from __future__ import annotations

from pathlib import Path

import yaml

from churn import ingest
from churn.config import load_settings
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


def test_cdnow_example_ingests_every_purchase(tmp_path: Path):
    needs_shared("data", "cdnow", "CDNOW_master.txt")
    settings = load_settings(CDNOW)
    paths = settings.paths.__class__(
        **{
            name: tmp_path / getattr(settings.paths, name).relative_to(CDNOW.parent)
            for name in settings.paths.__dataclass_fields__
        }
    )
    summary = ingest.run(settings.data, paths)
    assert summary.rows_read == 69_659
    assert summary.rows_kept + summary.rows_rejected + summary.duplicates_removed == 69_659
    assert summary.customers == 23_570
