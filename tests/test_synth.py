"""Synthetic generator: schema and ids, determinism, no activity outside a customer's life,
returns that point at real purchases, scaling, the churn signal it promises, and Parquet output."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from churn.synth import (
    EVENT_COLUMNS,
    EVENT_TYPES,
    TRANSACTION_COLUMNS,
    TRUTH_COLUMNS,
    SynthData,
    SynthSpec,
    SynthSpecError,
    generate,
    write,
)

SPEC = SynthSpec(n_customers=3000, months=24, seed=7)
WEEK = pd.Timedelta(days=7)


@pytest.fixture(scope="module")
def data() -> SynthData:
    return generate(SPEC)


@pytest.fixture(scope="module")
def daily() -> SynthData:
    """Daily periods: many periods per return delay, so returns cross several of them."""
    return generate(SynthSpec(n_customers=600, months=9, period_days=1, seed=11))


WEEKLY_AND_DAILY = pytest.mark.parametrize("dataset", ["data", "daily"])


def _lifetimes(frame: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each row's customer's ``signup_ts`` and ``churn_ts`` joined on."""
    life = truth[["customer_id", "signup_ts", "churn_ts"]]
    return frame.merge(life, on="customer_id", how="left", validate="many_to_one")


# --- schema -------------------------------------------------------------------------------


def test_columns_and_dtypes(data):
    tx, ev, truth = data.transactions, data.events, data.truth
    assert tuple(tx.columns) == TRANSACTION_COLUMNS
    assert tuple(ev.columns) == EVENT_COLUMNS
    assert tuple(truth.columns) == TRUTH_COLUMNS
    for frame, column in [
        (tx, "customer_id"),
        (tx, "order_id"),
        (tx, "product_id"),
        (ev, "customer_id"),
        (ev, "event_type"),
        (truth, "customer_id"),
    ]:
        assert pd.api.types.is_string_dtype(frame[column]), column
        assert frame[column].map(type).eq(str).all(), column
    for frame, column in [(tx, "ts"), (ev, "ts"), (truth, "signup_ts"), (truth, "churn_ts")]:
        assert frame[column].dtype == np.dtype("datetime64[us]"), column
    assert tx["quantity"].dtype == np.dtype("int64")
    assert tx["unit_price"].dtype == np.dtype("float64")
    assert ev["value"].dtype == np.dtype("float64")


def test_dtypes_hold_when_tables_are_empty():
    silent = dict.fromkeys(
        (
            "visit_rate",
            "email_open_rate",
            "app_login_rate",
            "loyalty_redemption_rate",
            "support_ticket_rate",
            "complaint_rate",
            "nps_rate",
            "csat_rate",
        ),
        0.0,
    )
    data = generate(SynthSpec(n_customers=5, months=1, purchase_rate_scale=1e-12, **silent))
    assert data.transactions.empty
    assert data.events.empty
    assert data.transactions["order_id"].dtype == "str"
    assert data.transactions["quantity"].dtype == np.dtype("int64")
    assert data.events["ts"].dtype == np.dtype("datetime64[us]")


def test_ids_values_and_order(data):
    tx, ev, truth = data.transactions, data.events, data.truth
    assert truth["customer_id"].is_unique
    assert len(truth) == SPEC.n_customers
    assert truth["customer_id"].str.fullmatch(r"C\d{7}").all()
    assert tx["product_id"].str.fullmatch(r"P\d{5}").all()
    is_return = tx["quantity"] < 0
    assert tx.loc[~is_return, "order_id"].str.fullmatch(r"O\d{8}").all()
    assert tx.loc[is_return, "order_id"].str.fullmatch(r"CO\d{8}-\d{2}").all()
    assert 0.01 < is_return.mean() < 0.1
    assert (tx["quantity"] != 0).all()
    assert (tx["unit_price"] > 0).all()
    assert tx["ts"].is_monotonic_increasing
    assert ev["ts"].is_monotonic_increasing
    assert set(ev["event_type"]) == set(EVENT_TYPES)


def test_event_values(data):
    ev = data.events
    scores = {"nps": (0, 10), "csat": (1, 5)}
    for event_type, (low, high) in scores.items():
        value = ev.loc[ev["event_type"] == event_type, "value"]
        assert value.between(low, high).all(), event_type
        assert (value == value.round()).all(), event_type
    points = ev.loc[ev["event_type"] == "loyalty_points_redeemed", "value"]
    assert (points > 0).all()
    valueless = ~ev["event_type"].isin([*scores, "loyalty_points_redeemed"])
    assert ev.loc[valueless, "value"].isna().all()


def test_truth_is_inside_the_window(data):
    truth = data.truth
    start, end = pd.Timestamp(SPEC.start), pd.Timestamp("2024-01-01")
    assert truth["signup_ts"].between(start, end, inclusive="left").all()
    churned = truth.dropna(subset=["churn_ts"])
    assert (churned["churn_ts"] >= churned["signup_ts"]).all()
    assert (churned["churn_ts"] < end).all()
    assert 0.1 < len(churned) / len(truth) < 0.7
    assert (truth[["purchase_rate", "spend_level", "engagement_propensity"]] > 0).all().all()


# --- determinism --------------------------------------------------------------------------


def test_same_seed_gives_equal_frames(data):
    again = generate(SPEC)
    for name in ("transactions", "events", "truth"):
        pd.testing.assert_frame_equal(getattr(again, name), getattr(data, name))


def test_different_seeds_differ(data):
    other = generate(replace(SPEC, seed=SPEC.seed + 1))
    assert not other.truth["signup_ts"].equals(data.truth["signup_ts"])
    assert not other.transactions.equals(data.transactions)
    assert not other.events.equals(data.events)


# --- leakage: nothing outside a customer's life -------------------------------------------


@WEEKLY_AND_DAILY
@pytest.mark.parametrize("table", ["transactions", "events"])
def test_nothing_before_signup_or_after_churn(request, dataset, table):
    data = request.getfixturevalue(dataset)
    rows = _lifetimes(getattr(data, table), data.truth)
    assert rows["signup_ts"].notna().all(), "rows of customers missing from truth"
    assert (rows["ts"] >= rows["signup_ts"]).all()
    churned = rows.dropna(subset=["churn_ts"])
    assert (churned["ts"] < churned["churn_ts"]).all()


@WEEKLY_AND_DAILY
def test_returns_reference_an_earlier_purchase_of_the_same_customer(request, dataset):
    tx = request.getfixturevalue(dataset).transactions
    purchases = tx[tx["quantity"] > 0].copy()
    purchases["line_no"] = purchases.groupby("order_id").cumcount() + 1
    returns = tx[tx["quantity"] < 0].copy()
    original = returns["order_id"].str.extract(r"^C(?P<order_id>O\d+)-(?P<line_no>\d+)$")
    returns["order_id"], returns["line_no"] = original["order_id"], original["line_no"].astype(int)
    matched = returns.merge(
        purchases, on=["order_id", "line_no"], how="left", suffixes=("", "_bought")
    )
    assert len(matched) > 50
    assert matched["ts_bought"].notna().all(), "a return without its purchase line"
    assert (matched["customer_id"] == matched["customer_id_bought"]).all()
    assert (matched["ts"] > matched["ts_bought"]).all()
    assert (matched["product_id"] == matched["product_id_bought"]).all()
    assert (-matched["quantity"] == matched["quantity_bought"]).all()
    assert not matched.duplicated(["order_id", "line_no"]).any(), "a line returned twice"


# --- scale --------------------------------------------------------------------------------


def test_row_counts_scale_linearly_with_customers():
    small = generate(SynthSpec(n_customers=2000, months=12, seed=1))
    large = generate(SynthSpec(n_customers=8000, months=12, seed=1))
    for name in ("transactions", "events"):
        ratio = len(getattr(large, name)) / len(getattr(small, name))
        assert 3.4 < ratio < 4.6, (name, ratio)


# --- behaviour: the signal the generator promises ----------------------------------------


def test_customers_with_complaints_churn_more(data):
    complainers = data.events.loc[data.events["event_type"] == "complaint", "customer_id"]
    churned = data.truth.set_index("customer_id")["churn_ts"].notna()
    with_complaint = churned[churned.index.isin(complainers)]
    without = churned[~churned.index.isin(complainers)]
    assert len(with_complaint) > 100
    assert with_complaint.mean() > without.mean() + 0.1


def test_engagement_fades_and_scores_drop_before_churn(data):
    churners = data.truth.dropna(subset=["churn_ts"])
    long_lived = churners[churners["churn_ts"] - churners["signup_ts"] > 16 * WEEK]
    rows = _lifetimes(data.events, long_lived).dropna(subset=["churn_ts"])
    weeks_left = (rows["churn_ts"] - rows["ts"]) // WEEK
    engaged = rows["event_type"].isin(["visit", "email_open", "app_login"])
    last_month = (engaged & (weeks_left < 4)).sum()
    earlier_month = (engaged & weeks_left.between(12, 15)).sum()
    assert last_month < 0.93 * earlier_month
    csat = rows["event_type"] == "csat"
    assert rows.loc[csat & (weeks_left < 4), "value"].mean() < (
        rows.loc[csat & weeks_left.between(12, 15), "value"].mean() - 0.3
    )


def test_complaints_raise_the_churn_hazard_in_the_model():
    calm = replace(SPEC, n_customers=2000, complaint_hazard_multiplier=1.0, complaint_shock=0.0)
    angry = replace(calm, complaint_hazard_multiplier=6.0, complaint_shock=0.4)
    churn_rate = {
        name: generate(spec).truth["churn_ts"].notna().mean()
        for name, spec in (("calm", calm), ("angry", angry))
    }
    assert churn_rate["angry"] > churn_rate["calm"] + 0.05


# --- spec validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_customers": 0}, r"n_customers: 0 is out of range; expected an integer >= 1"),
        ({"months": 2.5}, r"months: 2.5 is out of range"),
        ({"return_probability": 1.5}, r"return_probability: 1.5 .* probability in \[0, 1\]"),
        ({"base_churn_hazard": 1.0}, r"base_churn_hazard: 1.0 .* \[0, 1\)"),
        ({"visit_rate": -1.0}, r"visit_rate: -1.0 .* >= 0"),
        ({"purchase_rate_scale": float("nan")}, r"purchase_rate_scale: nan"),
        ({"lines_per_order": 0.5}, r"lines_per_order: 0.5 .* >= 1"),
        ({"start": "2022-01-01"}, r"start: '2022-01-01' is not a datetime.date"),
    ],
    ids=[
        "no-customers",
        "fractional-months",
        "probability",
        "hazard",
        "rate",
        "nan",
        "lines",
        "start",
    ],
)
def test_spec_rejects_out_of_range_knobs(overrides, message):
    with pytest.raises(SynthSpecError, match=message):
        SynthSpec(**{"n_customers": 10, "months": 3, **overrides})


def test_window_starts_on_any_day():
    data = generate(SynthSpec(n_customers=300, months=2, start=date(2023, 1, 31), seed=2))
    ts = pd.concat([data.transactions["ts"], data.events["ts"]])
    assert ts.min() >= pd.Timestamp("2023-01-31")
    assert ts.max() < pd.Timestamp("2023-03-31")


# --- output -------------------------------------------------------------------------------


def test_write_produces_readable_parquet(tmp_path: Path):
    data = generate(SynthSpec(n_customers=200, months=6, seed=3))
    paths = write(data, tmp_path / "synth")
    assert {name: path.name for name, path in paths.items()} == {
        "transactions": "transactions.parquet",
        "events": "events.parquet",
        "truth": "truth.parquet",
    }
    assert sorted(p.name for p in (tmp_path / "synth").iterdir()) == sorted(
        p.name for p in paths.values()
    ), "temporary files left behind"
    for name, path in paths.items():
        pd.testing.assert_frame_equal(pd.read_parquet(path), getattr(data, name))


# --- command line -------------------------------------------------------------------------

SYNTH_COLUMNS = {
    **{c: c for c in TRANSACTION_COLUMNS},
    "amount": None,
    "channel": None,
    "country": None,
}


def test_synth_command_writes_files_the_pipeline_ingests(tmp_path: Path, make_settings):
    from typer.testing import CliRunner

    from churn import ingest
    from churn.cli import app

    out = tmp_path / "synth"
    args = ["synth", "--customers", "150", "--months", "8", "--seed", "5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = generate(SynthSpec(n_customers=150, months=8, seed=5))
    for name in ("transactions", "events", "truth"):
        frame = pd.read_parquet(out / f"{name}.parquet")
        pd.testing.assert_frame_equal(frame, getattr(expected, name))
        assert f"{out / name}.parquet: {len(frame)} rows" in result.output
    churned = int(expected.truth["churn_ts"].notna().sum())
    assert f"150 customers, {churned} churned before the window ended" in result.output

    settings = make_settings(
        data={
            "transactions": {"path": str(out / "transactions.parquet"), "columns": SYNTH_COLUMNS},
            "events": {"path": str(out / "events.parquet")},
        }
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rows_read == len(expected.transactions)
    assert summary.rows_rejected == 0
    assert summary.customers == expected.transactions["customer_id"].nunique()
    events = pd.read_parquet(settings.paths.events)
    assert len(events) == len(expected.events)
    assert set(events["family"]) <= {*settings.data.events.families}  # no "other"
    # Two lines of one order with the same product and quantity are exact duplicates,
    # which ingest removes and counts.
    assert summary.duplicates_removed == expected.transactions.duplicated().sum()
    lines = pd.read_parquet(settings.paths.transactions)
    n_returns = int((expected.transactions["quantity"] < 0).sum())
    assert lines["is_return"].sum() == n_returns
    # Every synthetic return follows a purchase of the same product by the same customer.
    report = json.loads(settings.paths.ingest_report.read_text())
    assert report["returns"] == {"lines": n_returns, "matched": n_returns, "unmatched": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--customers", "0"], "--customers: 0 is out of range; expected an integer >= 1"),
        (["--months", "0"], "--months: 0 is out of range; expected an integer >= 1"),
        (["--seed", "-1"], "--seed: -1 is out of range; expected an integer >= 0"),
    ],
    ids=["customers", "months", "seed"],
)
def test_synth_command_names_the_option_out_of_range(tmp_path: Path, args, message):
    from typer.testing import CliRunner

    from churn import ChurnError
    from churn.cli import app

    result = CliRunner().invoke(app, ["synth", *args, "--out", str(tmp_path)])
    assert isinstance(result.exception, ChurnError)
    assert str(result.exception) == message
    assert not any(tmp_path.iterdir())
