"""The exploration notebook runs top to bottom on a real pipeline run."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_exploration_notebook_executes(pipeline):
    notebook = nbformat.read(ROOT / "notebooks" / "exploration.ipynb", as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source = (
        f"from pathlib import Path\nPROJECT = Path({str(pipeline.root)!r})\n"
        f"TRACKING_URI = {pipeline.tracking_uri!r}"
    )
    # A last cell the test adds, to read back what the notebook computed.
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "print(json.dumps({'churn': churn_by_segment['churn_rate'].to_dict(),"
            " 'segments': segments['customers'].to_dict(), 'cohorts': len(retention)}))"
        )
    )
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    printed = json.loads(notebook.cells[-1].outputs[0]["text"])
    test = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    expected = test.groupby("rfm_segment")["churned"].mean().to_dict()
    assert printed["churn"] == pytest.approx(expected)
    score = pd.read_parquet(pipeline.settings.paths.features / "score.parquet")
    assert printed["segments"] == score["rfm_segment"].value_counts().to_dict()
    assert printed["cohorts"] >= 24  # Dec 2009 to Dec 2011, one cohort a month
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2
