"""Property tests on generated transaction tables: no row lost, no look-ahead, RFM as pandas."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

import ibis
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from churn import ingest
from churn.config import FeatureSettings
from churn.features import customer_features, history, with_day
from tests.conftest import tx

START = datetime(2021, 1, 1)
CUTOFF = date(2021, 7, 1)
SETTINGS = FeatureSettings(horizon_days=30, windows_days=(30, 90), active_lookback_days=365)

lines = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),  # customer
        st.integers(0, 5),  # order number
        st.integers(0, 300 * 24),  # hours after START
        st.one_of(st.floats(-50, 500, allow_nan=False).map(lambda v: round(v, 2)), st.just(0.0)),
    ),
    min_size=1,
    max_size=40,
)


def _table(rows) -> pd.DataFrame:
    return tx(
        [(c, f"{c}{o}", START + timedelta(hours=h), amount, f"P{o}") for c, o, h, amount in rows]
    )


def _features(frame: pd.DataFrame) -> pd.DataFrame:
    table = with_day(ibis.duckdb.connect().create_table("t", frame))
    out = customer_features(history(table, SETTINGS), CUTOFF, SETTINGS).to_pandas()
    return out.drop(columns="cutoff").sort_values("customer_id").reset_index(drop=True)


def reference_orders(frame: pd.DataFrame, cutoff: date) -> pd.DataFrame:
    """Purchase orders of positive value before ``cutoff``, dated by their first line."""
    before = frame[frame["ts"] < pd.Timestamp(cutoff)]
    before = before[~before["is_return"]]
    orders = (
        before.groupby(["customer_id", "order_id"])
        .agg(day=("ts", lambda s: s.min().normalize()), value=("amount", "sum"))
        .reset_index()
    )
    return orders[orders["value"] > 0]


def reference_rfm(frame: pd.DataFrame, cutoff: date) -> pd.DataFrame:
    """A slow, obvious pandas version of recency, frequency and monetary."""
    orders = reference_orders(frame, cutoff)
    rows = []
    for customer, group in orders.groupby("customer_id"):
        recency = (pd.Timestamp(cutoff) - group["day"].max()).days
        if recency <= SETTINGS.active_lookback_days:
            rows.append((customer, recency, len(group), group["value"].sum()))
    return pd.DataFrame(rows, columns=["customer_id", "recency_days", "frequency", "monetary"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_rfm_matches_pandas_reference(rows):
    frame = _table(rows)
    ours = _features(frame)[["customer_id", "recency_days", "frequency", "monetary"]]
    expected = reference_rfm(frame, CUTOFF)
    assert ours["customer_id"].tolist() == expected["customer_id"].tolist()
    assert ours["recency_days"].tolist() == expected["recency_days"].tolist()
    assert ours["frequency"].tolist() == expected["frequency"].tolist()
    np.testing.assert_allclose(
        ours["monetary"].to_numpy(float), expected["monetary"].to_numpy(float), rtol=1e-9
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_gaps_between_purchase_days_match_pandas_reference(rows):
    # Orders here often span days, and the part before the cutoff decides whether they count.
    # A return 400 days before START makes the data reach back over a year: every window of
    # the year before the cutoff is observed.
    frame = _table([*rows, ("z", 0, -400 * 24, -1.0)])
    ours = _features(frame).set_index("customer_id")
    orders = reference_orders(frame, CUTOFF)
    assert sorted(ours.index) == sorted(orders["customer_id"].unique())
    for customer, group in orders.groupby("customer_id"):
        days = np.sort(group["day"].unique())
        gaps = np.diff(days) / pd.Timedelta(days=1)
        row = ours.loc[customer]
        assert row["purchase_days"] == len(gaps) + 1
        months = {(pd.Timestamp(CUTOFF) - day).days // 30 for day in days}
        assert row["active_months_365d"] == len(months)  # all lines fall within the year
        if len(gaps) == 0:
            assert row[["gap_mean_days", "gap_std_days", "last_gap_days"]].isna().all()
            continue
        assert row["gap_mean_days"] == pytest.approx(gaps.mean())
        assert row["gap_std_days"] == pytest.approx(gaps.std(), abs=1e-9)
        assert row["last_gap_days"] == gaps[-1]
        assert row["max_gap_365d"] == gaps.max()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines, lines)
def test_rows_at_or_after_cutoff_never_change_features(rows, later):
    frame = _table(rows)
    shifted = _table(later)
    # Move the extra rows to the cutoff or after it.
    shifted["ts"] = pd.Timestamp(CUTOFF) + (shifted["ts"] - pd.Timestamp(START))
    pd.testing.assert_frame_equal(
        _features(frame), _features(pd.concat([frame, shifted], ignore_index=True))
    )


cells = st.one_of(
    st.none(),
    st.just(""),
    st.just("x"),
    st.just("2021-02-30 10:00:00"),
    st.just("2021-03-01 10:00:00"),
    st.just("12.0"),
    st.just("-3"),
    st.just("inf"),
    st.just("nan"),
    st.just("7"),
)


# What ingest says when it refuses a whole export: nothing usable, mostly dates that do not
# parse or lie outside 1970..now, or mostly amounts or quantities that are not numbers.
WHOLE_INPUT_REFUSALS = "rows rejected|does not parse|before 1970-01-01|have no numeric"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("prop")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(cells, cells, cells, cells, cells), min_size=1, max_size=30))
@example(rows=[(None, "x", "inf", None, None)])  # DuckDB reads "inf" as an infinite time
def test_ingest_never_loses_a_row_without_a_reason(make_settings, workdir, rows):
    export = workdir / "export.csv"
    frame = pd.DataFrame(
        rows, columns=["Invoice", "Customer ID", "InvoiceDate", "Quantity", "Price"]
    ).assign(StockCode="P", Country="United Kingdom")
    frame.to_csv(export, index=False)
    settings_ = make_settings(data={"transactions": {"path": str(export)}})
    settings_.paths.transactions.unlink(missing_ok=True)  # examples share one folder
    try:
        summary = ingest.run(settings_.data, settings_.paths)
    except ingest.InputError as exc:
        refused = str(exc)  # only allowed when nothing at all is usable
    else:
        refused = ""
    if refused:  # a whole-input refusal (nothing usable, or mostly one failed check) writes nothing
        assert re.search(WHOLE_INPUT_REFUSALS, refused), refused
        assert not settings_.paths.transactions.exists()
        return
    kept = pd.read_parquet(settings_.paths.transactions)
    rejected = pd.read_parquet(settings_.paths.rejects)
    assert summary.rows_read == len(frame)
    assert len(kept) + len(rejected) + summary.duplicates_removed == len(frame)
    assert rejected["reason"].notna().all()
    assert np.isfinite(kept["amount"]).all()
