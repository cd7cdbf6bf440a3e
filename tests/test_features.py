from __future__ import annotations

import dataclasses
import re
from datetime import date, timedelta

import ibis
import numpy as np
import pandas as pd
import pytest

from churn import train
from churn.config import RFM_SEGMENTS, DuckDBSettings, Engine, FeatureSettings, ParamsError
from churn.features import (
    BTYD_COLUMNS,
    MILLIONTHS,
    YEAR_FEATURES,
    Engagement,
    SnapshotError,
    btyd_features,
    check_test_window,
    customer_features,
    executed_snapshot,
    history,
    labelled_snapshot,
    plan_snapshots,
    rfm_scores,
    rfm_segment,
    season_prior,
    snapshot_frame,
    with_day,
)
from churn.io import connect
from tests.conftest import tx

CUTOFF = date(2021, 4, 1)
SETTINGS = FeatureSettings(horizon_days=30, windows_days=(30, 90))


def _snapshot(frame: pd.DataFrame, cutoff: date = CUTOFF) -> pd.DataFrame:
    con = ibis.duckdb.connect()
    table = with_day(con.create_table("tx", frame))
    snapshot = labelled_snapshot(history(table, SETTINGS), cutoff, SETTINGS)
    frame, _ = snapshot_frame(executed_snapshot(snapshot), SETTINGS)
    return frame.set_index("customer_id")


def test_hand_computed_features(tiny_tx):
    snap = _snapshot(tiny_tx)
    # C last bought 820 days before the cutoff (outside the 365-day lookback); D only at it.
    assert sorted(snap.index) == ["A", "B"]
    a, b = snap.loc["A"], snap.loc["B"]
    expected_a = {
        "recency_days": 12,
        "tenure_days": 90,
        "frequency": 3,
        "monetary": 60.0,
        "mean_order_value": 20.0,
        "orders_30d": 1,
        "spend_30d": 30.0,
        "orders_90d": 3,
        "spend_90d": 60.0,
        "orders_trend": 4.0,
        "spend_trend": 61.0,
        "gap_mean_days": 39.0,
        "gap_std_days": 8.0,
        "overdue_ratio": 12 / 39,
        "returned_value": 5.0,
        "return_orders": 1,
        "return_rate": 5 / 60,
        "distinct_products": 3,
        "churned": 0,
    }
    expected_b = {
        "recency_days": 1,
        "tenure_days": 304,
        "frequency": 2,
        "monetary": 150.0,
        "mean_order_value": 75.0,
        "orders_30d": 1,
        "spend_30d": 50.0,
        "orders_90d": 1,
        "spend_90d": 50.0,
        "orders_trend": 2.0,
        "spend_trend": 51.0,
        "gap_mean_days": 303.0,
        "gap_std_days": 0.0,
        "overdue_ratio": 1 / 303,
        "returned_value": 0.0,
        "return_orders": 0,
        "return_rate": 0.0,
        "distinct_products": 1,
        "churned": 1,
    }
    for row, expected in ((a, expected_a), (b, expected_b)):
        for name, value in expected.items():
            assert row[name] == pytest.approx(value), name


def test_single_purchase_customer_has_no_gap():
    snap = _snapshot(tx([("E", "O1", "2021-03-01 10:00", 5.0)]))
    assert np.isnan(snap.loc["E", "gap_mean_days"])
    assert np.isnan(snap.loc["E", "overdue_ratio"])


def test_a_feature_no_customer_has_stays_a_numeric_column():
    # Nobody returned anything before the cutoff: the days since the last return are unknown
    # for all, as NaN in a float column the model reads, not an object column it skips.
    snap = _snapshot(
        tx(
            [
                ("A", "O1", "2021-03-01 10:00", 20.0, "P1"),
                ("A", "O2", "2021-03-20 10:00", 30.0, "P2"),
            ]
        )
    )
    assert snap["days_since_return"].dtype == "float64"
    assert snap["days_since_return"].isna().all()
    assert snap["return_orders"].tolist() == [0]


def test_windows_reaching_before_the_first_day_are_unknown_not_zero():
    # The data start on 2021-01-01 (day 0); X bought on days 0 and 50.
    frame = tx([("X", "O1", "2021-01-01 10:00", 10.0), ("X", "O2", "2021-02-20 10:00", 20.0)])
    early = _snapshot(frame, date(2021, 4, 11)).loc["X"]  # day 100
    assert (early["frequency"], early["recency_days"]) == (2, 50)
    assert (early["orders_30d"], early["orders_90d"], early["spend_90d"]) == (0, 1, 20.0)
    # The trend's previous window starts on day -80, the year-long ones on day -265.
    for name in ("orders_trend", "spend_trend", *YEAR_FEATURES):
        assert np.isnan(early[name]), name
    late = _snapshot(frame, date(2022, 2, 5)).loc["X"]  # day 400: every window observed
    expected = {
        "orders_90d": 0,
        "orders_trend": 1.0,
        "orders_same_window_last_year": 1,  # days [35, 65)
        "spend_same_window_last_year": 20.0,
        "spend_share_same_window_last_year": 1.0,
        "season_order_share": 0.5,  # day 50 is 15 days into the coming 30 of its year
        "active_months_365d": 1,
        "max_gap_365d": 50.0,
    }
    for name, value in expected.items():
        assert late[name] == pytest.approx(value), name


def test_active_months_count_the_30_day_months_with_a_purchase_in_the_year():
    # Days before the cutoff: 400 (outside the year), 362 and 361 (month 12), 45 and 31
    # (month 1), 29 and 1 (month 0).
    cutoff = date(2021, 4, 1)
    days_before = (400, 362, 361, 45, 31, 29, 1)
    rows = [
        ("X", f"O{k}", f"{cutoff - timedelta(days=d)} 10:00", 10.0, "P1")
        for k, d in enumerate(days_before)
    ]
    assert _snapshot(tx(rows), cutoff).loc["X", "active_months_365d"] == 3
    # One purchase day in the year, 364 days before, after one 366 days before: month 12.
    rows = [("Y", "O1", "2020-03-31 10:00", 5.0), ("Y", "O2", "2020-04-02 10:00", 5.0)]
    assert _snapshot(tx(rows), cutoff).loc["Y", "active_months_365d"] == 1


def test_basket_size_counts_the_product_lines_of_an_order():
    rows = [
        ("X", "O1", "2020-12-01 10:00", 5.0, "P1"),
        ("X", "O1", "2020-12-01 10:00", 5.0, "P1"),  # the same product again
        ("X", "O1", "2020-12-01 10:00", 5.0, "P2"),
        ("X", "O1", "2020-12-01 10:00", 5.0),  # a line without a product
        ("X", "O2", "2021-03-20 10:00", 5.0, "P3"),
    ]
    x = _snapshot(tx(rows)).loc["X"]
    assert x["frequency"] == 2
    assert x["monetary"] == 25.0
    assert x["mean_basket_products"] == 2.0  # 3 lines with a product in O1, 1 in O2
    assert x["basket_size_trend"] == pytest.approx(1 / 3)  # O2 (recent) against O1 (before)
    assert x["distinct_products"] == 3


def test_units_and_prices_count_lines_before_the_cutoff_and_any_positive_line_is_a_purchase():
    frame = tx(
        [
            ("X", "O1", "2021-03-01 10:00", 20.0, "P1"),  # 2 units at 10
            ("X", "O1", "2021-03-01 10:00", 9.0, "P2"),  # 3 units at 3
            ("X", "O2", "2021-03-31 23:00", 8.0, "P3"),  # 4 units at 2, in an order ...
            ("X", "O2", "2021-04-01 01:00", 100.0, "P4"),  # ... that goes on after the cutoff
            ("Y", "O3", "2021-03-10 10:00", 10.0, "P1"),
            ("Y", "O4", "2021-04-05 10:00", 5.0, "P1"),  # bought, in an order ...
            ("Y", "O4", "2021-04-05 10:00", -8.0, "D"),  # ... with a discount line: worth -3
            ("Z", "O5", "2021-03-10 10:00", 10.0, "P1"),
            ("Z", "O6", "2021-04-05 10:00", -8.0, "D"),  # a discount line alone
        ]
    )
    frame["quantity"] = [2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    frame["is_return"] = False
    snap = _snapshot(frame)
    x = snap.loc["X"]
    assert x["mean_units_per_line"] == 3.0  # (2 + 3 + 4) / 3 lines before the cutoff
    assert x["mean_unit_price"] == 5.0  # (10 + 3 + 2) / 3
    assert x["monetary"] == 37.0
    assert snap["churned"].to_dict() == {"X": 0, "Y": 0, "Z": 1}


def test_rows_at_or_after_cutoff_change_labels_only(tiny_tx):
    before = _snapshot(tiny_tx)
    later = tx(
        [
            ("A", "X1", "2021-04-01 00:00", 999.0, "P9"),  # exactly at the cutoff
            ("B", "X2", "2021-04-02 00:00", 10.0, "P9"),  # B now buys in the label window
            ("B", "X3", "2021-04-03 00:00", -50.0, "P4"),  # a return after the cutoff
            ("Z", "X4", "2021-05-01 00:00", 10.0, "P9"),  # a new customer after the cutoff
        ]
    )
    after = _snapshot(pd.concat([tiny_tx, later], ignore_index=True))
    features = [c for c in before.columns if c != "churned"]
    pd.testing.assert_frame_equal(before[features], after[features])
    assert after.loc["B", "churned"] == 0
    assert before.loc["B", "churned"] == 1


def test_label_window_is_half_open(tiny_tx):
    # A's next purchase is 9 days after the cutoff: inside a 10-day window, outside a 9-day one.
    con = ibis.duckdb.connect()
    table = with_day(con.create_table("tx", tiny_tx))
    for horizon, churned in ((10, 0), (9, 1)):
        settings = FeatureSettings(horizon_days=horizon, windows_days=(30,))
        past = history(table, settings)
        snap = labelled_snapshot(past, CUTOFF, settings).to_pandas().set_index("customer_id")
        assert snap.loc["A", "churned"] == churned


def test_scoring_snapshot_has_no_label(tiny_tx):
    table = with_day(ibis.duckdb.connect().create_table("tx", tiny_tx))
    assert "churned" not in customer_features(history(table, SETTINGS), CUTOFF, SETTINGS).columns


@pytest.mark.parametrize(
    ("r", "f", "segment"),
    [
        (5, 5, "Champions"),
        (4, 4, "Champions"),
        (3, 5, "Loyal"),
        (5, 3, "Loyal"),
        (5, 1, "New"),
        (4, 2, "Potential"),
        (3, 1, "Potential"),
        (1, 5, "Can't lose"),
        (2, 4, "At risk"),
        (1, 3, "At risk"),
        (2, 2, "Hibernating"),
        (1, 1, "Lost"),
    ],
    ids=lambda v: str(v),
)
def test_rfm_segment_rules(r, f, segment):
    assert rfm_segment(np.array([r]), np.array([f]))[0] == segment


def test_every_score_pair_has_one_known_segment():
    r, f = np.meshgrid(np.arange(1, 6), np.arange(1, 6))
    assert set(rfm_segment(r.ravel(), f.ravel())) == set(RFM_SEGMENTS)


def test_rfm_scores_are_quintiles_within_each_cutoff():
    frame = pd.DataFrame(
        {
            "cutoff": [1] * 10 + [2] * 5,
            "recency_days": [*list(range(10)), 5, 5, 5, 5, 5],
            "frequency": [*list(range(10, 0, -1)), 1, 2, 3, 4, 5],
            "monetary": np.arange(15, dtype=float),
        }
    )
    out = rfm_scores(frame)
    assert out["r_score"].tolist()[:10] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert out["f_score"].tolist()[10:] == [1, 2, 3, 4, 5]
    assert out["r_score"].tolist()[10:] == [3] * 5  # ties share a score
    assert "r_score" not in frame.columns  # input not mutated


def test_rfm_scores_move_a_whole_tied_group_so_the_model_does_not_take_them():
    # One-time buyers are 38 % of one snapshot and 42 % of the next: their mean rank passes
    # the first fifth, and every one of them goes from F = 1 to F = 2 with nothing changed
    one_timers = {1: 38, 2: 42}
    frame = pd.DataFrame(
        {
            "cutoff": np.repeat([1, 2], 100),
            "recency_days": np.tile(np.arange(100), 2),
            "frequency": np.concatenate(
                [np.where(np.arange(100) < n, 1, 2 + np.arange(100)) for n in one_timers.values()]
            ),
            "monetary": np.tile(np.arange(100, dtype=float), 2),
        }
    )
    scores = rfm_scores(frame)
    once = scores[scores["frequency"] == 1].groupby("cutoff")["f_score"].unique()
    assert once.map(list).to_dict() == {1: [1], 2: [2]}
    assert not {"r_score", "f_score", "m_score"} & set(train.feature_columns(scores))
    assert {"recency_days", "frequency", "monetary"} <= set(train.feature_columns(scores))


def test_plan_places_cutoffs_out_of_time():
    settings = FeatureSettings(horizon_days=90, n_snapshots=4, snapshot_step_days=30)
    plan = plan_snapshots(date(2009, 12, 1), date(2011, 12, 9), settings)
    assert plan.as_of == date(2011, 12, 10)
    assert plan.test == date(2011, 9, 11)
    assert plan.train == (
        date(2011, 1, 14),
        date(2011, 2, 13),
        date(2011, 3, 15),
        date(2011, 6, 13),
    )
    # Every training label window ends before the validation and test cutoffs it precedes.
    for cutoff in plan.train[:-1]:
        assert cutoff.toordinal() + 90 <= plan.train[-1].toordinal()


def test_plan_rejects_unobserved_test_window():
    settings = FeatureSettings(horizon_days=90, test_cutoff=date(2011, 10, 1))
    with pytest.raises(SnapshotError, match="label window ends after the last transaction"):
        plan_snapshots(date(2009, 12, 1), date(2011, 12, 9), settings)


def test_a_stray_late_line_that_empties_the_test_label_window_stops_the_run():
    # A purchase every other day for 200 days, then one line dated 30 days after the last.
    days = [date(2021, 1, 1) + timedelta(days=2 * k) for k in range(100)]
    rows = [(f"C{k % 7}", f"O{k}", f"{d} 10:00", 10.0) for k, d in enumerate(days)]
    con = ibis.duckdb.connect()
    regular = history(with_day(con.create_table("regular", tx(rows))), SETTINGS)
    check_test_window(regular, days[-1] + timedelta(days=1 - 30), 30)  # 15 days, then 14
    stray = days[-1] + timedelta(days=30)
    late = tx([*rows, ("C1", "X", f"{stray} 10:00", 5.0)])
    past = history(with_day(con.create_table("late", late)), SETTINGS)
    test = stray + timedelta(days=1 - 30)  # where the plan puts it: one horizon before the end
    message = rf"label window {test} to {stray} has purchases on 1 days, against 15 in the 30"
    with pytest.raises(SnapshotError, match=message):
        check_test_window(past, test, 30)


@pytest.mark.parametrize(
    ("first_day", "advice", "fits", "too_far"),
    [
        (date(2011, 2, 1), "n_snapshots to at most 3,", {"n_snapshots": 3}, {"n_snapshots": 4}),
        (
            date(2011, 6, 1),
            "too short for a 90-day horizon: set features.horizon_days to at most 63 and",
            {"horizon_days": 63, "n_snapshots": 2},
            {"horizon_days": 64, "n_snapshots": 2},
        ),
    ],
)
def test_plan_rejects_history_too_short_and_says_what_fits(first_day, advice, fits, too_far):
    last_day = date(2011, 12, 9)
    with pytest.raises(SnapshotError, match=re.escape(advice)):
        plan_snapshots(first_day, last_day, FeatureSettings())
    assert plan_snapshots(first_day, last_day, FeatureSettings(**fits)).train[0] > first_day
    with pytest.raises(SnapshotError, match="is not after the first transaction day"):
        plan_snapshots(first_day, last_day, FeatureSettings(**too_far))


def test_hand_computed_engagement_features(tiny_tx):
    events = pd.DataFrame(
        {
            "customer_id": ["A", "A", "A", "A", "A", "B"],
            "ts": pd.to_datetime(
                ["2021-03-25", "2021-02-10", "2021-03-30", "2021-03-31", "2021-04-02", "2020-10-01"]
            ).astype("datetime64[us]"),
            "event_type": ["visit", "visit", "nps", "nps", "nps", "complaint"],
            "family": ["visit", "visit", "nps", "nps", "nps", "complaint"],
            "value": [None, None, 9.0, 5.0, 10.0, None],
        }
    )
    con = ibis.duckdb.connect()
    engagement = Engagement(
        events=with_day(con.create_table("ev", events)), families=("visit", "nps", "complaint")
    )
    table = with_day(con.create_table("tx", tiny_tx))
    snap = customer_features(history(table, SETTINGS, engagement), CUTOFF, SETTINGS).to_pandas()
    a, b = snap.set_index("customer_id").loc["A"], snap.set_index("customer_id").loc["B"]
    # A: visits 7 and 50 days before the cutoff; NPS 9 then 5 (the 10 is after the cutoff).
    assert (a["visit_30d"], a["visit_90d"], a["nps_30d"]) == (1, 2, 2)
    assert a["days_since_engagement"] == 1
    assert (a["nps_last"], a["nps_mean"], a["nps_detractor"], a["nps_promoter"]) == (
        5.0,
        7.0,
        1.0,
        0.0,
    )
    assert a["engagement_trend"] == 5.0  # 4 events in the last 90 days, none before, smoothed
    assert b["complaint_90d"] == 0
    assert b["days_since_engagement"] == 182
    assert np.isnan(b["nps_last"])
    assert np.isnan(b["nps_detractor"])


def _visits(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [customer for customer, _ in rows],
            "ts": pd.to_datetime([ts for _, ts in rows]).astype("datetime64[us]"),
            "event_type": "visit",
            "family": "visit",
            "value": np.nan,
        }
    )


def test_customers_without_events_count_zero_events(tiny_tx):
    # C's visit a year before starts the events file: every window at the cutoff is observed.
    events = _visits([("C", "2020-03-01"), ("A", "2021-03-25")])
    con = ibis.duckdb.connect()
    engagement = Engagement(events=with_day(con.create_table("ev", events)), families=("visit",))
    table = with_day(con.create_table("tx", tiny_tx))
    past = history(table, SETTINGS, engagement)
    snap, _ = snapshot_frame(executed_snapshot(customer_features(past, CUTOFF, SETTINGS)), SETTINGS)
    b = snap.set_index("customer_id").loc["B"]
    assert (b["visit_30d"], b["visit_90d"]) == (0, 0)
    assert np.isnan(b["days_since_engagement"])
    assert snap["visit_30d"].tolist() == [1, 0]  # A, B
    assert pd.api.types.is_integer_dtype(snap["visit_30d"])  # a model input, not an object


def test_engagement_windows_reaching_before_the_first_event_are_unknown_not_zero(tiny_tx):
    # The events file starts on 2021-03-02, exactly 30 days before the cutoff.
    events = _visits([("A", "2021-03-02 10:00"), ("A", "2021-03-20 10:00")])
    con = ibis.duckdb.connect()
    engagement = Engagement(events=with_day(con.create_table("ev", events)), families=("visit",))
    past = history(with_day(con.create_table("tx", tiny_tx)), SETTINGS, engagement)
    snap, _ = snapshot_frame(executed_snapshot(customer_features(past, CUTOFF, SETTINGS)), SETTINGS)
    a, b = snap.set_index("customer_id").loc["A"], snap.set_index("customer_id").loc["B"]
    assert (a["visit_30d"], b["visit_30d"]) == (2, 0)  # its window starts on the first day
    assert a["days_since_engagement"] == 12
    for name in ("visit_90d", "engagement_trend"):  # windows from 2021-01-01 and 2020-10-03
        assert np.isnan(a[name]), name
        assert np.isnan(b[name]), name


CHANNEL_SETTINGS = FeatureSettings(
    horizon_days=30, windows_days=(30, 90), online_channels=("online", "Web", "app")
)


def _by_order(frame: pd.DataFrame, column: str, values: dict[str, str | None]) -> pd.DataFrame:
    """``frame`` with ``column`` set per order id from ``values`` (null for the others)."""
    return frame.assign(**{column: frame["order_id"].map(values).astype("string")})


def test_online_order_share_counts_past_online_orders(tiny_tx):
    channels = {"O1": "WEB", "O2": "store", "O3": " app ", "C1": "web", "O4": "web"}
    frame = _by_order(tiny_tx, "channel", {**channels, "O5": None, "O6": "Online"})
    snap = _snapshot_with(frame, CHANNEL_SETTINGS).set_index("customer_id")
    # A: O1 (web), O2 (store), O3 (app) before the cutoff; the return C1 and the later O4
    # do not count. B: O5 (no channel, not online), O6 (online).
    assert snap["online_order_share"].to_dict() == {"A": 2 / 3, "B": 0.5}


def test_an_order_is_online_when_any_line_is(tiny_tx):
    frame = _by_order(tiny_tx, "channel", {})
    frame.loc[(frame["order_id"] == "O1") & (frame["product_id"] == "P2"), "channel"] = "web"
    snap = _snapshot_with(frame, CHANNEL_SETTINGS).set_index("customer_id")
    assert snap.loc["A", "online_order_share"] == 1 / 3
    assert snap.loc["B", "online_order_share"] == 0.0


def test_no_channel_column_no_channel_feature(tiny_tx, make_settings):
    assert "online_order_share" not in _snapshot_with(tiny_tx, SETTINGS).columns
    without = make_settings()  # the project's params: channel: null
    assert without.features.online_channels == ()
    mapped = make_settings(data={"transactions": {"columns": {"channel": "Channel"}}})
    assert mapped.features.online_channels == ("online", "web", "app")


COUNTRY_SETTINGS = FeatureSettings(horizon_days=30, windows_days=(30, 90), country=True)


def test_home_country_is_the_latest_orders_country_with_most_snapshot_customers(tiny_tx):
    more = tx(
        [
            ("B", "O10", "2021-03-31 08:00", 5.0, "P2"),  # B's other order that day
            ("E", "O11", "2021-02-01 12:00", 8.0, "P1"),
            ("F", "O12", "2021-03-01 12:00", 8.0, "P1"),  # no country
            ("A", "O13", "2021-03-30 12:00", 3.0, "P2"),  # an order spanning the cutoff
            ("A", "O13", "2021-04-02 12:00", 3.0, "P3"),
        ]
    )
    countries = {"O1": "UK", "O2": "UK", "O3": "UK", "C1": "Spain", "O4": "Germany"}
    countries |= {"O5": "Belgium", "O6": "France", "O10": "Belgium", "O11": "UK"}
    countries |= {"O13": "France"}
    frame = _by_order(pd.concat([tiny_tx, more], ignore_index=True), "country", countries)
    snap = _snapshot_with(frame, COUNTRY_SETTINGS).set_index("customer_id")
    # A: France (O13, its latest order before the cutoff; the return C1 and the later O4
    # do not count). B: France, the greatest of its last day's France and Belgium. E: UK.
    # F has none: unknown, and not counted. France has 2 of the 3 with a country, UK 1.
    home = snap["home_country"]
    assert home[["A", "B", "E"]].to_dict() == {"A": 1.0, "B": 1.0, "E": 0.0}
    assert np.isnan(home["F"])
    assert "country" not in snap.columns


def test_every_country_tied_for_most_customers_is_home(tiny_tx):
    countries = {"O1": "France", "O2": "France", "O3": "France", "O5": "UK", "O6": "UK"}
    snap = _snapshot_with(_by_order(tiny_tx, "country", countries), COUNTRY_SETTINGS)
    assert snap.set_index("customer_id")["home_country"].to_dict() == {"A": 1.0, "B": 1.0}


def test_no_country_column_no_country_feature(tiny_tx, make_settings):
    frame = _by_order(tiny_tx, "country", {"O1": "UK"})
    assert "home_country" not in _snapshot_with(frame, SETTINGS).columns
    unmapped = make_settings(data={"transactions": {"columns": {"country": None}}})
    assert not unmapped.features.country
    assert make_settings(data={"transactions": {"columns": {"country": "Land"}}}).features.country
    with pytest.raises(ParamsError, match=r"unknown key.*'country'"):
        make_settings(features={"country": True})  # follows the mapping, not a key


def _snapshot_with(frame: pd.DataFrame, settings: FeatureSettings) -> pd.DataFrame:
    con = ibis.duckdb.connect()
    table = with_day(con.create_table("tx", frame))
    return customer_features(history(table, settings), CUTOFF, settings).to_pandas()


def test_money_sums_are_exact_whatever_the_order_of_the_lines():
    """0.1 + 0.2 is 0.30000000000000004 in floats in either order; in integer millionths it
    is 0.3, so a sum cannot depend on the order the engine's threads add the lines in."""
    frame = tx(
        [
            ("X", "R1", "2021-03-01 10:00", -0.1),  # the first line: the 30 days are observed
            ("X", "O1", "2021-03-05 10:00", 0.1),
            ("X", "O2", "2021-03-06 10:00", 0.2),
            ("X", "R2", "2021-03-07 10:00", -0.2),
        ]
    )
    x = _snapshot_with(frame, SETTINGS).set_index("customer_id").loc["X"]
    assert (x["monetary"], x["spend_30d"], x["returned_value"]) == (0.3, 0.3, 0.3)
    assert x["mean_order_value"] == 0.15


def test_clv_falls_back_to_yearly_spend_net_of_returns_without_enough_buyers():
    # Three customers, none with repeat purchases: no BTYD fit, clv_12m is the yearly spend
    # (over at least a year of tenure) kept after returns, never negative.
    snapshot = pd.DataFrame(
        {
            "purchase_days": [1, 1, 1],
            "tenure_days": [730, 100, 400],
            "recency_days": [730, 100, 400],
            "monetary": [730.0, 100.0, 50.0],
            "return_rate": [0.1, 1.5, 0.0],
        }
    )
    out, report = btyd_features(snapshot, SETTINGS, CUTOFF)
    assert not report["fitted"]
    assert out[list(BTYD_COLUMNS)].isna().all().all()
    assert out["clv_12m"].tolist() == pytest.approx([328.5, 0.0, 50 / (400 / 365)])


def _btyd_snapshot(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    purchase_days = rng.integers(1, 12, n)
    tenure = rng.integers(60, 700, n)
    return pd.DataFrame(
        {
            "purchase_days": purchase_days,
            "tenure_days": tenure,
            # One purchase day: the last purchase is the first.
            "recency_days": np.where(
                purchase_days == 1, tenure, (tenure * rng.uniform(0, 1, n)).astype(int)
            ),
            "monetary": purchase_days * rng.uniform(10, 100, n),
            "return_rate": rng.choice([0.0, 0.2, 1.2], n),
        }
    )


def test_clv_is_discounted_and_net_of_returns_when_models_are_fitted():
    snapshot = _btyd_snapshot()
    out, report = btyd_features(snapshot, SETTINGS, CUTOFF)
    assert report["fitted"]
    assert report["bgnbd"]["converged"]
    assert report["gamma_gamma"]["converged"]
    assert np.isfinite(out.to_numpy()).all()
    assert out["bgnbd_p_no_purchase"].between(0, 1).all()
    clv = out["clv_12m"]
    assert (clv >= 0).all()
    assert (clv[snapshot["return_rate"] >= 1] == 0).all()  # returned everything: no value
    # A higher discount rate lowers every positive value; nothing else changes.
    steeper = FeatureSettings(**{**SETTINGS.__dict__, "annual_discount_rate": 0.5})
    discounted, _ = btyd_features(snapshot, steeper, CUTOFF)
    positive = clv > 0
    assert (discounted["clv_12m"][positive] < clv[positive]).all()
    pd.testing.assert_frame_equal(discounted.drop(columns="clv_12m"), out.drop(columns="clv_12m"))


def test_season_prior_is_the_churn_rate_a_year_earlier(tiny_tx):
    con = ibis.duckdb.connect()
    table = with_day(con.create_table("tx", tiny_tx))
    # A year before 2022-04-01: A (bought 2021-03-20) and B (2021-03-31) are active, C's
    # last order is two years old and D's is on the day itself; A buys again on 2021-04-10,
    # B does not within 30 days: half of them churned.
    past = history(table, SETTINGS)
    assert past.first_day == table.day.min().execute()
    assert season_prior(past, date(2022, 4, 1), SETTINGS) == 0.5
    # Nobody active a year before; a year before lies before the data.
    assert season_prior(past, date(2021, 4, 1), SETTINGS) is None
    assert season_prior(past, date(2019, 6, 1), SETTINGS) is None


def test_season_prior_counts_the_customers_of_one_horizon_before():
    # A year before 2022-04-01, with a 30-day horizon: F and G bought in the 30 days before
    # 2021-04-01 and G bought again within 30 days after it: one of two churned. E bought
    # 81 days before and came back, but is not in the prior (with E it would be 1/3).
    rows = [
        ("Z", "O0", "2020-01-01 12:00", 5.0),
        ("Y", "O6", "2020-01-10 12:00", 5.0),
        ("Z", "O7", "2020-02-01 12:00", 5.0),
        ("E", "O1", "2021-01-10 12:00", 10.0),
        ("E", "O2", "2021-04-15 12:00", 10.0),
        ("F", "O3", "2021-03-20 12:00", 10.0),
        ("G", "O4", "2021-03-25 12:00", 10.0),
        ("G", "O5", "2021-04-20 12:00", 10.0),
    ]
    con = ibis.duckdb.connect()
    past = history(with_day(con.create_table("tx", tx(rows))), SETTINGS)
    assert season_prior(past, date(2022, 4, 1), SETTINGS) == 0.5
    # A year before 2021-01-20 is 2020-01-21. Of Z and Y, who bought in the 30 days before,
    # Y churned; but those 30 days start before the first day, 2020-01-01: no prior.
    assert season_prior(past, date(2021, 1, 20), SETTINGS) is None
    assert season_prior(past, date(2021, 1, 30), SETTINGS) == 0.5  # from 2020-01-01 on


def test_the_orders_of_a_large_history_spill_within_duckdb_memory_limit():
    # 300,000 orders of three lines, each a different product, in a DuckDB session of
    # 64 MB: a product list per order does not fit there; grouped rows spill to disk.
    con = connect(Engine(duckdb=DuckDBSettings("64MB")))
    lines = con.sql(
        """SELECT 'C' || (i // 3 % 5000) AS customer_id, 'O' || (i // 3) AS order_id,
        TIMESTAMP '2024-01-01' + TO_DAYS(CAST(i // 3 % 700 AS INTEGER)) AS ts,
        1.5 AS amount, 1.0 AS quantity, 'P' || (i % 3) AS product_id,
        NULL::VARCHAR AS channel, FALSE AS is_return
        FROM range(900000) t(i)"""
    )
    orders = history(with_day(lines), FeatureSettings()).orders
    summary = (
        orders.agg(
            n=orders.count(),
            products=orders.products.min(),
            most=orders.products.max(),
            value=orders.value.sum(),
        )
        .execute()
        .iloc[0]
    )
    assert (summary.n, summary.products, summary.most) == (300_000, 3, 3)
    assert summary.value == 1_350_000 * MILLIONTHS


@pytest.mark.slow
def test_snapshots_are_byte_identical_from_run_to_run(pipeline, tmp_path):
    """DVC skips the stages after features only when its files are unchanged: the engine's
    thread schedule must not reach the bytes (unit prices and the spread of gaps were
    floats summed in parallel)."""
    from churn import features

    s = pipeline.settings
    again = dataclasses.replace(s.paths, features=tmp_path / "features")
    features.run(s.features, again)
    for name in ("train", "test", "score"):
        first, second = (pd.read_parquet(p.features / f"{name}.parquet") for p in (s.paths, again))
        pd.testing.assert_frame_equal(first, second, check_exact=True)  # names the column
    for name in ("train.parquet", "test.parquet", "score.parquet", "spec.json"):
        assert (again.features / name).read_bytes() == (s.paths.features / name).read_bytes()
