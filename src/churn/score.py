"""Score stage: every customer active at the as-of date, ranked by churn risk.

Columns of the retention list, in order: see :data:`RETENTION_COLUMNS` and the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from churn.config import FeatureSettings, ScoreSettings
from churn.features import customer_features, snapshot_frame, with_day
from churn.io import InputError, connect, write_csv
from churn.model import ChurnModel

RETENTION_COLUMNS = (
    "customer_id",
    "as_of",
    "churn_probability",
    "risk_decile",
    "risk_tier",
    "rfm_segment",
    "recency_days",
    "frequency",
    "monetary",
    "top_reasons",
    "model_version",
)


@dataclass(frozen=True)
class ScoreSummary:
    customers: int
    as_of: str
    by_tier: dict[str, int]


def risk_deciles(probability: np.ndarray) -> np.ndarray:
    """Decile of each probability, 1 = riskiest tenth; ties broken by position.

    >>> risk_deciles(np.array([0.1, 0.9, 0.5, 0.3, 0.7])).tolist()
    [9, 1, 5, 7, 3]
    """
    order = np.argsort(-probability, kind="stable")
    ranks = np.empty(len(probability), dtype="int64")
    ranks[order] = np.arange(len(probability))
    return ranks * 10 // max(len(probability), 1) + 1


def risk_tiers(probability: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """Name each probability's tier: the highest threshold it reaches, else ``low``.

    >>> risk_tiers(np.array([0.8, 0.5, 0.1]), {"high": 0.7, "medium": 0.4}).tolist()
    ['high', 'medium', 'low']
    """
    ordered = sorted(thresholds.items(), key=lambda kv: -kv[1])
    return np.select([probability >= t for _, t in ordered], [n for n, _ in ordered], default="low")


def top_reasons(contributions: pd.DataFrame, values: pd.DataFrame, *, n: int) -> pd.Series:
    """The ``n`` features raising each customer's risk most, as ``name=value`` joined by ``; ``.

    Only positive contributions count: a customer with none gets an empty string.
    """
    contrib = contributions.to_numpy()
    names = np.asarray(contributions.columns)
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :n]
    reasons = []
    for row, idx in enumerate(order):
        parts = [
            f"{names[j]}={_fmt(values.iat[row, values.columns.get_loc(names[j])])}"
            for j in idx
            if contrib[row, j] > 0
        ]
        reasons.append("; ".join(parts))
    return pd.Series(reasons, index=contributions.index)


def retention_list(
    snapshot: pd.DataFrame,
    model: ChurnModel,
    settings: ScoreSettings,
    *,
    as_of: date,
    model_version: str,
) -> pd.DataFrame:
    """Score a snapshot into the retention list, riskiest first."""
    probability = model.predict_proba(snapshot)
    contributions = model.contributions(snapshot)
    out = pd.DataFrame(
        {
            "customer_id": snapshot["customer_id"].to_numpy(),
            "as_of": as_of.isoformat(),
            "churn_probability": np.round(probability, 4),
            "risk_decile": risk_deciles(probability),
            "risk_tier": risk_tiers(probability, settings.risk_tiers),
            "rfm_segment": snapshot["rfm_segment"].to_numpy(),
            "recency_days": snapshot["recency_days"].to_numpy(),
            "frequency": snapshot["frequency"].to_numpy(),
            "monetary": np.round(snapshot["monetary"].to_numpy(dtype="float64"), 2),
            "top_reasons": top_reasons(contributions, snapshot, n=settings.n_reasons).to_numpy(),
            "model_version": model_version,
        }
    )
    return out.sort_values(
        ["risk_decile", "churn_probability", "customer_id"],
        ascending=[True, False, True],
        kind="stable",
    ).reset_index(drop=True)


def scoring_snapshot(transactions: Path, as_of: date, settings: FeatureSettings) -> pd.DataFrame:
    """Features of every customer active at ``as_of`` from a canonical transaction file."""
    if not transactions.is_file():
        raise InputError(
            f"{transactions}: transaction file not found (expected the Parquet "
            "file `churn ingest` writes)"
        )
    tx = with_day(connect().read_parquet(transactions))
    return snapshot_frame(customer_features(tx, as_of, settings))


def run(
    snapshot: pd.DataFrame,
    model: ChurnModel,
    settings: ScoreSettings,
    out: Path,
    *,
    model_version: str,
) -> ScoreSummary:
    """Score ``snapshot`` (one cutoff) and write the retention list to ``out``."""
    if snapshot.empty:
        raise InputError("no customer is active at the as-of date: nothing to score")
    as_of = snapshot["cutoff"].iloc[0]
    table = retention_list(snapshot, model, settings, as_of=as_of, model_version=model_version)
    write_csv(table[list(RETENTION_COLUMNS)], out)
    return ScoreSummary(
        customers=len(table),
        as_of=as_of.isoformat(),
        by_tier=table["risk_tier"].value_counts().to_dict(),
    )


def _fmt(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "NaN" if np.isnan(value) else f"{value:.4g}"
    return str(value)
