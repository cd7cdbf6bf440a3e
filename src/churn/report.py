"""Report stage: one self-contained HTML page for the marketing team.

Everything the page shows comes from files earlier stages wrote (the retention list, metrics,
campaign summary, gains curve); charts are drawn with matplotlib and embedded as PNG data, so
the page needs no network when it is opened.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import pandas as pd

from churn.config import Paths
from churn.io import atomic_text
from churn.reasons import label

matplotlib.use("Agg")  # a file renderer: no display on servers or in CI
import matplotlib.pyplot as plt

TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("churn", "templates"), autoescape=True
).get_template("retention_report.html")


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    customers: int
    value_at_risk: float


def headline(
    retention: pd.DataFrame, metrics: dict[str, Any], campaign: dict[str, Any]
) -> dict[str, Any]:
    """The figures at the top of the page."""
    high = retention["risk_tier"] == "high"
    return {
        "as_of": str(retention["as_of"].iloc[0]),
        "customers": len(retention),
        "high_risk": int(high.sum()),
        "value_at_risk": float(retention["value_at_risk"].sum()),
        "high_risk_value_at_risk": float(retention.loc[high, "value_at_risk"].sum()),
        "selected": campaign["value_based"]["customers"],
        "budget": campaign["budget"],
        "expected_value_saved": campaign["value_based"]["expected_value_saved"],
        "naive_value_saved": campaign["top_probability"]["expected_value_saved"],
        "model_auc": metrics["model"]["roc_auc"],
        "recency_auc": metrics["baselines"]["recency"]["roc_auc"],
        "horizon_days": metrics["horizon_days"],
    }


def segment_table(retention: pd.DataFrame) -> pd.DataFrame:
    """Customers, mean churn probability and value at risk per RFM segment, largest first."""
    table = retention.groupby("rfm_segment").agg(
        customers=("customer_id", "size"),
        mean_churn_probability=("churn_probability", "mean"),
        value_at_risk=("value_at_risk", "sum"),
    )
    return table.sort_values("value_at_risk", ascending=False).reset_index()


def reason_counts(retention: pd.DataFrame, *, top: int = 10) -> pd.DataFrame:
    """How often each reason code is the strongest, second or third reason."""
    codes = retention.filter(regex=r"^reason_\d+$").stack()
    codes = codes[codes.astype(str).str.len() > 0]
    counts = codes.value_counts().head(top)
    return pd.DataFrame(
        {
            "reason": [label(c) for c in counts.index],
            "code": counts.index,
            "customers": counts.to_numpy(),
        }
    )


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def plot_segments(segments: pd.DataFrame) -> str:
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.barh(segments["rfm_segment"], segments["value_at_risk"], color="#c0392b")
    axis.invert_yaxis()
    axis.set_xlabel("value at risk")
    return _png(figure)


def plot_risk_distribution(retention: pd.DataFrame) -> str:
    figure, axis = plt.subplots(figsize=(7, 3))
    axis.hist(retention["churn_probability"], bins=20, range=(0, 1), color="#2c7fb8")
    axis.set_xlabel("churn probability")
    axis.set_ylabel("customers")
    return _png(figure)


def plot_gains(gains: pd.DataFrame) -> str:
    figure, axis = plt.subplots(figsize=(7, 3.6))
    axis.plot(gains["targeted"], gains["model"], label="churn model", color="#c0392b")
    axis.plot(gains["targeted"], gains["recency"], label="recency baseline", color="#7f8c8d")
    axis.plot([0, 1], [0, 1], ":", label="random", color="#bdc3c7")
    axis.set_xlabel("share of customers contacted, riskiest first")
    axis.set_ylabel("share of churners reached")
    axis.legend(loc="lower right")
    return _png(figure)


def render(
    retention: pd.DataFrame, metrics: dict[str, Any], campaign: dict[str, Any], gains: pd.DataFrame
) -> str:
    """The report page as one HTML string."""
    segments = segment_table(retention)
    selected = (
        retention[retention["selected"]]
        .sort_values("expected_value_saved", ascending=False, kind="stable")
        .head(100)
    )
    return TEMPLATE.render(
        head=headline(retention, metrics, campaign),
        segments=segments.to_dict("records"),
        reasons=reason_counts(retention).to_dict("records"),
        campaign=campaign,
        selected=selected.to_dict("records"),
        charts={
            "segments": plot_segments(segments),
            "risk": plot_risk_distribution(retention),
            "gains": plot_gains(gains),
        },
    )


def run(paths: Paths) -> ReportSummary:
    """Read the scored list and the reports, write ``retention_report.html``."""
    retention = pd.read_csv(
        paths.retention_list,
        encoding="utf-8-sig",
        dtype={"customer_id": str},
        keep_default_na=False,
        na_values={"churn_probability": [""]},
    )
    metrics = json.loads(paths.metrics.read_text())
    campaign = json.loads(paths.campaign_report.read_text())
    gains = pd.read_csv(paths.plots / "gains.csv")
    html = render(retention, metrics, campaign, gains)
    with atomic_text(paths.report) as stream:
        stream.write(html)
    return ReportSummary(
        path=paths.report,
        customers=len(retention),
        value_at_risk=float(retention["value_at_risk"].sum()),
    )
