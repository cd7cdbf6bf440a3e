"""One measured step of the benchmark, run in its own process so its peak RSS is its own.

``python -m benchmarks.stage STEP PARAMS`` imports what the step needs first, then times only
the step, and prints one JSON line: ``{"seconds": ..., ...}``. Steps: the pipeline stages
through the real CLI (``ingest``, ``features``, ``train``, ``score``), ``inference`` (model
predictions alone), ``features_rowlevel`` (the Ibis snapshot expressions executed, without
the pandas snapshot-level steps), ``pandas_ref``, ``pandas_ref_rowlevel`` and
``lifetimes_ref``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd

from churn import features, ingest, score, train  # noqa: F401  (imported before timing)
from churn.cli import app
from churn.config import load_settings

CLI_ARGS = {
    "ingest": ["ingest"],
    "features": ["features"],
    "train": ["train"],
    "score": ["score", "--allow-drift"],
}


def _cli(step: str, params: Path) -> dict:
    start = time.perf_counter()
    app(["--params", str(params), *CLI_ARGS[step]], standalone_mode=False)
    return {"seconds": time.perf_counter() - start}


def _plan(params: Path):
    settings = load_settings(params)
    con = features.connect()
    tx = features.with_day(con.read_parquet(settings.paths.transactions))
    span = tx.agg(first=tx.ts.min(), last=tx.ts.max()).execute().iloc[0]
    plan = features.plan_snapshots(span["first"].date(), span["last"].date(), settings.features)
    return settings, tx, plan


def _features_rowlevel(params: Path) -> dict:
    settings, tx, plan = _plan(params)
    start = time.perf_counter()
    past = features.history(tx, settings.features)
    rows = 0
    for cutoff in (*plan.train, plan.test):
        rows += features.labelled_snapshot(past, cutoff, settings.features).to_pyarrow().num_rows
    rows += features.customer_features(past, plan.as_of, settings.features).to_pyarrow().num_rows
    return {"seconds": time.perf_counter() - start, "snapshot_rows": rows}


def _pandas_ref(params: Path, *, snapshot_level: bool) -> dict:
    from benchmarks.references import load_transactions, pandas_snapshots

    settings, _, plan = _plan(params)
    start = time.perf_counter()
    tx = load_transactions(str(settings.paths.transactions))
    cutoffs = [*plan.train, plan.test, plan.as_of]
    frames = pandas_snapshots(
        tx, cutoffs, len(cutoffs) - 1, settings.features, snapshot_level=snapshot_level
    )
    return {"seconds": time.perf_counter() - start, "snapshot_rows": sum(map(len, frames))}


def _lifetimes_ref(params: Path) -> dict:
    from benchmarks.references import lifetimes_summary

    settings, _, plan = _plan(params)
    start = time.perf_counter()
    tx = pd.read_parquet(settings.paths.transactions, columns=["customer_id", "ts", "amount"])
    tx = tx[tx["amount"] > 0]
    end = pd.Timestamp(plan.as_of) - pd.Timedelta(days=1)
    summary = lifetimes_summary(tx, "customer_id", "ts", "amount", end)
    return {"seconds": time.perf_counter() - start, "customers": len(summary)}


def _inference(params: Path) -> dict:
    from churn.model import load_model

    settings = load_settings(params)
    model = load_model(str(settings.paths.model))
    snapshot = pd.read_parquet(settings.paths.features / "score.parquet")
    start = time.perf_counter()
    model.predict_proba(snapshot)  # compiles the booster, or loads it from the machine's cache
    first = time.perf_counter()
    model.predict_proba(snapshot)
    seconds = time.perf_counter() - first
    return {"seconds": seconds, "first_seconds": first - start, "customers": len(snapshot)}


def main(step: str, params: Path) -> dict:
    """Run ``step`` against the pipeline configured by ``params``; return its measures."""
    if step in CLI_ARGS:
        return _cli(step, params)
    if step == "features_rowlevel":
        return _features_rowlevel(params)
    if step in ("pandas_ref", "pandas_ref_rowlevel"):
        return _pandas_ref(params, snapshot_level=step == "pandas_ref")
    if step == "lifetimes_ref":
        return _lifetimes_ref(params)
    if step == "inference":
        return _inference(params)
    raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
