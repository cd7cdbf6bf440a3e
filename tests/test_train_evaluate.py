"""Train and evaluate on the bundled data, with a real MLflow store and real LightGBM."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from churn import ChurnError, evaluate, features, train
from churn.config import GateSettings, TrainSettings
from churn.evaluate import gate_decision
from churn.features import LABEL
from churn.model import load_model, usable_cpus
from tests.conftest import snapshot_aucs


def test_metrics_json_shape_and_model_beats_recency(pipeline):
    metrics = json.loads(pipeline.settings.paths.metrics.read_text())
    keys = {"roc_auc", "pr_auc", "brier", "log_loss", "lift_at_10", "capture_at_20"}
    assert metrics["test_cutoff"] == "2011-09-11"
    assert metrics["horizon_days"] == 90
    assert metrics["n_customers"] > 4000
    assert 0 < metrics["churn_rate"] < 1
    assert set(metrics["baselines"]) == {"recency", "rfm", "bgnbd", "pareto_nbd"}
    for scorer in (metrics["model"], *metrics["baselines"].values()):
        assert keys <= set(scorer)
    # BTYD baselines score by P(no purchase in the horizon): strong rankers on this data.
    assert metrics["baselines"]["bgnbd"]["roc_auc"] > metrics["baselines"]["recency"]["roc_auc"]
    assert metrics["model"]["roc_auc"] > metrics["baselines"]["recency"]["roc_auc"] + 0.03
    for kind in ("roc", "precision_recall", "gains", "calibration"):
        assert (pipeline.settings.paths.plots / f"{kind}.csv").exists()


def test_season_shift_moves_test_probabilities_towards_the_test_churn_rate(pipeline):
    model = load_model(str(pipeline.settings.paths.model))
    test = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    validation = pd.read_parquet(pipeline.settings.paths.features / "train.parquet")
    validation = validation[validation["cutoff"] == validation["cutoff"].max()]
    assert model.card.season_prior == validation["season_prior"].iloc[0]
    rate = test[LABEL].mean()
    shifted, unshifted = model.predict_proba(test), model.validation_season_proba(test)
    assert abs(shifted.mean() - rate) < abs(unshifted.mean() - rate)
    # Within one cutoff the shift keeps the order: the ranking metrics do not change.
    assert roc_auc_score(test[LABEL], shifted) == pytest.approx(
        roc_auc_score(test[LABEL], unshifted), abs=1e-9
    )


def test_btyd_baselines_fit_on_the_features_stage_sample_and_score_everyone(pipeline):
    # Capped at 800 of the test snapshot's 4,000+ customers: evaluate fits BG/NBD on the very
    # customers the features stage fits on at that cutoff, and scores all of them
    test = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    cap = 800
    settings = dataclasses.replace(pipeline.settings.features, btyd_fit_customers=cap)
    cutoff = test["cutoff"].iloc[0]
    columns, report = features.btyd_features(test, settings, cutoff)
    assert report["customers"] == cap
    probabilities = evaluate.btyd_probabilities(test, settings.horizon_days, cap)
    np.testing.assert_allclose(probabilities["bgnbd"], columns["bgnbd_p_no_purchase"], rtol=1e-12)
    everyone = evaluate.btyd_probabilities(test, settings.horizon_days, len(test))
    for name in ("bgnbd", "pareto_nbd"):
        assert probabilities[name].shape == (len(test),)
        assert np.all(np.isfinite(probabilities[name]))
        assert not np.allclose(probabilities[name], everyone[name], rtol=1e-6)


def test_too_few_repeat_buyers_give_no_btyd_baseline_not_a_failed_fit(pipeline, caplog):
    test = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    sample = features.MIN_BTYD_BUYERS - 1  # cannot hold enough repeat buyers
    assert evaluate.btyd_probabilities(test, 90, sample) == {}
    assert "no BG/NBD or Pareto/NBD baseline" in caplog.text
    assert f"fewer than {features.MIN_BTYD_BUYERS}" in caplog.text


def test_model_is_registered_with_aliases_and_logged(pipeline):
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("churn", "champion")
    assert pipeline.promoted
    assert str(champion.version) == pipeline.model_version
    run = client.get_run(pipeline.run_id)
    assert run.data.metrics["test_roc_auc"] == pytest.approx(pipeline.metrics["model"]["roc_auc"])
    assert "validation_auc" in run.data.metrics
    assert run.data.tags["gate_decision"] == "promoted"
    registered = load_model(f"models:/churn/{pipeline.model_version}")
    local = load_model(str(pipeline.settings.paths.model))
    test = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    pd.testing.assert_series_equal(
        pd.Series(registered.predict_proba(test)), pd.Series(local.predict_proba(test))
    )
    # Through MLflow's own interface, on a snapshot as the features stage writes it: its
    # counts pass the signature and its season prior is not dropped (the 2011-12-10 prior
    # differs from the validation one, so dropping it would change the probabilities).
    snapshot = pd.read_parquet(pipeline.settings.paths.features / "score.parquet")
    assert snapshot["season_prior"].notna().all()
    pyfunc = mlflow.pyfunc.load_model(f"models:/churn/{pipeline.model_version}")
    np.testing.assert_allclose(pyfunc.predict(snapshot), local.predict_proba(snapshot))
    assert not np.allclose(local.predict_proba(snapshot), local.validation_season_proba(snapshot))
    # The requirements are inferred once and are the same in both copies.
    needs = Path(mlflow.pyfunc.get_model_dependencies(f"models:/churn/{pipeline.model_version}"))
    saved = (pipeline.settings.paths.model / "requirements.txt").read_text()
    assert needs.read_text() == saved
    assert {"lightgbm", "lleaves", "mlflow"} <= {line.split("==")[0] for line in saved.split()}


def test_weaker_model_does_not_replace_champion(pipeline, tmp_path):
    s = pipeline.settings
    paths = dataclasses.replace(
        s.paths,
        model=tmp_path / "model",
        model_info=tmp_path / "info.json",
        metrics=tmp_path / "metrics.json",
        gate_report=tmp_path / "gate.json",
        plots=tmp_path / "plots",
    )
    weak = train.run(
        TrainSettings(max_rounds=2, num_leaves=2, early_stopping_rounds=1, n_trials=0),
        s.mlflow,
        paths,
        seed=s.seed,
    )
    outcome = evaluate.run(
        s.evaluate, s.gate, s.mlflow, paths, horizon_days=90, btyd_fit_customers=50_000
    )
    assert outcome.metrics["model"]["roc_auc"] < pipeline.metrics["model"]["roc_auc"]
    assert not outcome.promoted
    gate = json.loads(paths.gate_report.read_text())
    assert gate["champion"]["version"] == pipeline.model_version
    assert gate["champion"]["roc_auc"] == pytest.approx(pipeline.metrics["model"]["roc_auc"])
    assert "below the champion's" in gate["reasons"][0]
    client = mlflow.MlflowClient()
    assert (
        str(client.get_model_version_by_alias("churn", "champion").version)
        == pipeline.model_version
    )
    assert (
        str(client.get_model_version_by_alias("churn", "challenger").version) == weak.model_version
    )


def test_model_of_another_horizon_neither_compared_with_nor_replacing_champion(pipeline, tmp_path):
    s = pipeline.settings
    paths = dataclasses.replace(
        s.paths,
        features=tmp_path / "features",
        model=tmp_path / "model",
        model_info=tmp_path / "info.json",
        metrics=tmp_path / "metrics.json",
        gate_report=tmp_path / "gate.json",
        plots=tmp_path / "plots",
    )
    shorter = dataclasses.replace(s.features, horizon_days=60)
    features.run(shorter, paths)
    other = train.run(dataclasses.replace(s.train, n_trials=0), s.mlflow, paths, seed=s.seed)
    outcome = evaluate.run(
        s.evaluate, s.gate, s.mlflow, paths, horizon_days=60, btyd_fit_customers=50_000
    )
    assert not outcome.promoted
    gate = json.loads(paths.gate_report.read_text())
    assert gate["reasons"][0] == (
        f"champion {pipeline.model_version} was built to another contract (horizon: model 90 "
        f"days, params 60 days): kept; `churn promote {other.model_version}` makes this model "
        "champion"
    )
    assert "roc_auc" not in gate["champion"]  # not scored against 60-day labels
    champion = mlflow.MlflowClient().get_model_version_by_alias("churn", "champion")
    assert str(champion.version) == pipeline.model_version


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "reason"),
    [
        ({"roc_auc": 0.80, "ece": 0.02}, None, True, "no champion"),
        ({"roc_auc": 0.80, "ece": 0.02}, {"roc_auc": 0.81}, True, "within the gate"),
        ({"roc_auc": 0.80, "ece": 0.02}, {"roc_auc": 0.83}, False, "max_auc_drop"),
        ({"roc_auc": 0.90, "ece": 0.08}, {"roc_auc": 0.80}, False, "max_ece"),
    ],
    ids=["first", "small-drop", "big-drop", "badly-calibrated"],
)
def test_gate_decision(challenger, champion, promoted, reason):
    decision, reasons = gate_decision(
        challenger, champion, GateSettings(max_auc_drop=0.02, max_ece=0.05)
    )
    assert decision is promoted
    assert reason in " ".join(reasons)


def _validation(
    booster_p: np.ndarray, btyd_p: np.ndarray, y: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray]:
    return pd.DataFrame({LABEL: y, "bgnbd_p_no_purchase": btyd_p}), booster_p


def test_blend_falls_back_to_the_btyd_score_when_the_booster_adds_nothing():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    btyd_p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, y.size), 0, 1)
    valid, booster_p = _validation(rng.uniform(size=y.size), btyd_p, y)  # pure noise
    chosen = train.choose_blend(booster_p, valid, seed=1)
    assert (chosen.column, chosen.weight) == ("bgnbd_p_no_purchase", 0.0)
    assert chosen.validation_auc["booster"] == pytest.approx(0.5, abs=0.05)


def test_blend_keeps_the_booster_when_it_is_clearly_better():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    btyd_p = rng.uniform(size=y.size)  # pure noise
    valid, booster_p = _validation(np.where(y == 1, 0.8, 0.2), btyd_p, y)  # perfect ranking
    chosen = train.choose_blend(booster_p, valid, seed=1)
    auc, se = chosen.validation_auc, chosen.standard_error
    assert auc["booster"] == 1.0
    assert chosen.weight >= 0.5
    # The one-standard-error rule: the most BTYD weight whose AUC is within one SE of the best.
    assert auc[f"{chosen.column}@{chosen.weight}"] >= 1.0 - se
    heavier = [w for w in train.BLEND_WEIGHTS if w < chosen.weight]
    assert all(auc[f"bgnbd_p_no_purchase@{w}"] < 1.0 - se for w in heavier)


def test_tuning_trials_are_nested_runs_and_choices_are_logged(pipeline):
    client = mlflow.MlflowClient()
    parent = client.get_run(pipeline.run_id)
    settings = pipeline.settings.train
    assert parent.data.params["n_trials"] == str(settings.n_trials)
    assert parent.data.params["blend_column"] in ("bgnbd_p_no_purchase", "none")
    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline.run_id}'"
    )
    assert len(trials) == settings.n_trials
    first = next(t for t in trials if t.info.run_name == "trial-0")  # the params as given
    assert float(first.data.params["learning_rate"]) == settings.learning_rate
    assert int(first.data.params["num_leaves"]) == settings.num_leaves
    assert all(0.5 < t.data.metrics["validation_auc"] <= 1 for t in trials)
    artifacts = {a.path for a in client.list_artifacts(pipeline.run_id)}
    assert {"btyd_fits.json", "blend_validation_auc.json"} <= artifacts
    fits = mlflow.artifacts.load_dict(f"runs:/{pipeline.run_id}/btyd_fits.json")
    assert all(f["fitted"] and f["bgnbd"]["converged"] for f in fits.values())


@pytest.mark.slow
def test_small_data_model_does_not_lose_to_btyd(pipeline, tmp_path):
    """On 600 random customers the model must rank at least as well as BG/NBD: the
    validation snapshot decides how much it leans on the BTYD score."""
    s = pipeline.settings
    transactions = pd.read_parquet(s.paths.transactions)
    customers = np.sort(transactions["customer_id"].unique())
    picked = np.random.default_rng(s.seed).choice(customers, 600, replace=False)
    paths = dataclasses.replace(
        s.paths, transactions=tmp_path / "transactions.parquet", features=tmp_path / "features"
    )
    transactions[transactions["customer_id"].isin(picked)].to_parquet(paths.transactions)
    features.run(s.features, paths)
    test, auc = snapshot_aucs(paths.features, s, tmp_path / "model")
    assert len(test) < 600
    assert auc["model"] >= auc["bgnbd"]


def _stacked(sizes: dict[tuple[str, int], int]) -> pd.DataFrame:
    """Stacked snapshots with ``sizes[(cutoff, churned)]`` rows per stratum."""
    parts = [
        pd.DataFrame({"cutoff": cutoff, "churned": label, "row": range(n)})
        for (cutoff, label), n in sizes.items()
    ]
    return pd.concat(parts, ignore_index=True)


def test_snapshots_of_one_class_are_refused_by_name():
    fit, valid = train.split_by_cutoff(
        _stacked(
            {("2024-01-01", 0): 3, ("2024-01-01", 1): 2, ("2024-02-01", 0): 1, ("2024-02-01", 1): 4}
        )
    )
    assert (len(fit), len(valid)) == (5, 5)
    with pytest.raises(
        ChurnError,
        match=r"train.parquet: the validation snapshot\(s\) at 2024-02-01 hold 4 customers, "
        "all churned; a model needs both",
    ):
        train.split_by_cutoff(
            _stacked({("2024-01-01", 0): 3, ("2024-01-01", 1): 2, ("2024-02-01", 1): 4})
        )
    with pytest.raises(
        ChurnError,
        match=r"the fitting snapshot\(s\) at 2024-01-01, 2024-01-15 hold 4 customers, all retained",
    ):
        train.split_by_cutoff(
            _stacked(
                {
                    ("2024-01-01", 0): 3,
                    ("2024-01-15", 0): 1,
                    ("2024-02-01", 0): 1,
                    ("2024-02-01", 1): 4,
                }
            )
        )


def test_stratified_sample_keeps_cutoff_and_label_shares():
    # 1000 rows: 600 at the first cutoff (450 kept, 150 churned), 400 at the second (100/300).
    snapshots = _stacked({("a", 0): 450, ("a", 1): 150, ("b", 0): 100, ("b", 1): 300})
    sample = train.stratified_sample(snapshots, 100, seed=7)
    counts = sample.groupby(["cutoff", "churned"]).size().to_dict()
    assert counts == {("a", 0): 45, ("a", 1): 15, ("b", 0): 10, ("b", 1): 30}
    assert sample.index.is_monotonic_increasing  # rows keep their order
    assert sample.index.is_unique
    again = train.stratified_sample(snapshots, 100, seed=7)
    assert again.index.equals(sample.index)


def test_stratified_sample_gives_leftover_rows_to_largest_remainders():
    # Shares of 7 rows over strata of 5, 3, 2: 3.5, 2.1, 1.4 -> floors 3, 2, 1 and one left,
    # which goes to the largest remainder (0.5, the first stratum).
    snapshots = _stacked({("a", 0): 5, ("a", 1): 3, ("b", 0): 2})
    sample = train.stratified_sample(snapshots, 7, seed=0)
    assert sample.groupby(["cutoff", "churned"]).size().tolist() == [4, 2, 1]


def test_stratified_sample_returns_everything_when_under_the_cap():
    snapshots = _stacked({("a", 0): 3, ("b", 1): 2})
    assert train.stratified_sample(snapshots, 5, seed=0) is snapshots


def test_training_above_max_rows_samples_and_logs_it(make_settings, tracking):
    rng = np.random.default_rng(3)
    n = 800
    recency = rng.integers(1, 365, n)
    snapshots = pd.DataFrame(
        {
            "customer_id": [f"C{i:04d}" for i in range(n)],
            "cutoff": np.repeat(pd.to_datetime(["2024-01-01", "2024-04-01"]).date, n // 2),
            "recency_days": recency,
            "frequency": rng.integers(1, 20, n),
            "churned": (recency + rng.normal(0, 60, n) > 180).astype("int8"),
        }
    )
    settings = make_settings(train={"max_rows": 500, "max_rounds": 20})
    paths = settings.paths
    paths.features.mkdir(parents=True)
    snapshots.to_parquet(paths.features / "train.parquet", index=False)
    (paths.features / "spec.json").write_text('{"horizon_days": 90, "feature_hash": "h"}')
    summary = train.run(settings.train, settings.mlflow, paths, seed=1)
    run = mlflow.MlflowClient().get_run(summary.run_id)
    assert run.data.params["train_rows_total"] == "800"
    assert run.data.params["train_rows_used"] == "500"
    assert run.data.params["train_sampled"] == "True"
    assert run.data.tags["train_sampled"] == "true"


def _rows_fitted(booster) -> int:
    """Rows under the first tree's root (with bagging off: every row the booster saw)."""
    return booster.dump_model()["tree_info"][0]["tree_structure"]["internal_count"]


def test_trials_tune_on_samples_and_the_best_settings_fit_every_row(pipeline):
    snapshots = pd.read_parquet(pipeline.settings.paths.features / "train.parquet")
    fit, valid = train.split_by_cutoff(snapshots)
    columns = train.feature_columns(snapshots)
    settings = TrainSettings(
        max_rounds=30, early_stopping_rounds=5, bagging_fraction=1.0, n_trials=2, tune_rows=2000
    )
    _, trials, booster = train.tune(fit, valid, columns, settings, seed=0)
    assert [t["fit_rows"] for t in trials] == [2000, 2000]
    assert _rows_fitted(booster) == len(fit) > 2000  # fitted again on every row
    everything = dataclasses.replace(settings, tune_rows=len(snapshots))
    _, trials, reused = train.tune(fit, valid, columns, everything, seed=0)
    assert [t["fit_rows"] for t in trials] == [len(fit)] * 2
    assert _rows_fitted(reused) == len(fit)


def test_the_sample_read_in_batches_is_the_stratified_sample_of_the_file(pipeline, tmp_path):
    snapshots = pd.read_parquet(pipeline.settings.paths.features / "train.parquet")
    path = tmp_path / "train.parquet"
    snapshots.to_parquet(path, row_group_size=1000)  # many batches to pick rows from
    sample, total = train.read_sample(path, 5000, seed=3)
    expected = train.stratified_sample(snapshots, 5000, seed=3).reset_index(drop=True)
    assert total == len(snapshots) > 5000
    pd.testing.assert_frame_equal(sample, expected)
    whole, _ = train.read_sample(path, len(snapshots), seed=3)
    pd.testing.assert_frame_equal(whole, snapshots)


def test_boosting_stops_where_lightgbm_early_stopping_does_and_measures_every_k_trees(pipeline):
    snapshots = pd.read_parquet(pipeline.settings.paths.features / "train.parquet")
    fit, valid = train.split_by_cutoff(snapshots)
    columns = train.feature_columns(snapshots)
    settings = TrainSettings(max_rounds=400, early_stopping_rounds=20, eval_every=1)
    reference = lgb.train(
        train.lgb_params(settings, seed=0),
        lgb.Dataset(fit[columns].astype("float64"), label=fit[LABEL]),
        num_boost_round=settings.max_rounds,
        valid_sets=[lgb.Dataset(valid[columns].astype("float64"), label=valid[LABEL])],
        callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)],
    )
    every_tree = train.fit_booster(fit, valid, columns, settings, seed=0)
    assert every_tree.best_iteration == reference.best_iteration < settings.max_rounds
    assert every_tree.best_score["valid_0"]["auc"] == reference.best_score["valid_0"]["auc"]
    assert every_tree.num_trees() == reference.num_trees()
    x = valid[columns].astype("float64")
    np.testing.assert_array_equal(
        every_tree.predict(x, num_iteration=every_tree.best_iteration),
        reference.predict(x, num_iteration=reference.best_iteration),
    )
    # Measured every 7 trees: the best of the measured counts, the same trees as before.
    sparse = train.fit_booster(
        fit, valid, columns, dataclasses.replace(settings, eval_every=7), seed=0
    )
    assert sparse.best_iteration % 7 == 0
    assert sparse.num_trees() == sparse.best_iteration  # trees after the best are dropped
    p = sparse.predict(x)
    assert sparse.best_score["valid_0"]["auc"] == pytest.approx(roc_auc_score(valid[LABEL], p))
    # The measured counts before it did no better.
    for n in range(7, sparse.best_iteration, 7):
        assert roc_auc_score(valid[LABEL], sparse.predict(x, num_iteration=n)) <= roc_auc_score(
            valid[LABEL], p
        )
    common = min(sparse.num_trees(), every_tree.num_trees())
    np.testing.assert_array_equal(
        sparse.predict(x, num_iteration=common), every_tree.predict(x, num_iteration=common)
    )


def test_the_model_is_the_same_whatever_the_number_of_threads(pipeline):
    snapshots = pd.read_parquet(pipeline.settings.paths.features / "train.parquet")
    fit, valid = train.split_by_cutoff(snapshots)
    columns = train.feature_columns(snapshots)
    predictions = []
    for threads in (1, 2, 3):
        settings = TrainSettings(max_rounds=60, early_stopping_rounds=60, num_threads=threads)
        assert train.lgb_params(settings, seed=0)["num_threads"] == threads
        booster = train.fit_booster(fit, valid, columns, settings, seed=0)
        predictions.append(booster.predict(valid[columns].astype("float64")))
    np.testing.assert_array_equal(predictions[0], predictions[1])
    np.testing.assert_array_equal(predictions[0], predictions[2])
    assert train.lgb_params(TrainSettings(), seed=0)["num_threads"] == usable_cpus()
