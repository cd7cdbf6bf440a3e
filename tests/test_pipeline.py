"""The real pipeline: `dvc repro` in a temporary git + DVC repository on a slice of the data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import ibis
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from churn.config import settings_from_dict
from churn.features import MIN_BTYD_BUYERS, Engagement, engagement_features, with_day
from churn.model import load_model
from churn.synth import TRANSACTION_COLUMNS, SynthSpec, generate, write
from churn.train import build_model
from tests.conftest import NO_TUNING, ROOT, SAMPLE, merge, project_params

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _init_repo(root: Path, params: dict) -> dict[str, str]:
    """Make ``root`` a committed git + DVC repository with the project's pipeline, ``params``
    as its params.yaml and its data already in place; return the environment to run it in."""
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
    }
    for args in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        _run(args, root, env)
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository holding the project's pipeline and a third of the customers."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "data" / "events", root / "data" / "events")
    (root / "data" / "sample").mkdir(parents=True)
    for path in sorted(SAMPLE.glob("*.parquet")):
        frame = pd.read_parquet(path)
        frame[frame["Customer ID"].fillna(0) % 3 == 0].to_parquet(root / "data/sample" / path.name)
    env = _init_repo(root, merge(project_params(), NO_TUNING))
    _run(["dvc", "repro"], root, env)
    return root, env


def test_repro_writes_every_output(repo):
    root, _ = repo
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["model"]["roc_auc"] > metrics["baselines"]["recency"]["roc_auc"]
    report = json.loads((root / "reports/ingest.json").read_text())
    assert report["reconciles"]
    assert report["rows_kept"] > 0
    scored = pd.read_csv(root / "data/scored/retention_list.csv", dtype={"customer_id": str})
    assert len(scored) > 1000
    assert (scored["customer_id"].astype(int) % 3 == 0).all()
    assert (root / "models/churn_model/MLmodel").exists()


def test_champion_alias_is_set_in_the_tracking_store(repo):
    root, env = repo
    client = mlflow.MlflowClient(
        tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"]
    )
    champion = client.get_model_version_by_alias("churn", "champion")
    info = json.loads((root / "models/model_info.json").read_text())
    assert str(champion.version) == info["model_version"]


def test_second_repro_does_nothing_and_metrics_show(repo):
    root, env = repo
    assert "up to date" in _run(["dvc", "status"], root, env)
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], root, env))
    assert "reports/metrics.json" in json.dumps(shown)
    _run(["dvc", "plots", "show", "-o", str(root / "plots_html")], root, env)
    assert (root / "plots_html/index.html").exists()


def test_dvc_experiment_with_a_param_override(repo):
    root, env = repo
    _run(["git", "add", "dvc.lock"], root, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], root, env)
    # --temp: the experiment runs in a copy, the workspace keeps the repro's outputs
    _run(["dvc", "exp", "run", "--temp", "-S", "train.num_leaves=63", "-n", "leaves63"], root, env)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env))
    flat = json.dumps(shown)
    assert "leaves63" in flat
    experiment = next(
        exp
        for commit in shown
        for exp in (commit.get("experiments") or [])
        if exp.get("name") == "leaves63"
    )
    data = experiment["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["num_leaves"] == 63
    auc = data["metrics"]["reports/metrics.json"]["data"]["model"]["roc_auc"]
    assert 0.5 < auc < 1


def test_param_change_reruns_exactly_the_dependent_stages(repo):
    root, env = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["features"]["horizon_days"] = 60
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(["dvc", "status", "--json"], root, env))
    assert set(status) == {"features", "evaluate"}  # train follows through spec.json
    params["score"]["n_reasons"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(["dvc", "status", "--json"], root, env))
    assert set(status) == {"features", "evaluate", "score"}
    _run(["git", "checkout", "params.yaml"], root, env)


def test_a_new_scoring_date_scores_again_without_retraining(repo):
    root, env = repo
    _run(["dvc", "repro"], root, env)  # up to date whatever the tests before left
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["features"]["as_of"] = "2011-11-01"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _run(["dvc", "repro"], root, env)
    for unchanged in ("train", "evaluate"):
        assert f"Stage '{unchanged}' didn't change, skipping" in done
    assert "Running stage 'score'" in done
    scored = pd.read_csv(root / "data/scored/retention_list.csv", usecols=["as_of"])
    assert (scored["as_of"] == "2011-11-01").all()
    _run(["git", "checkout", "params.yaml"], root, env)


# --- synthetic data with engagement events and known churn times --------------------------

SYNTH_SPEC = SynthSpec(n_customers=2000, months=30, seed=3)
UNMAPPED = dict.fromkeys(("amount", "channel", "country"))  # not in the synthetic export
SYNTH_COLUMNS = {c: c for c in TRANSACTION_COLUMNS} | UNMAPPED


@pytest.fixture(scope="module")
def synthetic_repo(tmp_path_factory):
    """The whole pipeline on synthetic transactions and events, through `dvc repro`.

    BTYD fits are left out (too few customers to fit on): they cost a minute here and the
    synthetic truth is about the model, not them.
    """
    root = tmp_path_factory.mktemp("synthetic")
    write(generate(SYNTH_SPEC), root / "data" / "synth")
    params = merge(
        project_params(),
        {
            "data": {
                "transactions": {
                    "path": "data/synth/transactions.parquet",
                    "columns": SYNTH_COLUMNS,
                },
                "events": {"path": "data/synth/events.parquet"},
            },
            "features": {"n_snapshots": 3, "btyd_fit_customers": MIN_BTYD_BUYERS - 1},
            **NO_TUNING,
        },
    )
    env = _init_repo(root, params)
    _run(["dvc", "repro"], root, env)
    return root, env, settings_from_dict(params, root)


def _engagement_columns(families: list[str]) -> set[str]:
    """The columns engagement events add to a snapshot, from the feature code itself."""
    events = ibis.table(
        {"customer_id": "string", "ts": "timestamp", "family": "string", "value": "float64"}
    )
    engagement = Engagement(events=with_day(events), families=tuple(families))
    return set(engagement_features(engagement, date(2024, 1, 1)).columns) - {"customer_id"}


def _truly_churned(snapshot: pd.DataFrame, root: Path, horizon_days: int) -> np.ndarray:
    """1 where the customer's true churn time falls before the end of the label window."""
    truth = pd.read_parquet(root / "data/synth/truth.parquet", columns=["customer_id", "churn_ts"])
    joined = snapshot[["customer_id"]].merge(truth, on="customer_id", how="left", validate="1:1")
    end = pd.Timestamp(snapshot["cutoff"].iloc[0]) + pd.Timedelta(days=horizon_days)
    return (joined["churn_ts"] < end).to_numpy(dtype="int8")


def test_plots_render_when_the_btyd_baselines_could_not_be_fitted(synthetic_repo):
    root, env, _ = synthetic_repo
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert set(metrics["baselines"]) == {"recency", "rfm"}  # 9 customers to fit BTYD on
    roc = pd.read_csv(root / "reports/plots/roc.csv")
    assert roc[["bgnbd", "pareto_nbd"]].isna().all().all()
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], root, env))
    assert "errors" not in shown, shown["errors"]
    assert set(shown["data"]) >= {"reports/plots/roc.csv", "reports/plots/gains.csv"}


def test_synthetic_engagement_features_reach_the_importance_table(synthetic_repo):
    root, env, _ = synthetic_repo
    spec = json.loads((root / "data/features/spec.json").read_text())
    engaged = _engagement_columns(spec["engagement_families"])
    assert {"days_since_engagement", "visit_30d", "complaint_90d", "csat_last"} <= engaged
    run_id = json.loads((root / "models/model_info.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    importance = json.loads(
        Path(client.download_artifacts(run_id, "feature_importance.json", str(root))).read_text()
    )
    assert engaged <= set(importance)  # every engagement feature is a model input
    used = [name for name, value in importance.items() if name in engaged and value["gain"] > 0]
    assert len(used) >= 5
    top = list(importance)[:5]
    assert any(name in engaged for name in top), top
    scored = pd.read_csv(root / "data/scored/retention_list.csv", dtype={"customer_id": str})
    score = pd.read_parquet(root / "data/features/score.parquet")
    assert set(scored["customer_id"]) == set(score["customer_id"])


def test_synthetic_model_ranks_true_churners_high_and_events_help(synthetic_repo):
    root, _, settings = synthetic_repo
    train = pd.read_parquet(root / "data/features/train.parquet")
    test = pd.read_parquet(root / "data/features/test.parquet")
    spec = json.loads((root / "data/features/spec.json").read_text())
    y_true = _truly_churned(test, root, settings.features.horizon_days)
    assert 0.2 < y_true.mean() < 0.6  # both classes well represented

    with_events = roc_auc_score(
        y_true, load_model(str(root / "models/churn_model")).predict_proba(test)
    )
    engaged = _engagement_columns(spec["engagement_families"])
    fitted = build_model(
        train.drop(columns=list(engaged)), settings.train, spec, seed=settings.seed
    )
    card = fitted.card
    assert not engaged & set(card.features)
    assert card.blend_column is None  # no BTYD columns to blend with: the booster alone
    raw = fitted.booster.predict(
        test[card.features].astype("float64"), num_iteration=card.best_iteration
    )
    without_events = roc_auc_score(y_true, raw)

    assert with_events >= 0.8
    assert without_events >= 0.7
    assert with_events >= without_events + 0.03
