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
    "r_score": lambda r: f"recency score {r['r_score']:.0f} of 5",
    "f_score": lambda r: f"frequency score {r['f_score']:.0f} of 5",
    "m_score": lambda r: f"spend score {r['m_score']:.0f} of 5",
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
    "online_order_share": lambda r: f"{r['online_order_share'] * 100:.0f}% of orders online",
}

WINDOWED = re.compile(r"^(orders|spend)_(\d+)d$")
ENGAGEMENT = re.compile(r"^([a-z_]+?)_(\d+)d$")  # event family counts: visit_30d, ...
NO_RHYTHM = "only one purchase day so far, no buying rhythm yet"
MISSING = {"overdue_ratio": NO_RHYTHM, "gap_mean_days": NO_RHYTHM, "gap_std_days": NO_RHYTHM}


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
    "r_score": "recency score",
    "f_score": "frequency score",
    "m_score": "spend score",
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
    "online_order_share": "share of orders placed online",
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

    Only features that push risk up count; a customer with fewer gets empty codes.
    """
    contrib = contributions.to_numpy()
    names = np.asarray(contributions.columns)
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :n]
    values = snapshot[list(names)].to_dict("records")
    codes, sentences = [], []
    for row, idx in enumerate(order):
        picked = [names[j] for j in idx if contrib[row, j] > 0]
        codes.append(picked + [""] * (n - len(picked)))
        said = dict.fromkeys(phrase(f, values[row]) for f in picked)  # one sentence once
        sentences.append("; ".join(said))
    out = pd.DataFrame(
        codes, columns=[f"reason_{i + 1}" for i in range(n)], index=contributions.index
    )
    out["top_reasons"] = sentences
    return out
