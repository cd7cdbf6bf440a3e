"""The marketer report: its tables, and the page as a real browser renders it."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from churn.report import reason_counts, segment_table
from tests.conftest import merge

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def test_segment_table_and_reason_counts_by_hand():
    retention = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c"],
            "rfm_segment": ["Lost", "Loyal", "Lost"],
            "churn_probability": [0.9, 0.2, 0.7],
            "value_at_risk": [9.0, 20.0, 14.0],
            "reason_1": ["recency_days", "spend_90d", "recency_days"],
            "reason_2": ["spend_90d", "", "frequency"],
            "reason_3": ["", "", ""],
        }
    )
    segments = segment_table(retention)
    assert segments["rfm_segment"].tolist() == ["Lost", "Loyal"]
    assert segments["customers"].tolist() == [2, 1]
    assert segments["mean_churn_probability"].tolist() == pytest.approx([0.8, 0.2])
    assert segments["value_at_risk"].tolist() == [23.0, 20.0]
    counts = reason_counts(retention)
    assert dict(zip(counts["code"], counts["customers"], strict=True)) == {
        "recency_days": 2,
        "spend_90d": 2,
        "frequency": 1,
    }
    assert counts["reason"].iloc[0] in {"days since the last purchase", "spend in the last 90 days"}


def _browser(url: str, *args: str, user_dir: Path) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        if os.environ.get("CHURN_REQUIRE_CHROMIUM"):
            pytest.fail("CHURN_REQUIRE_CHROMIUM is set but no chromium is on PATH")
        pytest.skip("headless Chromium not installed (Debian package `chromium`)")
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def console_messages(stderr: str) -> list[str]:
    """Lines Chromium logs for the page's console (errors, warnings, logs)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


def test_console_check_sees_a_page_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); missing();</script></body>")
    done = _browser(page.as_uri(), "--dump-dom", user_dir=tmp_path / "profile")
    assert any("boom" in line for line in console_messages(done.stderr))


@pytest.fixture(scope="module")
def report(pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    shared = {
        k: str(getattr(pipeline.settings.paths, k))
        for k in ("features", "model", "model_info", "metrics", "plots")
    }
    params = merge(
        yaml.safe_load((pipeline.root / "params.yaml").read_text()),
        {
            "paths": {
                **shared,
                "retention_list": str(folder / "retention_list.csv"),
                "campaign_report": str(folder / "campaign.json"),
                "drift_report": str(folder / "drift.json"),
                "report": str(folder / "retention_report.html"),
            }
        },
    )
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": pipeline.tracking_uri}
    for command in ("score", "report"):
        done = subprocess.run(
            [sys.executable, "-m", "churn", "--params", str(folder / "params.yaml"), command],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.slow
def test_report_renders_in_chromium_with_headline_figures(report, tmp_path):
    page = report / "retention_report.html"
    html = page.read_text()
    assert "http://" not in html
    assert "https://" not in html
    done = _browser(page.as_uri(), "--dump-dom", user_dir=tmp_path / "profile")
    assert done.returncode == 0, done.stderr
    assert console_messages(done.stderr) == []
    retention = pd.read_csv(report / "retention_list.csv", encoding="utf-8-sig")
    figure = re.search(r'id="customers">([\d,]+)<', done.stdout)
    assert figure
    assert figure.group(1) == f"{len(retention):,}"
    high = re.search(r'id="high-risk">([\d,]+)<', done.stdout)
    assert high
    assert high.group(1) == f"{(retention['risk_tier'] == 'high').sum():,}"
    at_risk = re.search(r'id="value-at-risk">([\d,]+)<', done.stdout)
    assert at_risk
    assert at_risk.group(1) == f"{retention['value_at_risk'].sum():,.0f}"
    rows = re.findall(r"<tr>", done.stdout.split('id="selected"', 1)[1])
    assert len(rows) == 1 + min(100, int(retention["selected"].sum()))
    shot = report / "retention_report.png"
    taken = _browser(
        page.as_uri(),
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        user_dir=tmp_path / "profile2",
    )
    assert taken.returncode == 0, taken.stderr
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert (width, height) == (1280, 2400)
    assert shot.stat().st_size > 50_000  # charts and tables, not a blank page
