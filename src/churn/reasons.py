"""Plain-language reasons: why the model thinks a customer is slipping.

The features with the largest positive contributions to a customer's churn log-odds become
codes (``reason_1``...) and sentences built from the customer's own numbers. Every feature the
model can use has a phrasing here, in one table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pandas as pd

Row = dict[str, float]


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _money(value: float) -> str:
    return f"{value:,.2f}"


def _plural(count: float, word: str) -> str:
    return f"{_n(count)} {word}{'' if round(count) == 1 else 's'}"


def _trend(kind: str) -> Callable[[Row], str]:
    def phrase(row: Row) -> str:
        # The trend is (last 90 days + 1) / (the 90 before + 1): a jump from nothing is large.
        ratio = row[f"{kind}_trend"]
        if ratio >= 10:
            return f"{kind} jumped from almost nothing in the previous quarter"
        direction = "down" if ratio < 1 else "up"
        return f"{kind} {direction} {abs(1 - ratio) * 100:.0f}% vs the previous quarter"

    return phrase


TEMPLATES: dict[str, Callable[[Row], str]] = {
    "recency_days": lambda r: f"no purchase for {_n(r['recency_days'])} days",
    "overdue_ratio": lambda r: f"{r['overdue_ratio']:.1f}x their usual gap between purchases",
    "tenure_days": lambda r: f"first purchase {_n(r['tenure_days'])} days ago",
    "frequency": lambda r: f"{_plural(r['frequency'], 'order')} in total",
    "purchase_days": lambda r: f"bought on {_plural(r['purchase_days'], 'day')} in total",
    "monetary": lambda r: f"lifetime spend {_money(r['monetary'])}",
    "mean_order_value": lambda r: f"average order {_money(r['mean_order_value'])}",
    "orders_trend": _trend("orders"),
    "spend_trend": _trend("spend"),
    "gap_mean_days": lambda r: f"usually buys every {_n(r['gap_mean_days'])} days",
    "gap_std_days": lambda r: f"irregular buyer (gaps vary by {_n(r['gap_std_days'])} days)",
    "returned_value": lambda r: f"returned goods worth {_money(r['returned_value'])}",
    "return_orders": lambda r: f"{_plural(r['return_orders'], 'return')} so far",
    "return_rate": lambda r: f"returns are {r['return_rate'] * 100:.0f}% of spend",
    "distinct_products": lambda r: f"bought {_plural(r['distinct_products'], 'product')}",
    "orders_same_window_last_year": lambda r: (
        f"{_plural(r['orders_same_window_last_year'], 'order')} in this season last year"
    ),
    "spend_same_window_last_year": lambda r: (
        f"spent {_money(r['spend_same_window_last_year'])} in this season last year"
    ),
    "days_since_engagement": lambda r: (
        f"no visit, email or other contact for {_n(r['days_since_engagement'])} days"
    ),
    "engagement_trend": lambda r: (
        f"engagement {'down' if r['engagement_trend'] < 1 else 'up'} "
        f"{abs(1 - r['engagement_trend']) * 100:.0f}% vs the previous quarter"
    ),
    "nps_last": lambda r: f"last NPS answer {r['nps_last']:.0f} of 10",
    "nps_mean": lambda r: f"average NPS answer {r['nps_mean']:.1f} of 10",
    "nps_promoter": lambda r: "a promoter" if r["nps_promoter"] else "not a promoter",
    "nps_detractor": lambda r: "a detractor (NPS 0-6)" if r["nps_detractor"] else "no detractor",
    "csat_last": lambda r: f"last satisfaction score {r['csat_last']:.0f} of 5",
    "csat_mean": lambda r: f"average satisfaction score {r['csat_mean']:.1f} of 5",
    "season_order_share": lambda r: (
        f"{r['season_order_share'] * 100:.0f}% of their orders fall in the coming season"
    ),
    "spend_share_same_window_last_year": lambda r: (
        f"{r['spend_share_same_window_last_year'] * 100:.0f}% of last year's spend came "
        "in this season"
    ),
    "active_months_365d": lambda r: (
        f"bought in {_n(r['active_months_365d'])} of the last 12 months"
    ),
    "mean_basket_products": lambda r: f"{r['mean_basket_products']:.1f} products per order",
    "basket_size_trend": lambda r: (
        f"basket {'smaller' if r['basket_size_trend'] < 1 else 'larger'} by "
        f"{abs(1 - r['basket_size_trend']) * 100:.0f}% in the last quarter"
    ),
    "last_gap_days": lambda r: f"last gap between purchases {_n(r['last_gap_days'])} days",
    "max_gap_365d": lambda r: (
        f"longest gap between purchases this year {_n(r['max_gap_365d'])} days"
    ),
    "gap_cv": lambda r: f"irregular buyer (gaps vary {r['gap_cv']:.1f}x their usual gap)",
    "purchase_days_per_month": lambda r: f"buys on {r['purchase_days_per_month']:.1f} days a month",
    "days_since_return": lambda r: f"last return {_n(r['days_since_return'])} days ago",
    "mean_units_per_line": lambda r: f"{r['mean_units_per_line']:.1f} units per product bought",
    "mean_unit_price": lambda r: f"average unit price {_money(r['mean_unit_price'])}",
    "bgnbd_p_no_purchase": lambda r: (
        f"{r['bgnbd_p_no_purchase'] * 100:.0f}% chance of no purchase soon by their buying pattern"
    ),
    "bgnbd_expected_purchases": lambda r: (
        f"{r['bgnbd_expected_purchases']:.1f} purchases expected in the coming period"
    ),
    "clv_12m": lambda r: f"expected spend in the next 12 months {_money(r['clv_12m'])}",
    "online_order_share": lambda r: f"{r['online_order_share'] * 100:.0f}% of orders online",
    "home_country": lambda r: (
        "in the shop's main country" if r["home_country"] else "outside the shop's main country"
    ),
}

WINDOWED = re.compile(r"^(orders|spend)_(\d+)d$")
ENGAGEMENT = re.compile(r"^([a-z_]+?)_(\d+)d$")  # event family counts: visit_30d, ...
NO_RHYTHM = "only one purchase day so far, no buying rhythm yet"
MISSING = {
    **dict.fromkeys(
        ("overdue_ratio", "gap_mean_days", "gap_std_days", "gap_cv", "last_gap_days"), NO_RHYTHM
    ),
    "max_gap_365d": "no repeat purchase in the last 12 months",
    "days_since_return": "no returns so far",
    "basket_size_trend": "no basket-size trend yet",
    "home_country": "country unknown",
}


def phrase(feature: str, row: Row) -> str:
    """The sentence for one feature of one customer.

    >>> phrase("recency_days", {"recency_days": 143.0})
    'no purchase for 143 days'
    >>> phrase("spend_90d", {"spend_90d": 0.0})
    'spent 0.00 in the last 90 days'
    """
    value = row.get(feature)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING.get(feature, f"{feature.replace('_', ' ')} unknown")
    windowed = WINDOWED.match(feature)
    if windowed:
        kind, days = windowed.groups()
        if kind == "orders":
            return f"{_plural(value, 'order')} in the last {days} days"
        return f"spent {_money(value)} in the last {days} days"
    engaged = ENGAGEMENT.match(feature)
    if engaged and feature not in TEMPLATES:
        family, days = engaged.groups()
        return f"{_plural(value, family.replace('_', ' '))} in the last {days} days"
    return TEMPLATES[feature](row)


LABELS = {
    "recency_days": "days since the last purchase",
    "overdue_ratio": "overdue against their usual gap",
    "tenure_days": "time since the first purchase",
    "frequency": "number of orders",
    "purchase_days": "number of purchase days",
    "monetary": "lifetime spend",
    "mean_order_value": "average order value",
    "orders_trend": "orders trend vs the previous quarter",
    "spend_trend": "spend trend vs the previous quarter",
    "gap_mean_days": "usual gap between purchases",
    "gap_std_days": "irregular buying",
    "returned_value": "value of returns",
    "return_orders": "number of returns",
    "return_rate": "returns as a share of spend",
    "distinct_products": "product range bought",
    "orders_same_window_last_year": "orders in this season last year",
    "spend_same_window_last_year": "spend in this season last year",
    "days_since_engagement": "days since the last engagement",
    "engagement_trend": "engagement trend vs the previous quarter",
    "nps_last": "last NPS answer",
    "nps_mean": "average NPS answer",
    "nps_promoter": "NPS promoter",
    "nps_detractor": "NPS detractor",
    "csat_last": "last satisfaction score",
    "csat_mean": "average satisfaction score",
    "season_order_share": "share of orders in the coming season",
    "spend_share_same_window_last_year": "share of last year's spend in this season",
    "active_months_365d": "active months in the last year",
    "mean_basket_products": "products per order",
    "basket_size_trend": "basket size trend",
    "last_gap_days": "last gap between purchases",
    "max_gap_365d": "longest gap this year",
    "gap_cv": "irregular buying (relative)",
    "purchase_days_per_month": "purchase days per month",
    "days_since_return": "days since the last return",
    "mean_units_per_line": "units per product bought",
    "mean_unit_price": "average unit price",
    "bgnbd_p_no_purchase": "BG/NBD chance of no purchase",
    "bgnbd_expected_purchases": "BG/NBD expected purchases",
    "clv_12m": "expected 12-month value",
    "online_order_share": "share of orders placed online",
    "home_country": "in the shop's main country",
}


def label(feature: str) -> str:
    """A short name for a reason code, for tables and charts.

    >>> label("spend_180d")
    'spend in the last 180 days'
    """
    windowed = WINDOWED.match(feature) or ENGAGEMENT.match(feature)
    if windowed and feature not in LABELS:
        kind, days = windowed.groups()
        return f"{kind.replace('_', ' ')} in the last {days} days"
    return LABELS.get(feature, feature.replace("_", " "))


def has_phrase(feature: str) -> bool:
    """Whether :func:`phrase` and :func:`label` know ``feature``."""
    known = feature in TEMPLATES and feature in LABELS
    return known or (WINDOWED.match(feature) or ENGAGEMENT.match(feature)) is not None


def explain(contributions: pd.DataFrame, snapshot: pd.DataFrame, *, n: int) -> pd.DataFrame:
    """Codes ``reason_1..n`` and a sentence list ``top_reasons`` for each customer.

    Only features that push risk up count; a customer with fewer gets empty codes. A
    sentence two features share is said once. Each feature's sentences are made once per
    distinct value, not once per customer.
    """
    contrib = contributions.to_numpy()
    names = np.asarray(contributions.columns)
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :n]
    picked = np.take_along_axis(contrib, order, axis=1) > 0  # a prefix of each row
    codes = np.where(picked, names[order], "")
    said = np.full(order.shape, "", dtype=object)
    for j, feature in enumerate(names):
        where = picked & (order == j)
        if where.any():
            values = snapshot[feature].to_numpy()[where.nonzero()[0]]
            index, distinct = pd.factorize(values, use_na_sentinel=False)
            sentences = np.array([phrase(feature, {feature: v}) for v in distinct], dtype=object)
            said[where] = sentences[index]
    top = pd.Series(said[:, 0] if n else [""] * len(said), dtype=object)
    for k in range(1, n):
        repeat = (said[:, k] == "") | np.any(said[:, :k] == said[:, k : k + 1], axis=1)
        top = top.where(repeat, top + "; " + said[:, k])
    out = pd.DataFrame(
        codes, columns=[f"reason_{i + 1}" for i in range(n)], index=contributions.index
    )
    out["top_reasons"] = top.to_numpy()
    return out
