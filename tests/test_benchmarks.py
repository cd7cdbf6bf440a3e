"""The benchmark's references and report (``benchmarks/``), on hand-made numbers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from benchmarks.references import lifetimes_summary
from benchmarks.run import PIPELINE, main, size_figures, targets


def test_lifetimes_summary_counts_repeat_days_after_the_first():
    tx = pd.DataFrame(
        {
            "customer_id": ["A", "A", "A", "A", "B", "A"],
            "ts": pd.to_datetime(
                [
                    "2024-01-01 09:00",
                    "2024-01-01 17:00",  # same day as the first: one purchase day of 15
                    "2024-01-04 12:00",
                    "2024-01-10 08:00",
                    "2024-01-03 10:00",
                    "2024-01-12 10:00",  # after the observation end: left out
                ]
            ),
            "amount": [10.0, 5.0, 20.0, 30.0, 7.0, 100.0],
        }
    )
    out = lifetimes_summary(tx, "customer_id", "ts", "amount", pd.Timestamp("2024-01-10"))
    assert out.loc["A"].tolist() == [2.0, 9.0, 9.0, 25.0]  # frequency, recency, T, monetary
    assert out.loc["B"].tolist() == [0.0, 0.0, 7.0, 0.0]


def _medians(features_s: float, pandas_s: float, per_s_customers: int) -> dict:
    step = {"seconds": 1.0, "wall_s": 2.0, "peak_rss_mb": 100.0}
    med = {s: dict(step) for s in PIPELINE}
    med["features"] = {"seconds": features_s, "wall_s": features_s + 1, "peak_rss_mb": 900.0}
    med["inference"] = {
        "seconds": 0.5,
        "first_seconds": 3.0,
        "customers": per_s_customers / 2,
        "peak_rss_mb": 1.0,
    }
    for name in ("features_rowlevel", "pandas_ref_rowlevel", "lifetimes_ref"):
        med[name] = {"seconds": 2.0, "peak_rss_mb": 1.0}
    med["pandas_ref"] = {"seconds": pandas_s, "peak_rss_mb": 1.0}
    return med


def test_size_figures_and_targets():
    figures = size_figures(_medians(4.0, 30.0, 600_000), {"rows": 10_000_000, "customers": 1})
    assert figures["speedup_vs_pandas"] == pytest.approx(7.5)
    assert figures["pipeline_s"] == pytest.approx(2 + 5 + 2 + 2)
    assert figures["pipeline_peak_rss_mb"] == 900.0
    assert figures["features_rows_per_s"] == pytest.approx(2_500_000)
    assert figures["score_customers_per_s"] == pytest.approx(600_000)
    assert figures["score_first_call_s"] == 3.0
    slow = size_figures(_medians(12.0, 30.0, 100_000), {"rows": 1_000_000, "customers": 1})
    checks = targets({"10000000": figures, "1000000": slow})
    assert checks["10m_features_s"] == {"value": 4.0, "target": "<= 10", "pass": True}
    assert checks["10m_speedup_vs_pandas"]["pass"]
    assert checks["10000000_score_customers_per_s"]["pass"]
    assert not checks["1000000_score_customers_per_s"]["pass"]


def test_a_size_without_references_has_the_pipeline_figures_only():
    med = _medians(700.0, 0.0, 1_000_000)
    for name in ("features_rowlevel", "pandas_ref", "pandas_ref_rowlevel", "lifetimes_ref"):
        del med[name]
    figures = size_figures(med, {"rows": 100_000_000, "customers": 1})
    assert figures["pipeline_s"] == pytest.approx(2 + 701 + 2 + 2)
    assert figures["score_customers_per_s"] == pytest.approx(1_000_000)
    assert "speedup_vs_pandas" not in figures
    checks = targets({"100000000": figures})
    assert not checks["100m_pipeline_s"]["pass"]
    assert checks["100m_pipeline_peak_rss_mb"]["pass"]


def test_a_failed_step_keeps_the_figures_of_the_steps_before_it(tmp_path):
    # 60 synthetic lines: ingest and features run, but every validation customer churns,
    # so training stops with an error naming the snapshot.
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match=r"60 rows: benchmark step train failed"):
        main(["--sizes", "60", "--repeats", "1", "--out", str(out), "--scratch", str(tmp_path)])
    figures = json.loads(out.read_text())["sizes"]["60"]
    assert figures["failed"].startswith("benchmark step train failed (exit 1)")
    assert set(figures) >= {"ingest_s", "ingest_peak_rss_mb", "features_s", "features_wall_s"}
    assert not {"train_s", "score_s"} & set(figures)
    assert "all churned; a model needs both" in out.with_suffix(".log").read_text()
    assert targets({"60": figures, "10000000": figures}) == {}
