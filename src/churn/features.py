"""Features stage: point-in-time customer snapshots with churn labels.

For a cutoff ``c`` every feature reads only lines with ``ts < c`` and the label reads only
``[c, c + horizon)``. Row-level work is an Ibis expression, so the same definitions run on
DuckDB or Spark; pandas starts at the per-customer snapshot (RFM scores and segments).
Day arithmetic uses whole days since the epoch, which every engine computes the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import ibis
import numpy as np
import pandas as pd
import pyarrow as pa
from ibis.expr import types as ir

from churn import ChurnError, btyd
from churn.config import Engine, FeatureSettings, Paths
from churn.io import connect, materialise, parquet_parts, read_ahead, release, write_json
from churn.progress import progress

EPOCH = date(1970, 1, 1)
ID_COLUMNS = ("customer_id", "cutoff")
LABEL = "churned"
TREND_DAYS = 90
# Money and quantities are summed as integer millionths: a float sum's last bits follow the
# engine's thread schedule, and a rounded feature would then differ from run to run.
MILLIONTHS = 1_000_000
ENGAGEMENT_WINDOWS = (30, 90)
# The order the history's tables are stored in on DuckDB: each customer's rows together.
CUSTOMER_DAYS = ("customer_id", "day")
MIN_BTYD_BUYERS = 10  # repeat buyers a snapshot needs before BTYD models are fitted to it
# BG/NBD's P(alive) is left out: it is exactly 1 for every one-time buyer, so its
# distribution swings with the share of new customers and fails every drift check.
BTYD_COLUMNS = ("bgnbd_p_no_purchase", "bgnbd_expected_purchases")

log = logging.getLogger(__name__)


class SnapshotError(ChurnError):
    """The cutoffs asked for do not fit the data's date range."""


@dataclass(frozen=True)
class SnapshotPlan:
    """Cutoffs of the stacked training snapshots (oldest first), the test and scoring ones."""

    train: tuple[date, ...]
    test: date
    as_of: date


@dataclass(frozen=True)
class FeaturesSummary:
    plan: SnapshotPlan
    rows: dict[str, int]


def day_number(d: date) -> int:
    """Whole days since 1970-01-01."""
    return (d - EPOCH).days


def plan_snapshots(first_day: date, last_day: date, settings: FeatureSettings) -> SnapshotPlan:
    """Place the cutoffs: scoring at ``as_of``; test at the latest fully observed label window;
    a validation snapshot one horizon before the test; ``n_snapshots - 1`` fitting snapshots
    ``snapshot_step_days`` apart, the newest one horizon before the validation cutoff. Every
    label window ends on or before the next stage's cutoff.

    Raises
    ------
    SnapshotError
        When a cutoff falls outside the data or a label window is not fully observed.
    """
    h = timedelta(days=settings.horizon_days)
    as_of = settings.as_of or last_day + timedelta(days=1)
    test = settings.test_cutoff or last_day + timedelta(days=1) - h
    if test + h > last_day + timedelta(days=1):
        raise SnapshotError(
            f"features.test_cutoff {test}: its {settings.horizon_days}-day label "
            f"window ends after the last transaction day {last_day}"
        )
    step = timedelta(days=settings.snapshot_step_days)
    # The newest training snapshot validates the older ones, so its cutoff sits one horizon
    # after theirs: no label window it is judged on overlaps one the trees were fitted on.
    validation = test - h
    fit = tuple(validation - h - k * step for k in reversed(range(settings.n_snapshots - 1)))
    train = (*fit, validation)
    if train[0] <= first_day:
        raise SnapshotError(
            f"the oldest training cutoff {train[0]} is not after the first transaction day "
            f"{first_day}: {_shorter_plan(first_day, last_day, test, settings)}"
        )
    if as_of <= first_day:
        raise SnapshotError(
            f"features.as_of {as_of} is not after the first transaction day {first_day}"
        )
    return SnapshotPlan(train=train, test=test, as_of=as_of)


def _shorter_plan(first_day: date, last_day: date, test: date, settings: FeatureSettings) -> str:
    """What to set in params.yaml for the training cutoffs to fit after ``first_day``: the
    most snapshots the data allow, or, when not even one fitting snapshot fits, the longest
    horizon that leaves room for one (the test cutoff moves with the horizon unless set)."""
    h = settings.horizon_days
    room = (test - timedelta(days=2 * h) - first_day).days  # before the newest fitting cutoff
    if room > 0:
        most = 2 + (room - 1) // settings.snapshot_step_days
        return f"set features.n_snapshots to at most {most}, or lower snapshot_step_days"
    if settings.test_cutoff is None:
        longest = (last_day - first_day).days // 3
    else:
        longest = ((test - first_day).days - 1) // 2
    if longest < 1:
        return "the data span too few days for a label window before the test cutoff"
    return (
        f"the data are too short for a {h}-day horizon: set features.horizon_days to at "
        f"most {longest} and n_snapshots to 2"
    )


@dataclass(frozen=True)
class Engagement:
    """Canonical engagement events (with ``day``) and the families to count."""

    events: ir.Table
    families: tuple[str, ...]


def with_day(tx: ir.Table) -> ir.Table:
    """Add ``day``: whole days since the epoch of each line's timestamp."""
    return tx.mutate(day=(tx.ts.epoch_seconds() // 86400).cast("int64"))


@dataclass(frozen=True)
class History:
    """Summaries of the canonical lines that do not depend on a cutoff, computed once; a
    feature at a cutoff aggregates their rows dated before it.

    Orders are summarised whole, with their first and last day. The lines of the few orders
    that span several days are kept as well: at a cutoff inside such an order, only its
    lines before the cutoff count.
    """

    # Purchase orders: first and last day, value, products, purchase lines, units and unit
    # prices (in MILLIONTHS), whether a line has a positive amount (, online, country).
    orders: ir.Table
    # The purchase lines of orders spanning days, with their last day; None when no order
    # does (the bundled data, the benchmark's), and the cutoffs' queries leave them out.
    open_lines: ir.Table | None
    # Per customer and day with a return line: the value returned (in MILLIONTHS) and the
    # return orders begun that day.
    return_days: ir.Table
    # Per customer and day: the products bought for the first time that day.
    product_days: ir.Table
    # Per customer, the days of its one-day purchase orders of positive value and the gap
    # since its previous such day: at a cutoff, every purchase day of a customer without a
    # longer order before it.
    purchase_days: ir.Table
    first_day: int | None  # the day number of the first line; None without lines
    engagement: Engagement | None = None
    first_event_day: int | None = None  # the day number of the first engagement event


def _order_totals(bought: ir.Table) -> ir.Table:
    """One row per order of the ``bought`` lines: customer, order, first day, value (in
    ``MILLIONTHS``), the lines with a product (the basket size), the lines of positive
    quantity with their units and summed unit prices (in ``MILLIONTHS`` too), whether any line
    has a positive amount, ``online`` and ``country`` when lines have them (an order has one
    country; the greatest when its lines disagree), and last day.

    One group-by of the lines. A product on two lines of an order counts twice: counting
    distinct products would take a second group-by, by order and product, over every line
    (twice the time at 100M lines)."""
    counted = bought.quantity > 0
    optional = {"online": bought.online.any()} if "online" in bought.columns else {}
    if "country" in bought.columns:
        optional["country"] = bought.country.max()
    return bought.group_by("customer_id", "order_id").agg(
        day=bought.day.min(),
        value=in_millionths(bought.amount).sum(),
        products=bought.product_id.count().cast("int32"),  # a line without a product: none
        lines=counted.cast("int32").sum().cast("int32"),
        units=ibis.cases((counted, in_millionths(bought.quantity)), else_=0).sum(),
        unit_prices=ibis.cases(
            (counted, in_millionths(bought.amount / bought.quantity)), else_=0
        ).sum(),
        positive=(bought.amount > 0).any(),
        **optional,
        last_day=bought.day.max(),
    )


def in_millionths(number: ir.FloatingValue) -> ir.IntegerValue:
    """A number (of money, of units) in whole millionths: integers sum exactly in any order."""
    return (number.cast("float64") * MILLIONTHS).round().cast("int64")


def history(
    lines: ir.Table, settings: FeatureSettings, engagement: Engagement | None = None
) -> History:
    """Summarise canonical ``lines`` (with :func:`with_day`) into a :class:`History`, each
    table materialised in the lines' engine. With ``settings.online_channels`` a purchase
    line is ``online`` when its channel is one of them (any case, trimmed)."""
    con = lines.get_backend()
    # Day numbers fit 32 bits: half the memory of 64 in every table kept for the cutoffs.
    lines = lines.mutate(day=lines.day.cast("int32"))
    if not settings.country and "country" in lines.columns:
        lines = lines.drop("country")  # no country mapped: the tables go without one
    bought = lines.filter(~lines.is_return)
    if settings.online_channels:
        wanted = [c.strip().lower() for c in settings.online_channels]
        bought = bought.mutate(online=bought.channel.strip().lower().isin(wanted).fill_null(False))
    named = ibis.util.gen_name("orders")
    with_ids = materialise(con, named, _order_totals(bought))
    spanning = with_ids.filter(with_ids.day < with_ids.last_day)
    open_lines = None
    if int(spanning.count().execute()) > 0:
        open_lines = bought.inner_join(
            spanning.select("customer_id", "order_id", "last_day"), ["customer_id", "order_id"]
        )
        open_lines = materialise(con, ibis.util.gen_name("open_lines"), open_lines)
    # Order ids are needed no further: the table kept for the cutoffs goes without them.
    orders = materialise(
        con, ibis.util.gen_name("orders"), with_ids.drop("order_id"), clustered_by=CUSTOMER_DAYS
    )
    release(con, named)
    returns = lines.filter(lines.is_return)
    return_orders = returns.group_by("customer_id", "order_id").agg(day=returns.day.min())
    return_days = returns.group_by("customer_id", "day").agg(
        returned_value=-in_millionths(returns.amount).sum()
    )
    return_days = return_days.left_join(
        _count_per_day(return_orders, "new_return_orders"), ["customer_id", "day"]
    ).drop("customer_id_right", "day_right")
    return_days = return_days.mutate(new_return_orders=return_days.new_return_orders.fill_null(0))
    return_days = materialise(con, ibis.util.gen_name("return_days"), return_days)
    products = bought.filter(bought.product_id.notnull())
    firsts = products.group_by("customer_id", "product_id").agg(day=products.day.min())
    product_days = _count_per_day(firsts, "new_products")
    # Every line is in an order or a return: the first of either is the first line.
    starts = [t.day.min().execute() for t in (orders, return_days)]
    starts = [int(day) for day in starts if not pd.isna(day)]
    first_event_day = None if engagement is None else engagement.events.day.min().execute()
    one_day = orders.filter(orders.day == orders.last_day, orders.value > 0)
    purchase_days = _day_gaps(one_day)
    return History(
        orders=orders,
        open_lines=open_lines,
        return_days=return_days,
        product_days=materialise(con, ibis.util.gen_name("product_days"), product_days),
        purchase_days=materialise(
            con, ibis.util.gen_name("purchase_days"), purchase_days, clustered_by=CUSTOMER_DAYS
        ),
        first_day=min(starts, default=None),
        engagement=engagement,
        first_event_day=None if pd.isna(first_event_day) else int(first_event_day),
    )


def _count_per_day(firsts: ir.Table, name: str) -> ir.Table:
    """The rows of ``firsts`` per customer and ``day``, counted as ``name``."""
    return firsts.group_by("customer_id", "day").agg(**{name: firsts.count().cast("int32")})


def purchase_orders(history: History, cutoff: date) -> ir.Table:
    """One row per purchase order with lines before ``cutoff`` of positive value: customer,
    the day of its first line, and the :func:`_order_totals` of its lines before the
    cutoff."""
    c = day_number(cutoff)
    orders = history.orders
    before = orders.filter(orders.last_day < c).drop("last_day")
    lines = history.open_lines
    if lines is not None:  # orders spanning the cutoff count with their lines before it
        lines = lines.filter(lines.day < c, lines.last_day >= c)
        part = _order_totals(lines.drop("last_day")).drop("order_id", "last_day")
        before = ibis.union(before, part)
    return before.filter(before.value > 0)


def order_features(
    orders: ir.Table, cutoff: date, windows: tuple[int, ...], horizon_days: int
) -> ir.Table:
    """Recency, tenure, frequency, monetary, windowed counts/spend, basket size,
    seasonality and (when orders have ``online``) channel mix per customer from
    :func:`purchase_orders` at ``cutoff``.

    The seasonal window is ``[cutoff - 365, cutoff - 365 + horizon)``; ``season_order_share``
    is the share of all past orders placed in the coming ``horizon`` days of the calendar
    year, any year (a 365-day year: one day of drift per leap year).
    """
    c = day_number(cutoff)

    def orders_in(where: ir.BooleanValue) -> ir.IntegerScalar:
        return orders.count(where=where)

    def spend_in(where: ir.BooleanValue | None = None) -> ir.FloatingScalar:
        # A filtered aggregate: engines skip the rows outside (faster than a CASE per row).
        return (orders.value.sum(where=where).fill_null(0) / MILLIONTHS).cast("float64")

    windowed = {}
    for w in windows:
        windowed[f"orders_{w}d"] = orders_in(orders.day >= c - w)
        windowed[f"spend_{w}d"] = spend_in(orders.day >= c - w)
    if "online" in orders.columns:
        windowed["online_order_share"] = orders.online.cast("float64").mean()
    previous = (orders.day >= c - 2 * TREND_DAYS) & (orders.day < c - TREND_DAYS)
    recent = orders.day >= c - TREND_DAYS
    # Seasonality: what the customer did in the window a year before the label window.
    last_year = (orders.day >= c - 365) & (orders.day < min(c - 365 + horizon_days, c))
    # Both operands of % are made non-negative: engines disagree on the sign of a remainder.
    in_season = ((orders.day - c) % 365 + 365) % 365 < horizon_days
    agg = orders.group_by("customer_id").agg(
        recency_days=c - orders.day.max(),
        tenure_days=c - orders.day.min(),
        frequency=orders.count(),
        monetary=spend_in(),
        _orders_recent=orders_in(recent),
        _orders_previous=orders_in(previous),
        _spend_recent=spend_in(recent),
        _spend_previous=spend_in(previous),
        orders_same_window_last_year=orders_in(last_year),
        spend_same_window_last_year=spend_in(last_year),
        _spend_year=spend_in(orders.day >= c - 365),
        season_order_share=in_season.cast("float64").mean(),
        mean_basket_products=orders.products.mean(),
        _products_recent=orders.products.mean(where=recent),
        _products_before=orders.products.mean(where=~recent),
        _lines=orders.lines.sum(),
        _units=orders.units.sum(),
        _unit_prices=orders.unit_prices.sum(),
        **windowed,
    )
    agg = agg.mutate(mean_order_value=agg.monetary / agg.frequency).relocate(
        "mean_order_value", after="monetary"
    )
    # Ratios are smoothed by one order / one unit of spend so new and idle customers stay finite.
    # Null where a customer has no basket before or in the last TREND_DAYS.
    return agg.mutate(
        orders_trend=(agg._orders_recent + 1) / (agg._orders_previous + 1),
        spend_trend=(agg._spend_recent + 1) / (agg._spend_previous + 1),
        spend_share_same_window_last_year=agg.spend_same_window_last_year
        / ibis.greatest(agg._spend_year, 1.0),
        basket_size_trend=agg._products_recent / agg._products_before,
        mean_units_per_line=agg._units / agg._lines.nullif(0).cast("float64") / MILLIONTHS,
        mean_unit_price=agg._unit_prices / agg._lines.nullif(0).cast("float64") / MILLIONTHS,
    ).drop(*(c for c in agg.columns if c.startswith("_")))


# Windowed transaction features that do not end with their window's length in days.
TREND_FEATURES = ("orders_trend", "spend_trend")  # the previous window: 2 x TREND_DAYS back
YEAR_FEATURES = (
    "orders_same_window_last_year",
    "spend_same_window_last_year",
    "spend_share_same_window_last_year",
    "season_order_share",
    "active_months_365d",
    "max_gap_365d",
)


def unobserved_windows(
    cutoff_day: int, first_day: int | None, windows: tuple[int, ...]
) -> list[str]:
    """The windowed features whose window starts before the history's first day: the data
    cannot tell them, so they are unknown (null) at that cutoff, not zero.

    >>> unobserved_windows(200, 0, (30, 365))[:3]
    ['orders_365d', 'spend_365d', 'orders_same_window_last_year']
    """
    if first_day is None:
        return []
    spans = {f"{kind}_{w}d": w for w in windows for kind in ("orders", "spend")}
    spans |= dict.fromkeys(TREND_FEATURES, 2 * TREND_DAYS) | dict.fromkeys(YEAR_FEATURES, 365)
    return [name for name, days in spans.items() if cutoff_day - days < first_day]


def unobserved_engagement(
    cutoff_day: int, first_event_day: int | None, families: tuple[str, ...]
) -> list[str]:
    """The engagement counts and trend whose window starts before the first event of the
    events file (where its export begins): unknown (null) at that cutoff, not zero.

    >>> unobserved_engagement(100, 40, ("visit",))
    ['visit_90d', 'engagement_trend']
    """
    if first_event_day is None:
        return []
    spans = {f"{family}_{w}d": w for family in families for w in ENGAGEMENT_WINDOWS}
    spans["engagement_trend"] = 2 * TREND_DAYS
    return [name for name, days in spans.items() if cutoff_day - days < first_event_day]


def _day_gaps(orders: ir.Table) -> ir.Table:
    """The distinct days of ``orders`` per customer, with the gap since the previous one."""
    days = orders.select("customer_id", "day").distinct()
    return days.mutate(
        gap=(days.day - days.day.lag().over(group_by=days.customer_id, order_by=days.day)).cast(
            "int32"
        )
    )


def purchase_day_features(history: History, orders: ir.Table, cutoff: date) -> ir.Table:
    """Purchase days, active months in the last year, and the mean, spread, latest and
    longest recent gap (days) between purchase days, from :func:`purchase_orders` at
    ``cutoff``.

    The days and gaps come from ``history.purchase_days``, except for the few customers with
    an order spanning several days begun before the cutoff: theirs are worked out from
    ``orders``, whose value before the cutoff decides whether such an order is a purchase.
    """
    c = day_number(cutoff)
    open_lines = history.open_lines
    days = history.purchase_days.filter(history.purchase_days.day < c)
    if open_lines is not None:
        mixed = open_lines.filter(open_lines.day < c).select("customer_id").distinct()
        days = ibis.union(
            days.anti_join(mixed, "customer_id"),
            _day_gaps(orders.semi_join(mixed, "customer_id")),
        )
    year = days.day >= c - 365
    # The 30-day months before the cutoff, counted without a distinct: a purchase day opens
    # a month when the customer's previous one is in another month or before the year.
    previous = days.day - days.gap
    other_month = (c - days.day) // 30 != (c - previous) // 30
    opens = days.gap.isnull() | (previous < c - 365) | other_month
    gap = days.gap.cast("int64")
    agg = days.group_by("customer_id").agg(
        purchase_days=days.count(),
        active_months_365d=days.count(where=year & opens),
        gap_mean_days=days.gap.mean(),
        _gaps=days.gap.count(),
        _gap_sum=gap.sum(),
        _gap_squares=(gap * gap).sum(),
        last_gap_days=days.gap.argmax(days.day),
        max_gap_365d=days.gap.max(where=year),
    )
    # The spread from exact integer sums: a float standard deviation's last bits follow the
    # engine's thread schedule, and rounded snapshots would differ from run to run.
    n = agg._gaps.nullif(0)
    spread = (n * agg._gap_squares - agg._gap_sum * agg._gap_sum).cast("float64") / (n * n)
    return (
        agg.mutate(gap_std_days=spread.sqrt())
        .relocate("gap_std_days", after="gap_mean_days")
        .drop("_gaps", "_gap_sum", "_gap_squares")
    )


def return_features(history: History, cutoff: date) -> ir.Table:
    """Value returned, return orders and days since the last return line before
    ``cutoff``, per customer with a return before it."""
    c = day_number(cutoff)
    days = history.return_days.filter(history.return_days.day < c)
    return days.group_by("customer_id").agg(
        returned_value=(days.returned_value.sum() / MILLIONTHS).cast("float64"),
        return_orders=days.new_return_orders.sum(),
        days_since_return=c - days.day.max(),
    )


def product_breadth(history: History, cutoff: date) -> ir.Table:
    """The distinct products each customer bought before ``cutoff``."""
    c = day_number(cutoff)
    days = history.product_days.filter(history.product_days.day < c)
    return days.group_by("customer_id").agg(distinct_products=days.new_products.sum())


def customer_country(orders: ir.Table) -> ir.Table:
    """Per customer of :func:`purchase_orders` with a country: that of the latest order
    (the greatest of that day's when they differ)."""
    known = orders.filter(orders.country.notnull())
    known = known.mutate(_latest=known.day.max().over(group_by="customer_id"))
    latest = known.filter(known.day == known._latest)
    return latest.group_by("customer_id").agg(country=latest.country.max())


def with_home_country(snapshot: ir.Table) -> ir.Table:
    """Replace ``country`` by ``home_country``: 1 when it is the country most of the
    snapshot's customers are in (each of them on a tie), 0 for another, null without one.

    One flag rather than a code or a share per country: a share moves a little from one
    snapshot to the next, and that moves whole countries across the drift check's bins.
    Worked out on the customers per country (a small table), not over a window of every
    customer, which Spark would gather into one partition.
    """
    known = snapshot.filter(snapshot.country.notnull())
    per_country = known.group_by("country").agg(_customers=known.count())
    home = per_country.filter(per_country._customers == per_country._customers.max())
    joined = snapshot.left_join(home.select("country", _home=ibis.literal(1.0)), "country")
    flag = ibis.cases(
        (joined.country.isnull(), ibis.null("float64")), (joined._home.notnull(), 1.0), else_=0.0
    )
    return joined.mutate(home_country=flag).drop("country", "country_right", "_home")


def engagement_features(engagement: Engagement, cutoff: date) -> ir.Table:
    """Counts per family in 30/90 days, days since the last event, the engagement trend,
    and last and mean NPS / CSAT with NPS promoter and detractor flags."""
    c = day_number(cutoff)
    ev = engagement.events.filter(engagement.events.day < c)
    counts = {
        f"{family}_{w}d": ((ev.family == family) & (ev.day >= c - w)).cast("int64").sum()
        for family in engagement.families
        for w in ENGAGEMENT_WINDOWS
    }
    scores = {}
    for survey in ("nps", "csat"):
        if survey in engagement.families:
            answered = ev.family == survey
            scores[f"{survey}_last"] = ev.value.argmax(ev.ts, where=answered & ev.value.notnull())
            total = in_millionths(ev.value).sum(where=answered)
            scores[f"{survey}_mean"] = total / ev.value.count(where=answered) / MILLIONTHS
    recent = ev.day >= c - TREND_DAYS
    previous = (ev.day >= c - 2 * TREND_DAYS) & (ev.day < c - TREND_DAYS)
    agg = ev.group_by("customer_id").agg(
        days_since_engagement=c - ev.day.max(),
        _recent=recent.cast("int64").sum(),
        _previous=previous.cast("int64").sum(),
        **counts,
        **scores,
    )
    agg = agg.mutate(engagement_trend=(agg._recent + 1) / (agg._previous + 1))
    if "nps_last" in agg.columns:
        # 9-10 promoters, 0-6 detractors (the NPS convention); null when never answered.
        agg = agg.mutate(
            nps_promoter=(agg.nps_last >= 9).cast("float64"),
            nps_detractor=(agg.nps_last <= 6).cast("float64"),
        )
    return agg.drop("_recent", "_previous")


def customer_features(history: History, cutoff: date, settings: FeatureSettings) -> ir.Table:
    """All per-customer features at ``cutoff`` for customers active in the lookback window."""
    orders = purchase_orders(history, cutoff)
    base = order_features(orders, cutoff, settings.windows_days, settings.horizon_days)
    base = base.filter(base.recency_days <= settings.active_lookback_days)
    parts = [
        purchase_day_features(history, orders, cutoff),
        return_features(history, cutoff),
        product_breadth(history, cutoff),
    ]
    if "country" in orders.columns:
        parts.append(customer_country(orders))
    if history.engagement is not None:
        parts.append(engagement_features(history.engagement, cutoff))
    joined = base
    for part in parts:
        joined = joined.left_join(part, "customer_id").drop("customer_id_right")
    if history.engagement is not None:
        # No events before the cutoff is a count of zero, not an unknown one.
        families = history.engagement.families
        counts = [f"{f}_{w}d" for f in families for w in ENGAGEMENT_WINDOWS]
        joined = joined.mutate(**{c: joined[c].fill_null(0) for c in counts})
    # No return or product before the cutoff is a count of zero.
    zeros = ("returned_value", "return_orders", "distinct_products")
    joined = joined.mutate(**{c: joined[c].fill_null(0) for c in zeros})
    # The snapshot's column order is the order of the model's features: kept stable.
    joined = (
        joined.relocate("purchase_days", after="frequency")
        .relocate("active_months_365d", after="season_order_share")
        .relocate("mean_units_per_line", "mean_unit_price", after="distinct_products")
    )
    if "online_order_share" in joined.columns:
        joined = joined.relocate("online_order_share", after=joined.columns[-1])
    if "country" in joined.columns:
        joined = with_home_country(joined)
    c = day_number(cutoff)
    unobserved = unobserved_windows(c, history.first_day, settings.windows_days)
    if history.engagement is not None:
        families = history.engagement.families
        unobserved += unobserved_engagement(c, history.first_event_day, families)
    joined = joined.mutate(**{name: ibis.null(joined[name].type()) for name in unobserved})
    return joined.mutate(
        overdue_ratio=joined.recency_days / joined.gap_mean_days,
        gap_cv=joined.gap_std_days / joined.gap_mean_days,
        # float64 first: Spark reads 30.4 as a DECIMAL and would round the quotient
        purchase_days_per_month=joined.purchase_days
        / (ibis.greatest(joined.tenure_days, 30).cast("float64") / 30.4),
        return_rate=joined.returned_value / joined.monetary,
        cutoff=ibis.date(cutoff),
    )


def churn_labels(history: History, cutoff: date, horizon_days: int) -> ir.Table:
    """Customers with a purchase line of positive amount in ``[cutoff, cutoff + horizon)``,
    flagged ``bought = 1``: a one-day order that day, or a line of an order spanning days."""
    c, end = day_number(cutoff), day_number(cutoff) + horizon_days
    orders, lines = history.orders, history.open_lines
    one_day = orders.filter(
        orders.day == orders.last_day, orders.day >= c, orders.day < end, orders.positive
    )
    future = one_day.select("customer_id")
    if lines is not None:
        spanning = lines.filter(lines.day >= c, lines.day < end, lines.amount > 0)
        future = ibis.union(future, spanning.select("customer_id"))
    return future.distinct().mutate(bought=ibis.literal(1))


def season_prior(history: History, cutoff: date, settings: FeatureSettings) -> float | None:
    """The churn rate a year before ``cutoff``: customers with a purchase in the horizon
    before ``cutoff - 365`` days who made none in the horizon after it, all observed before
    ``cutoff``.

    It is the base rate of the same season, for the model to move its probabilities from
    the validation snapshot's season to this one's. Its customers are those of one horizon
    before, whatever the cutoff, so the priors of two cutoffs compare like with like even
    where the data do not reach a whole lookback before the earlier one. None when that
    horizon starts before the history's first day, or when the horizon is longer than a
    year.
    """
    year_before = cutoff - timedelta(days=365)
    previous, horizon = day_number(year_before), settings.horizon_days
    first_day = history.first_day
    if horizon > 365 or first_day is None or previous - horizon < first_day:
        return None
    # The buyers of the horizon before the day a year earlier, and those who bought again.
    buyers = churn_labels(history, year_before - timedelta(days=horizon), horizon)
    labels = churn_labels(history, year_before, horizon)
    labelled = buyers.select("customer_id").left_join(labels, "customer_id")
    rate = labelled.bought.isnull().cast("float64").mean().execute()
    return float(rate) if rate is not None and 0 < rate < 1 else None


def with_season_prior(frame: pd.DataFrame, priors: dict[date, float | None]) -> pd.DataFrame:
    """Add ``season_prior``: the :func:`season_prior` of each row's cutoff, from ``priors``
    (NaN when unknown)."""
    return frame.assign(season_prior=frame["cutoff"].map(priors).astype("float64").round(9))


def labelled_snapshot(history: History, cutoff: date, settings: FeatureSettings) -> ir.Table:
    """Features at ``cutoff`` joined with the label ``churned``."""
    feats = customer_features(history, cutoff, settings)
    joined = feats.left_join(churn_labels(history, cutoff, settings.horizon_days), "customer_id")
    return (
        joined.drop("customer_id_right")
        .mutate(churned=joined.bought.isnull().cast("int8"))
        .drop("bought")
    )


def check_test_window(history: History, test: date, horizon_days: int) -> None:
    """Stop when the test snapshot's label window ``[test, test + horizon)`` has purchases on
    fewer than half as many days as the horizon before it, or that horizon has none.

    The automatic test cutoff sits one horizon before the last line: one line dated weeks
    after the others (a typo in a year) moves it to where the data have nothing left to
    label, and every customer would look churned.

    Raises
    ------
    SnapshotError
        Naming both windows, their purchase days and the latest line's date.
    """
    c, h = day_number(test), horizon_days
    orders = history.orders
    near = orders.filter(orders.day >= c - h, orders.day < c + h)
    counts = near.group_by(after=near.day >= c).agg(days=near.day.nunique()).execute()
    days = dict(zip(counts["after"], counts["days"], strict=True))
    before, after = int(days.get(False, 0)), int(days.get(True, 0))
    if before > 0 and 2 * after >= before:
        return
    last = EPOCH + timedelta(days=int(orders.last_day.max().execute()))
    end = test + timedelta(days=h - 1)
    raise SnapshotError(
        f"the test snapshot's label window {test} to {end} has purchases on {after} days, "
        f"against {before} in the {h} days before it: the last days of the data look "
        f"incomplete (the latest purchase is dated {last}). Remove stray late lines from the "
        "export (see data/interim/transactions.parquet), or set features.test_cutoff and "
        "features.as_of in params.yaml"
    )


def rfm_scores(snapshot: pd.DataFrame) -> pd.DataFrame:
    """Add 1-5 quintile scores ``r_score``, ``f_score``, ``m_score`` and ``rfm_segment``.

    Scores are computed within each cutoff; ties share a score; 5 is best (most recent, most
    frequent, highest spend).

    >>> frame = pd.DataFrame({"cutoff": [1] * 5, "recency_days": [1, 2, 3, 4, 5],
    ...                       "frequency": [5, 4, 3, 2, 1], "monetary": [5.0, 4, 3, 2, 1]})
    >>> rfm_scores(frame)[["r_score", "f_score", "m_score"]].values.tolist()[0]
    [5, 5, 5]
    """
    scores = {}
    for name, column, sign in (
        ("r_score", "recency_days", -1),
        ("f_score", "frequency", 1),
        ("m_score", "monetary", 1),
    ):
        pct = (sign * snapshot[column]).groupby(snapshot["cutoff"]).rank(method="average", pct=True)
        scores[name] = np.clip(np.ceil(pct * 5), 1, 5).astype("int64")
    segment = rfm_segment(scores["r_score"].to_numpy(), scores["f_score"].to_numpy())
    return snapshot.assign(**scores, rfm_segment=segment)


def rfm_segment(r: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Name the RFM segment of each (recency score, frequency score) pair; rules in order."""
    conditions = [
        (r >= 4) & (f >= 4),
        (r >= 3) & (f >= 3),
        (r >= 4) & (f <= 1),
        r >= 3,
        f >= 5,
        f >= 3,
        r == 2,
    ]
    names = ["Champions", "Loyal", "New", "Potential", "Can't lose", "At risk", "Hibernating"]
    return np.select(conditions, names, default="Lost")


def btyd_inputs(snapshot: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BTYD summary of each customer in weeks: repeat purchase days ``x``, time of the last
    purchase day ``t_x`` and age ``T``, both counted from the first purchase day."""
    x = snapshot["purchase_days"].to_numpy("float64") - 1
    t_x = (snapshot["tenure_days"] - snapshot["recency_days"]).to_numpy("float64") / 7
    age = snapshot["tenure_days"].to_numpy("float64") / 7
    return x, t_x, age


def btyd_fit_rows(customers: int, cutoff: date, limit: int) -> np.ndarray:
    """The rows of a snapshot's ``customers`` that BTYD models are fitted on: at most
    ``limit``, drawn with a seed fixed by the cutoff, so every stage fits on the same ones."""
    return np.random.default_rng(day_number(cutoff)).permutation(customers)[:limit]


def too_few_buyers(x: np.ndarray) -> str | None:
    """Why BTYD models are not fitted to customers with repeat purchases ``x``, or ``None``
    when enough of them bought again (``MIN_BTYD_BUYERS``) for a fit to mean something."""
    buyers = int((x > 0).sum())
    if buyers < MIN_BTYD_BUYERS:
        return f"{buyers} customers with repeat purchases, fewer than {MIN_BTYD_BUYERS}"
    return None


def btyd_features(
    snapshot: pd.DataFrame, settings: FeatureSettings, cutoff: date
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """BG/NBD and Gamma-Gamma outputs for one snapshot, and the fit report.

    The models are fitted on this snapshot's customers (at most ``btyd_fit_customers`` of
    them, drawn with a seed fixed by the cutoff), whose histories end before the cutoff.
    Columns: BG/NBD P(no purchase in the horizon) and expected purchases in the horizon,
    and ``clv_12m``: expected purchases in the next 12 months,
    each month discounted at ``annual_discount_rate``, times the Gamma-Gamma spend per
    purchase day, reduced by the customer's return rate; never negative or missing. When a
    snapshot has too few repeat buyers to fit, the model columns are missing and ``clv_12m``
    falls back to the yearly spend so far net of returns; the report says so. A fit that
    fails on enough data raises :class:`churn.btyd.BTYDFitError`.
    """
    x, t_x, age = btyd_inputs(snapshot)
    spend_per_day = snapshot["monetary"].to_numpy("float64") / (x + 1)
    kept = 1 - np.clip(snapshot["return_rate"].to_numpy("float64"), 0, 1)
    fit_rows = btyd_fit_rows(len(snapshot), cutoff, settings.btyd_fit_customers)
    horizon, year = settings.horizon_days / 7, 365.25 / 7
    out = pd.DataFrame(index=snapshot.index)
    reason = too_few_buyers(x[fit_rows])
    if reason:
        log.warning("BTYD features at cutoff %s left missing: %s", cutoff, reason)
        for column in BTYD_COLUMNS:
            out[column] = np.nan
        years = np.maximum(snapshot["tenure_days"].to_numpy("float64"), 365) / 365
        out["clv_12m"] = np.clip(snapshot["monetary"].to_numpy("float64") / years * kept, 0, None)
        return out, {"fitted": False, "reason": reason, "customers": int(fit_rows.size)}
    # Pareto/NBD ranks customers like BG/NBD but its likelihood costs a quadrature per
    # customer: it is the evaluate stage's baseline, not a feature.
    bgnbd = btyd.fit_bgnbd(x[fit_rows], t_x[fit_rows], age[fit_rows])
    spend = btyd.fit_gamma_gamma(x[fit_rows], spend_per_day[fit_rows])
    params = bgnbd.params
    out["bgnbd_p_no_purchase"] = btyd.bgnbd_probability_no_purchase(
        params, x, t_x, age, horizon=horizon
    )
    out["bgnbd_expected_purchases"] = btyd.bgnbd_expected_purchases(
        params, x, t_x, age, horizon=horizon
    )
    purchases = btyd.bgnbd_discounted_purchases(
        params, x, t_x, age, horizon=year, periods=12, rate=settings.annual_discount_rate
    )
    if spend.params.q > 1:
        per_purchase = btyd.gamma_gamma_expected_spend(spend.params, x, spend_per_day)
    else:  # the population's mean spend is infinite: each customer keeps their own mean
        per_purchase = spend_per_day
    out["clv_12m"] = np.clip(purchases * per_purchase * kept, 0, None)
    report = {
        "fitted": True,
        "customers": int(fit_rows.size),
        "bgnbd": _fit_report(bgnbd),
        "gamma_gamma": _fit_report(spend),
    }
    return out, report


def _fit_report(fit: btyd.BTYDFit) -> dict[str, Any]:
    return {
        "converged": fit.converged,
        "log_likelihood": fit.log_likelihood,
        "iterations": fit.iterations,
        "method": fit.method,
        "params": dataclasses.asdict(fit.params),
    }


def executed_snapshot(expr: ir.Table) -> pa.Table:
    """Execute a snapshot expression into Arrow, ordered by cutoff and customer.

    Parallel float sums differ in the last bits from run to run; rounding keeps reruns
    equal. Rounded and sorted by the engine (faster than pandas or Arrow at it), and read
    through Arrow: Ibis's own to_pandas goes through Python objects for every column
    holding a null.
    """
    floats = [name for name, dtype in expr.schema().items() if dtype.is_floating()]
    expr = expr.mutate(**{name: expr[name].round(9) for name in floats})
    # DuckDB's Arrow result holds several times its size in buffers (near 1 GB for 250k
    # customers); a compact copy lets it go at once.
    return expr.order_by("cutoff", "customer_id").to_pyarrow().combine_chunks()


def snapshot_frame(
    table: pa.Table, settings: FeatureSettings
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """An :func:`executed_snapshot` as a pandas frame with RFM scores and BTYD features;
    also return the BTYD fit report per cutoff. A column without a value at all comes out
    as float64 NaN; counts without a gap as 32-bit integers, which MLflow's signatures take
    as doubles. ``table`` is consumed: its buffers are freed as they are converted."""
    frame = rfm_scores(table.to_pandas(split_blocks=True, self_destruct=True))
    parts, fits = [], {}
    for cutoff, rows in frame.groupby("cutoff", sort=True):
        part, fits[str(cutoff)] = btyd_features(rows, settings, cutoff)
        parts.append(part)
    columns = pd.concat(parts) if parts else pd.DataFrame(columns=[*BTYD_COLUMNS, "clv_12m"])
    frame = frame.assign(**columns.round(9))
    return frame.astype(dict.fromkeys(frame.select_dtypes("int64").columns, "int32")), fits


def feature_spec(settings: FeatureSettings, families: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a model trained on these snapshots relies on: horizon, windows, lookback, event
    families, and a hash of the feature definitions (their code and settings). Scoring
    compares it."""
    code = "".join(
        inspect.getsource(f)
        for f in (
            with_day,
            History,
            in_millionths,
            _order_totals,
            history,
            _count_per_day,
            purchase_orders,
            order_features,
            _day_gaps,
            unobserved_windows,
            purchase_day_features,
            return_features,
            product_breadth,
            customer_country,
            with_home_country,
            engagement_features,
            customer_features,
            churn_labels,
            rfm_scores,
            rfm_segment,
            btyd_inputs,
            too_few_buyers,
            btyd_features,
            season_prior,
        )
    )
    defining = {
        "code": code,
        "windows_days": list(settings.windows_days),
        "active_lookback_days": settings.active_lookback_days,
        "annual_discount_rate": settings.annual_discount_rate,
        "trend_days": TREND_DAYS,
        "engagement_families": list(families),
        "online_channels": list(settings.online_channels),
        "country": settings.country,
    }
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    return {
        "feature_hash": digest[:16],
        "horizon_days": settings.horizon_days,
        "windows_days": list(settings.windows_days),
        "active_lookback_days": settings.active_lookback_days,
        "engagement_families": list(families),
    }


def load_engagement(
    con: ibis.BaseBackend, path: Path, families: tuple[str, ...]
) -> Engagement | None:
    """The canonical events file as an :class:`Engagement`, or ``None`` when it is empty."""
    events = con.read_parquet(path)
    if not families or int(events.count().execute()) == 0:
        return None
    return Engagement(events=with_day(events), families=families)


def run(
    settings: FeatureSettings,
    paths: Paths,
    *,
    families: tuple[str, ...] = (),
    engine: Engine | None = None,
) -> FeaturesSummary:
    """Build the train, test and scoring snapshots from the canonical tables.

    ``families`` are the engagement event families to count when events exist; ``engine``
    says where the row-level work runs (DuckDB by default).
    """
    con = connect(engine)
    tx = with_day(con.read_parquet(paths.transactions))
    engagement = load_engagement(con, paths.events, families)
    span = tx.agg(first=tx.ts.min(), last=tx.ts.max()).execute().iloc[0]
    plan = plan_snapshots(span["first"].date(), span["last"].date(), settings)
    past = history(tx, settings, engagement)
    if settings.test_cutoff is None:  # placed by the data's last day: check that day
        check_test_window(past, plan.test, settings.horizon_days)
    snapshots = [
        *(("train", c, labelled_snapshot(past, c, settings)) for c in plan.train),
        ("test", plan.test, labelled_snapshot(past, plan.test, settings)),
        ("score", plan.as_of, customer_features(past, plan.as_of, settings)),
    ]
    # The engine's work on a snapshot runs in the background while the previous one gets its
    # RFM scores and BTYD features.
    executed = (
        (name, executed_snapshot(expr), {cutoff: season_prior(past, cutoff, settings)})
        for name, cutoff, expr in snapshots
    )
    rows: dict[str, int] = {"train": 0, "test": 0, "score": 0}
    fits: dict[str, Any] = {}
    # At most two cutoffs in memory at a time; the three files appear together, and only
    # when every snapshot has customers.
    with contextlib.ExitStack() as stack:
        append = {
            name: stack.enter_context(parquet_parts(paths.features / f"{name}.parquet"))
            for name in rows
        }
        advance = stack.enter_context(progress("features: snapshots (cutoffs)", len(snapshots)))
        for name, table, priors in stack.enter_context(read_ahead(executed)):
            frame, cutoff_fits = snapshot_frame(table, settings)
            if len(frame):
                append[name](with_season_prior(frame, priors))
            rows[name] += len(frame)
            fits.update(cutoff_fits)
            advance(1)
            del table, frame  # gone before the next snapshot arrives, not after it
        empty = [name for name, n in rows.items() if n == 0]
        if empty:
            raise SnapshotError(
                f"the {' and '.join(empty)} snapshot(s) have no active customers; check "
                "features.active_lookback_days and the cutoffs"
            )
    # What the model is trained to (the stages after train read it), apart from the
    # scoring date: a new as_of must not make DVC retrain.
    trained = [str(c) for c in (*plan.train, plan.test)]
    write_json(
        {
            **feature_spec(settings, engagement.families if engagement else ()),
            "train_cutoffs": trained[:-1],
            "test_cutoff": trained[-1],
            "btyd_fits": {cutoff: fits[cutoff] for cutoff in trained if cutoff in fits},
        },
        paths.features / "spec.json",
    )
    scoring = {"as_of": str(plan.as_of), "btyd_fit": fits.get(str(plan.as_of))}
    write_json(scoring, paths.features / "scoring.json")
    return FeaturesSummary(plan=plan, rows=rows)
