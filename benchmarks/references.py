"""Yardsticks the features stage is measured against, written the straightforward way.

* :func:`pandas_snapshots`: the features stage's feature set and labels, one pandas pass per
  cutoff over the canonical transactions held in memory (the way a notebook does it).
* :func:`lifetimes_summary`: ``lifetimes.utils.summary_data_from_transaction_data`` (daily
  frequency, with monetary value) re-implemented step by step as lifetimes does it, so the
  benchmark needs no lifetimes install.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd

from churn.config import FeatureSettings
from churn.features import TREND_DAYS, btyd_features, day_number, rfm_scores

COLUMNS = ["customer_id", "ts", "order_id", "amount", "quantity", "product_id", "is_return"]


def load_transactions(path: str) -> pd.DataFrame:
    """The canonical transactions with ``day`` (days since the epoch), all in memory."""
    tx = pd.read_parquet(path, columns=COLUMNS)
    tx["day"] = tx["ts"].astype("datetime64[s]").astype("int64") // 86_400
    return tx


def _orders(tx: pd.DataFrame, c: int) -> pd.DataFrame:
    lines = tx[(tx["day"] < c) & ~tx["is_return"]]
    counted = lines["quantity"] > 0
    lines = lines.assign(
        units=lines["quantity"].where(counted),
        unit_price=(lines["amount"] / lines["quantity"]).where(counted),
    )
    orders = lines.groupby(["customer_id", "order_id"], sort=False).agg(
        day=("day", "min"),
        value=("amount", "sum"),
        products=("product_id", "count"),
        lines=("units", "count"),
        units=("units", "sum"),
        unit_prices=("unit_price", "sum"),
    )
    return orders[orders["value"] > 0].reset_index()


def _order_features(orders: pd.DataFrame, c: int, settings: FeatureSettings) -> pd.DataFrame:
    o = orders.assign(
        recent=orders["day"] >= c - TREND_DAYS,
        previous=(orders["day"] >= c - 2 * TREND_DAYS) & (orders["day"] < c - TREND_DAYS),
        last_year=(orders["day"] >= c - 365)
        & (orders["day"] < min(c - 365 + settings.horizon_days, c)),
        year=orders["day"] >= c - 365,
        in_season=((orders["day"] - c) % 365) < settings.horizon_days,
        month=(c - orders["day"]) // 30,
    )
    for w in settings.windows_days:
        o[f"in_{w}"] = o["day"] >= c - w
        o[f"spend_{w}d"] = o["value"].where(o[f"in_{w}"], 0.0)
    for flag in ("recent", "previous", "last_year", "year"):
        o[f"value_{flag}"] = o["value"].where(o[flag], 0.0)
    o["products_recent"] = o["products"].where(o["recent"])
    o["products_before"] = o["products"].where(~o["recent"])
    o["month_in_year"] = o["month"].where(o["year"])
    g = o.groupby("customer_id", sort=False)
    out = pd.DataFrame(
        {
            "recency_days": c - g["day"].max(),
            "tenure_days": c - g["day"].min(),
            "frequency": g.size(),
            "purchase_days": g["day"].nunique(),
            "monetary": g["value"].sum(),
            "mean_order_value": g["value"].mean(),
            "orders_same_window_last_year": g["last_year"].sum(),
            "spend_same_window_last_year": g["value_last_year"].sum(),
            "season_order_share": g["in_season"].mean(),
            "active_months_365d": g["month_in_year"].nunique(),
            "mean_basket_products": g["products"].mean(),
        }
    )
    for w in settings.windows_days:
        out[f"orders_{w}d"] = g[f"in_{w}"].sum()
        out[f"spend_{w}d"] = g[f"spend_{w}d"].sum()
    out["orders_trend"] = (g["recent"].sum() + 1) / (g["previous"].sum() + 1)
    out["spend_trend"] = (g["value_recent"].sum() + 1) / (g["value_previous"].sum() + 1)
    out["spend_share_same_window_last_year"] = out["spend_same_window_last_year"] / np.maximum(
        g["value_year"].sum(), 1.0
    )
    out["basket_size_trend"] = g["products_recent"].mean() / g["products_before"].mean()
    lines = g["lines"].sum().replace(0, np.nan)
    out["mean_units_per_line"] = g["units"].sum() / lines
    out["mean_unit_price"] = g["unit_prices"].sum() / lines
    return out


def _gap_features(orders: pd.DataFrame, c: int) -> pd.DataFrame:
    days = orders[["customer_id", "day"]].drop_duplicates().sort_values(["customer_id", "day"])
    days["gap"] = days.groupby("customer_id", sort=False)["day"].diff()
    gaps = days.dropna(subset=["gap"])
    gaps = gaps.assign(gap_365=gaps["gap"].where(gaps["day"] >= c - 365))
    g = gaps.groupby("customer_id", sort=False)
    return pd.DataFrame(
        {
            "gap_mean_days": g["gap"].mean(),
            "gap_std_days": g["gap"].std(ddof=0),
            "last_gap_days": g["gap"].last(),
            "max_gap_365d": g["gap_365"].max(),
        }
    )


def _line_features(tx: pd.DataFrame, c: int) -> pd.DataFrame:
    lines = tx[tx["day"] < c]
    returned = lines["is_return"]
    lines = lines.assign(
        returned_value=(-lines["amount"]).where(returned, 0.0),
        return_order=lines["order_id"].where(returned),
        return_day=lines["day"].where(returned),
        kept_product=lines["product_id"].where(~returned),
    )
    g = lines.groupby("customer_id", sort=False)
    return pd.DataFrame(
        {
            "returned_value": g["returned_value"].sum(),
            "return_orders": g["return_order"].nunique(),
            "days_since_return": c - g["return_day"].max(),
            "distinct_products": g["kept_product"].nunique(),
        }
    )


def customer_frame(tx: pd.DataFrame, cutoff: date, settings: FeatureSettings) -> pd.DataFrame:
    """Row-level features of every customer active at ``cutoff`` (before RFM and BTYD)."""
    c = day_number(cutoff)
    orders = _orders(tx, c)
    base = _order_features(orders, c, settings)
    base = base[base["recency_days"] <= settings.active_lookback_days]
    out = base.join(_gap_features(orders, c)).join(_line_features(tx, c))
    out["overdue_ratio"] = out["recency_days"] / out["gap_mean_days"]
    out["gap_cv"] = out["gap_std_days"] / out["gap_mean_days"]
    out["purchase_days_per_month"] = out["purchase_days"] / (
        np.maximum(out["tenure_days"], 30) / 30.4
    )
    out["return_rate"] = out["returned_value"] / out["monetary"]
    out["cutoff"] = cutoff
    return out.reset_index()


def churn_labels(tx: pd.DataFrame, cutoff: date, horizon_days: int) -> pd.Series:
    """``churned`` per customer id: 0 when they bought in ``[cutoff, cutoff + horizon)``."""
    c = day_number(cutoff)
    future = tx[(tx["day"] >= c) & (tx["day"] < c + horizon_days) & ~tx["is_return"]]
    return pd.Index(future.loc[future["amount"] > 0, "customer_id"].unique())


def pandas_snapshots(
    tx: pd.DataFrame,
    cutoffs: list[date],
    labelled: int,
    settings: FeatureSettings,
    *,
    snapshot_level: bool = True,
) -> list[pd.DataFrame]:
    """Snapshots at ``cutoffs``; the first ``labelled`` get ``churned``. With
    ``snapshot_level`` the RFM scores and BTYD columns are added the way the features stage
    adds them (the same pandas/numpy code: it is not what the comparison is about)."""
    frames = []
    for k, cutoff in enumerate(cutoffs):
        frame = customer_frame(tx, cutoff, settings)
        if k < labelled:
            bought = churn_labels(tx, cutoff, settings.horizon_days)
            frame["churned"] = (~frame["customer_id"].isin(bought)).astype("int8")
        if snapshot_level:
            frame = rfm_scores(frame)
            frame = frame.join(btyd_features(frame, settings, cutoff)[0])
        frames.append(frame)
    return frames


def lifetimes_summary(
    transactions: pd.DataFrame,
    customer_id_col: str,
    datetime_col: str,
    monetary_value_col: str,
    observation_period_end: pd.Timestamp,
) -> pd.DataFrame:
    """``frequency``, ``recency``, ``T`` and ``monetary_value`` per customer, in days, as
    ``lifetimes.utils.summary_data_from_transaction_data(..., freq="D")`` computes them."""
    observation_period_end = pd.Timestamp(observation_period_end).to_period("D").to_timestamp()
    # lifetimes.utils._find_first_transactions
    select = [customer_id_col, datetime_col, monetary_value_col]
    tx = transactions[select].sort_values(select).copy()
    tx[datetime_col] = pd.to_datetime(tx[datetime_col])
    tx = tx.set_index(datetime_col).to_period("D").to_timestamp()
    tx = tx.loc[tx.index <= observation_period_end].reset_index()
    period = tx.groupby([datetime_col, customer_id_col], sort=False, as_index=False).sum()
    period = period.set_index(datetime_col).to_period("D").to_timestamp().reset_index()
    period["first"] = False
    first = period.groupby(customer_id_col, sort=True, as_index=False).head(1).index
    period.loc[first, "first"] = True
    period[datetime_col] = pd.Index(period[datetime_col]).to_period("D")
    repeated = period[[*select, "first"]].copy()
    # lifetimes.utils.summary_data_from_transaction_data
    repeated[datetime_col] = pd.Index(repeated[datetime_col]).to_timestamp()
    customers = repeated.groupby(customer_id_col, sort=False)[datetime_col].agg(
        ["min", "max", "count"]
    )
    customers["frequency"] = customers["count"] - 1
    day = np.timedelta64(1, "D")
    customers["T"] = (observation_period_end - customers["min"]) / day
    customers["recency"] = (customers["max"] - customers["min"]) / day
    repeated.loc[repeated[repeated["first"]].index, monetary_value_col] = np.nan
    customers["monetary_value"] = (
        repeated.groupby(customer_id_col)[monetary_value_col].mean().fillna(0)
    )
    return customers[["frequency", "recency", "T", "monetary_value"]].astype(float)
