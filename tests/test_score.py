from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from churn import ChurnError
from churn.actions import (
    assign_actions,
    expected_value_saved,
    select_by_value,
    select_top_probability,
    value_bands,
    within_budget,
)
from churn.config import DuckDBSettings, ParamsError
from churn.reasons import explain, has_phrase, phrase
from churn.score import (
    _write_in_rank_order,
    report_paths,
    retention_columns,
    risk_deciles,
    risk_tiers,
)
from churn.train import feature_columns
from tests.conftest import ROOT, project_params, unsaved_model


def test_deciles_split_twenty_customers_two_per_decile():
    probability = np.linspace(0.0, 0.95, 20)
    deciles = risk_deciles(probability)
    assert deciles[-1] == 1
    assert deciles[0] == 10
    assert np.bincount(deciles)[1:].tolist() == [2] * 10


def test_tiers_use_highest_threshold_reached():
    tiers = risk_tiers(np.array([0.7, 0.69, 0.4, 0.39]), {"medium": 0.4, "high": 0.7})
    assert tiers.tolist() == ["high", "medium", "medium", "low"]


def test_reasons_are_sentences_from_the_customers_numbers():
    contributions = pd.DataFrame(
        {"recency_days": [0.9, -0.2], "overdue_ratio": [0.1, -0.1], "spend_trend": [0.5, -0.3]}
    )
    snapshot = pd.DataFrame(
        {"recency_days": [143, 2], "overdue_ratio": [3.2, 0.5], "spend_trend": [0.36, 1.5]}
    )
    out = explain(contributions, snapshot, n=2)
    assert out.loc[0, "top_reasons"] == (
        "no purchase for 143 days; spend down 64% vs the previous quarter"
    )
    assert out.loc[0, ["reason_1", "reason_2"]].tolist() == ["recency_days", "spend_trend"]
    assert out.loc[1, ["reason_1", "reason_2", "top_reasons"]].tolist() == ["", "", ""]


def test_a_sentence_two_reasons_share_is_said_once():
    contributions = pd.DataFrame({"gap_cv": [0.4, 0.4], "overdue_ratio": [0.3, 0.3]})
    snapshot = pd.DataFrame({"gap_cv": [np.nan, 2.0], "overdue_ratio": [np.nan, 1.5]})
    out = explain(contributions, snapshot, n=2)
    assert out["reason_1"].tolist() == ["gap_cv", "gap_cv"]
    assert out["top_reasons"].tolist() == [
        "only one purchase day so far, no buying rhythm yet",
        "irregular buyer (gaps vary 2.0x their usual gap); 1.5x their usual gap between purchases",
    ]


@pytest.mark.parametrize(
    ("feature", "row", "sentence"),
    [
        ("overdue_ratio", {"overdue_ratio": 3.24}, "3.2x their usual gap between purchases"),
        ("return_orders", {"return_orders": 2.0}, "2 returns so far"),
        ("orders_90d", {"orders_90d": 1.0}, "1 order in the last 90 days"),
        (
            "overdue_ratio",
            {"overdue_ratio": float("nan")},
            "only one purchase day so far, no buying rhythm yet",
        ),
    ],
    ids=["overdue", "returns", "window", "missing"],
)
def test_phrases(feature, row, sentence):
    assert phrase(feature, row) == sentence


def test_every_model_feature_has_a_phrase(pipeline):
    snapshot = pd.read_parquet(pipeline.settings.paths.features / "train.parquet")
    features = feature_columns(snapshot)
    assert [f for f in features if not has_phrase(f)] == []
    row = snapshot[features].iloc[0].to_dict()
    assert all(phrase(f, row) for f in features)


def _grid(settings):
    rows = [
        (s, t, v)
        for s in ("Champions", "Lost", "New")
        for t in ("high", "medium", "low")
        for v in ("high", "medium", "low")
    ]
    return pd.DataFrame(rows, columns=["rfm_segment", "risk_tier", "value_band"])


def test_default_rules_give_one_action_each(make_settings):
    settings = make_settings()
    grid = _grid(settings)
    actions = assign_actions(grid, settings.actions)
    assert (actions != "<NA>").all()
    looked_up = dict(
        zip(
            zip(grid.rfm_segment, grid.risk_tier, grid.value_band, strict=True),
            actions,
            strict=True,
        )
    )
    assert looked_up[("Champions", "high", "high")] == "vip_care_call"
    assert looked_up[("Champions", "low", "medium")] == "referral_invitation"
    assert looked_up[("Lost", "low", "low")] == "no_action"
    assert looked_up[("New", "medium", "low")] == "welcome_back"


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (lambda r: r[1:], r"without one, e.g. \[\('Champions', 'high', 'high'\)"),
        (
            lambda r: [*r, {"action": "no_action", "tiers": ["high"], "values": ["high"]}],
            r"with several, e.g. \[\(\('Champions', 'high', 'high'\), \['vip_care_call', "
            r"'no_action'\]",
        ),
        (lambda r: [{**r[0], "action": "free_car"}, *r[1:]], r"unknown action\(s\) \['free_car'\]"),
    ],
    ids=["gap", "overlap", "unknown"],
)
def test_rule_tables_with_gaps_or_overlaps_are_rejected(make_settings, rules, message):
    table = project_params()["actions"]["rules"]
    with pytest.raises(ParamsError, match=message):
        make_settings(actions={"rules": rules(table)})


def test_value_based_selection_beats_top_probability_by_hand(make_settings):
    settings = make_settings(
        actions={"catalogue": {"vip_care_call": {"label": "VIP", "cost": 10.0, "save_rate": 0.5}}}
    )
    frame = pd.DataFrame(
        {
            "customer_id": ["rich", "poor", "mid"],
            "churn_probability": [0.6, 0.99, 0.5],
            "value_at_risk": [600.0, 4.95, 50.0],
            "action": ["vip_care_call"] * 3,
        }
    )
    frame = expected_value_saved(frame, settings.actions)
    assert frame["expected_value_saved"].tolist() == pytest.approx([290.0, -7.525, 15.0])
    assert select_by_value(frame, budget=20).tolist() == [True, False, True]
    assert select_top_probability(frame, budget=20).tolist() == [True, True, False]


def _groups(*groups: tuple[int, float, float]) -> pd.DataFrame:
    """A campaign table from (customers, action cost, expected value saved) groups, in order."""
    rows = [(cost, saved) for n, cost, saved in groups for _ in range(n)]
    return pd.DataFrame(rows, columns=["action_cost", "expected_value_saved"])


def test_budget_an_action_no_longer_fits_goes_to_cheaper_ones_after_it():
    # Value per cost: calls 800/20 = 40, early notes 17.5/0.5 = 35, the dear call 660/20 = 33,
    # late notes 16/0.5 = 32. Calls and early notes spend 99 x 20 + 36 x 0.5 = 1998; the dear
    # call does not fit in the 2 left, the first 4 late notes do (listed first, so the
    # ranking, not the row order, decides).
    frame = _groups((43, 0.5, 15.5), (1, 20.0, 640.0), (36, 0.5, 17.0), (99, 20.0, 780.0))
    chosen = select_by_value(frame, budget=2000)
    assert chosen.tolist() == [True] * 4 + [False] * 39 + [False] + [True] * 36 + [True] * 99
    assert frame["action_cost"][chosen].sum() == 2000


def test_top_probability_skips_an_action_that_no_longer_fits():
    frame = pd.DataFrame(
        {
            "churn_probability": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            "action_cost": [20.0, 10.0, 0.0, 5.0, 0.5, 0.0],
        }
    )
    # 20 taken (5 left), 10 skipped, 0 is no action, 5 taken (0 left), 0.5 skipped.
    assert select_top_probability(frame, budget=25).tolist() == [
        True,
        False,
        False,
        True,
        False,
        False,
    ]


def _greedy_one_by_one(cost: np.ndarray, budget: float) -> list[bool]:
    taken, left = [], budget
    for c in cost:
        taken.append(bool(c <= left + 1e-9))
        left -= c if taken[-1] else 0.0
    return taken


@pytest.mark.parametrize("seed", range(20))
def test_within_budget_equals_a_customer_by_customer_pass(seed):
    rng = np.random.default_rng(seed)
    cost = rng.choice([0.0, 0.5, 1.0, 2.5, 8.0, 20.0], size=int(rng.integers(0, 60)))
    budget = float(rng.integers(0, 120)) / 2
    assert within_budget(cost, budget).tolist() == _greedy_one_by_one(cost, budget)


def test_an_ad_hoc_list_gets_its_reports_beside_it(make_settings, tmp_path, monkeypatch):
    paths = make_settings().paths
    pipeline = (paths.retention_list, paths.drift_report, paths.campaign_report)
    assert report_paths(None, paths) == pipeline
    assert report_paths(paths.retention_list, paths) == pipeline
    monkeypatch.chdir(tmp_path)  # the same file, spelled relative to the working folder
    assert report_paths(Path("data/scored/retention_list.csv"), paths) == pipeline
    assert report_paths(Path("adhoc/week 49.csv"), paths) == (
        Path("adhoc/week 49.csv"),
        Path("adhoc/week 49.drift.json"),
        Path("adhoc/week 49.campaign.json"),
    )


def test_value_bands_by_quantile():
    bands = value_bands(np.arange(10.0), {"high": 0.8, "medium": 0.5})
    assert bands.tolist() == ["low"] * 5 + ["medium"] * 3 + ["high"] * 2


def test_csv_columns_are_documented_in_readme_in_order():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The retention list", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.M)
    assert documented == retention_columns(3)


@pytest.fixture
def synthetic_pipeline(make_settings, tracking, tmp_path):
    """Ingest, features and train on 1,500 synthetic customers (BTYD fits skipped: fast)."""
    from churn import features, ingest, train
    from churn.synth import SynthSpec, generate

    raw = tmp_path / "raw"
    raw.mkdir()
    data = generate(SynthSpec(n_customers=1500, months=36, seed=5))
    data.transactions.to_parquet(raw / "transactions.parquet", index=False)
    names = ("customer_id", "ts", "order_id", "quantity", "unit_price", "product_id")
    settings = make_settings(
        data={
            "transactions": {
                "path": str(raw),
                "format": "parquet",
                "columns": {n: n for n in names} | dict.fromkeys(("amount", "channel", "country")),
            }
        },
        features={"btyd_fit_customers": 1},
        train={"max_rounds": 50},
    )
    ingest.run(settings.data, settings.paths)
    features.run(settings.features, settings.paths)
    train.run(settings.train, settings.mlflow, settings.paths, seed=settings.seed)
    return settings


@pytest.mark.slow
def test_the_list_is_written_in_rank_order_as_pandas_writes_csv(tmp_path):
    rows = pd.DataFrame(
        {
            "customer_id": ["a,1", 'say "hi"', "Müller", "two\nlines", "plain"],
            "churn_probability": [0.0001, 0.5, 0.25, 1.0, 0.1234],
            "risk_decile": [5, 1, 3, 2, 4],
            "monetary": [1234567.89, 0.0, -2.5, 1e-05, 12.0],
            "reason_1": ["x", None, "since 2011; 3 orders", "", "y"],
            "selected": [True, False, True, False, False],
            "_rank": [4, 0, 2, 1, 3],
        }
    )
    parts = tmp_path / "parts"
    parts.mkdir()
    rows.iloc[:3].to_parquet(parts / "000000.parquet", index=False)
    rows.iloc[3:].to_parquet(parts / "000001.parquet", index=False)
    target = tmp_path / "list.csv"
    _write_in_rank_order(parts, target, DuckDBSettings())
    expected = rows.sort_values("_rank").drop(columns="_rank")
    assert target.read_bytes() == expected.to_csv(index=False).encode("utf-8-sig")
    read = pd.read_csv(target, encoding="utf-8-sig", keep_default_na=False, na_values=[""])
    assert read["customer_id"].tolist() == ['say "hi"', "two\nlines", "Müller", "plain", "a,1"]


def test_scoring_writes_the_same_files_whatever_the_batch_size(synthetic_pipeline, tmp_path):
    import dataclasses
    import json

    from churn import score
    from churn.model import load_model

    settings = synthetic_pipeline
    model = load_model(str(settings.paths.model))
    snapshot_path = settings.paths.features / "score.parquet"
    spec = json.loads((settings.paths.features / "spec.json").read_text())

    def job(folder):
        return score.ScoreJob(
            out=tmp_path / folder / "list.csv",
            drift_report=tmp_path / folder / "drift.json",
            campaign_report=tmp_path / folder / "campaign.json",
            model_version="7",
            allow_drift=True,
        )

    common = {"drift": settings.drift, "actions": settings.actions, "campaign": settings.campaign}
    # One batch holding the whole snapshot, against 97-row batches: the snapshot is read in
    # many pieces, explained three at a time, and the last one is short.
    whole = score.run(
        snapshot_path,
        spec,
        model,
        job("whole"),
        settings=dataclasses.replace(settings.score, chunk_rows=10**9),
        **common,
    )
    batched = dataclasses.replace(settings.score, chunk_rows=97, num_threads=3)
    streamed = score.run(snapshot_path, spec, model, job("streamed"), settings=batched, **common)
    # One batch at a time, and the rank-order sort within a small DuckDB memory limit: the
    # same list.
    small = score.run(
        snapshot_path,
        spec,
        model,
        job("small"),
        settings=dataclasses.replace(batched, num_threads=1),
        memory=DuckDBSettings("16MB"),
        **common,
    )
    assert streamed == whole == small
    assert whole.customers > 300
    for folder in ("streamed", "small"):
        for name in ("list.csv", "drift.json", "campaign.json"):
            assert (tmp_path / folder / name).read_bytes() == (
                tmp_path / "whole" / name
            ).read_bytes()
    # The limit reaches the sort: one that is not a size is named.
    with pytest.raises(ChurnError, match=r"duckdb\.memory_limit: 'lots'"):
        score.run(
            snapshot_path,
            spec,
            model,
            job("bad"),
            settings=batched,
            memory=DuckDBSettings("lots"),
            **common,
        )


def test_a_feature_with_no_value_to_train_on_is_not_checked_for_drift(pipeline, tmp_path):
    import dataclasses
    import json

    from churn import score, train

    settings = pipeline.settings
    features = settings.paths.features
    # As on data starting less than a year before the newest training cutoff.
    snapshots = pd.read_parquet(features / "train.parquet")
    snapshots["orders_same_window_last_year"] = np.nan
    spec = json.loads((features / "spec.json").read_text())
    quick = dataclasses.replace(settings.train, n_trials=0, max_rounds=50)
    fitted = train.build_model(snapshots, quick, spec, seed=settings.seed)
    column = fitted.card.features.index("orders_same_window_last_year")
    assert fitted.booster.feature_importance("split")[column] == 0  # no tree can use it
    assert "orders_same_window_last_year" not in fitted.card.reference
    assert "orders_365d" in fitted.card.reference
    model = unsaved_model(fitted, tmp_path / "model")
    # The scoring snapshot has the column: every customer with a number in it.
    scoring = pd.read_parquet(features / "score.parquet")
    assert scoring["orders_same_window_last_year"].notna().all()
    job = score.ScoreJob(
        out=tmp_path / "list.csv",
        drift_report=tmp_path / "drift.json",
        campaign_report=tmp_path / "campaign.json",
        model_version="1",
    )
    score.run(
        features / "score.parquet",
        spec,
        model,
        job,
        settings=settings.score,
        drift=settings.drift,
        actions=settings.actions,
        campaign=settings.campaign,
    )
    drift = json.loads(job.drift_report.read_text())["columns"]
    assert "orders_same_window_last_year" not in drift
    assert "orders_365d" in drift
    assert len(pd.read_csv(job.out)) == len(scoring)
