"""The real pipeline: `dvc repro` in a temporary git + DVC repository on a slice of the data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, SAMPLE

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository holding the project's pipeline and a third of the customers."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["n_trials"] = 0  # the wiring is under test here; tuning is in test_train
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "events", root / "data" / "events")
    (root / "data" / "sample").mkdir(parents=True)
    for path in sorted(SAMPLE.glob("*.parquet")):
        frame = pd.read_parquet(path)
        frame[frame["Customer ID"].fillna(0) % 3 == 0].to_parquet(root / "data/sample" / path.name)
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
    _run(["dvc", "exp", "run", "-S", "train.num_leaves=63", "--name", "leaves63"], root, env)
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
