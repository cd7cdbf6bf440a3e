"""Retention actions and the budget-aware choice of whom to contact.

Each customer gets exactly one action from the rule table in ``params.yaml`` (by RFM segment,
risk tier and value band). The expected value an action saves is
``value_at_risk x save_rate - cost``; :func:`select_by_value` spends the
budget where that is largest per unit of cost, skipping an action that no longer fits for
cheaper ones that do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from churn.config import LOW, ActionSettings


def value_bands(value: np.ndarray, bands: dict[str, float]) -> np.ndarray:
    """Band of each value by its quantile among all values: the highest band reached.

    >>> value_bands(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), {"high": 0.8, "medium": 0.5}).tolist()
    ['low', 'low', 'medium', 'medium', 'high']
    """
    quantile = pd.Series(value).rank(method="max", pct=True).to_numpy()
    ordered = sorted(bands.items(), key=lambda kv: -kv[1])
    # A value at or above the band's start quantile (strictly above for ties below it).
    return np.select([quantile > q for _, q in ordered], [n for n, _ in ordered], default=LOW)


def assign_actions(frame: pd.DataFrame, settings: ActionSettings) -> pd.Series:
    """The action of each customer (columns ``rfm_segment``, ``risk_tier``, ``value_band``)."""
    action = pd.Series(pd.NA, index=frame.index, dtype="object")
    for rule in settings.rules:
        hit = np.ones(len(frame), dtype=bool)
        for axis, column in (
            ("segments", "rfm_segment"),
            ("tiers", "risk_tier"),
            ("values", "value_band"),
        ):
            allowed = getattr(rule, axis)
            if "*" not in allowed:
                hit &= frame[column].isin(allowed).to_numpy()
        action[hit & action.isna().to_numpy()] = rule.action
    return action.astype(str)


def expected_value_saved(frame: pd.DataFrame, settings: ActionSettings) -> pd.DataFrame:
    """Add ``action_cost``, ``save_rate`` and net ``expected_value_saved`` per customer."""
    catalogue = settings.catalogue
    cost = frame["action"].map(lambda a: catalogue[a].cost).astype("float64")
    rate = frame["action"].map(lambda a: catalogue[a].save_rate).astype("float64")
    saved = frame["value_at_risk"] * rate - cost
    return frame.assign(action_cost=cost, save_rate=rate, expected_value_saved=saved)


_CENT_FRACTION = 1e-9  # sums of costs in cents are not exact in binary: 0.1 + 0.2 > 0.3


def within_budget(cost: np.ndarray, budget: float) -> np.ndarray:
    """Which of ``cost`` (in order of preference, each >= 0) a greedy pass takes: each whose
    cost fits in what is left of ``budget``; one that does not fit is skipped and the pass
    goes on to cheaper ones after it.

    Each round takes the longest run of affordable costs at once (a cumulative sum) and drops
    the first that no longer fits with every cost as large, so there are at most as many
    rounds as distinct costs (the action catalogue's) plus one.

    >>> within_budget(np.array([3.0, 5.0, 1.0, 2.0, 0.5]), 6.0).tolist()
    [True, False, True, True, False]
    """
    taken = np.zeros(len(cost), dtype=bool)
    left, start = float(budget), 0
    while True:
        affordable = start + np.flatnonzero(cost[start:] <= left + _CENT_FRACTION)
        spent = np.cumsum(cost[affordable])
        fits = int(np.searchsorted(spent, left + _CENT_FRACTION, side="right"))
        taken[affordable[:fits]] = True
        if fits == len(affordable):
            return taken
        left -= float(spent[fits - 1]) if fits else 0.0
        start = int(affordable[fits]) + 1


def select_by_value(frame: pd.DataFrame, budget: float) -> np.ndarray:
    """Customers to contact: positive net value, best value per unit cost first; one whose
    action does not fit in the budget left is skipped for cheaper ones further down.

    Free actions with positive value are always taken; ties break by customer order.
    """
    net = frame["expected_value_saved"].to_numpy()
    cost = frame["action_cost"].to_numpy()
    gross = net + cost
    ratio = np.where(cost > 0, gross / np.where(cost > 0, cost, 1), np.inf)
    order = np.lexsort((np.arange(len(frame)), -ratio))
    candidates = order[net[order] > 0]
    chosen = np.zeros(len(frame), dtype=bool)
    chosen[candidates[within_budget(cost[candidates], budget)]] = True
    return chosen


def select_top_probability(frame: pd.DataFrame, budget: float) -> np.ndarray:
    """The naive list: riskiest customers first, each with their action, within the budget;
    one whose action does not fit in what is left is skipped for cheaper ones further down."""
    cost = frame["action_cost"].to_numpy()
    order = np.lexsort((np.arange(len(frame)), -frame["churn_probability"].to_numpy()))
    acting = order[cost[order] > 0]
    chosen = np.zeros(len(frame), dtype=bool)
    chosen[acting[within_budget(cost[acting], budget)]] = True
    return chosen


def campaign_summary(
    frame: pd.DataFrame, selected: np.ndarray, naive: np.ndarray, budget: float
) -> dict[str, Any]:
    """Spend and expected value saved of the value-based and the naive selection."""

    def _summary(mask: np.ndarray) -> dict[str, Any]:
        chosen = frame[mask]
        per_action = chosen.groupby("action").agg(
            customers=("customer_id", "size"),
            spend=("action_cost", "sum"),
            expected_value_saved=("expected_value_saved", "sum"),
        )
        return {
            "customers": int(mask.sum()),
            "spend": round(float(chosen["action_cost"].sum()), 2),
            "expected_value_saved": round(float(chosen["expected_value_saved"].sum()), 2),
            "by_action": {
                a: {k: round(float(v), 2) if k != "customers" else int(v) for k, v in row.items()}
                for a, row in per_action.to_dict("index").items()
            },
        }

    value, top = _summary(selected), _summary(naive)
    return {
        "budget": budget,
        "value_based": value,
        "top_probability": top,
        "extra_value_saved": round(value["expected_value_saved"] - top["expected_value_saved"], 2),
    }
