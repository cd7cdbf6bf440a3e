"""Unattended scoring: registry moves, contract and drift guards, atomic output, exit codes.

Every test drives the real `churn` command in a subprocess against the session's trained
pipeline and its MLflow store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from churn import score
from tests.conftest import ROOT, merge

pytestmark = pytest.mark.slow


def churn(pipeline, *args: str, params: Path | None = None, cwd: Path | None = None, **env: str):
    """Run ``python -m churn`` with the pipeline's params and tracking store (in ``cwd``)."""
    environment = {**os.environ, "MLFLOW_TRACKING_URI": pipeline.tracking_uri, **env}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "churn",
            "--params",
            str(params or pipeline.root / "params.yaml"),
            *args,
        ],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def score_args(pipeline, out: Path, transactions: Path | None = None) -> list[str]:
    return [
        "score",
        "--model",
        "models:/churn@champion",
        "--transactions",
        str(transactions or pipeline.settings.paths.transactions),
        "--as-of",
        "2011-12-10",
        "--out",
        str(out),
    ]


def test_scores_registered_champion_byte_identically(pipeline, tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    for out in (first, second):
        done = churn(pipeline, *score_args(pipeline, out), "--xlsx")
        assert done.returncode == 0, done.stderr
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes().startswith(b"\xef\xbb\xbf")  # BOM: Excel reads it as UTF-8
    scored = pd.read_csv(first, dtype={"customer_id": str}, encoding="utf-8-sig")
    assert list(scored.columns) == score.retention_columns(3)
    snapshot = pd.read_parquet(pipeline.settings.paths.features / "score.parquet")
    assert sorted(scored["customer_id"]) == sorted(snapshot["customer_id"])
    assert (scored["model_version"].astype(str) == pipeline.model_version).all()
    assert scored["churn_probability"].is_monotonic_decreasing
    assert (scored["as_of"] == "2011-12-10").all()
    assert scored["action"].notna().all()
    assert scored["selected"].any()
    # 12-month value net of returns: never negative or missing; value at risk is p x CLV.
    assert (scored["clv_12m"] >= 0).all()
    assert scored["clv_12m"].notna().all()
    gap = scored["value_at_risk"] - scored["churn_probability"] * scored["clv_12m"]
    assert (gap.abs() <= 0.01 + 1e-4 * scored["clv_12m"]).all()
    workbook = pd.read_excel(
        first.with_suffix(".xlsx"), dtype={"customer_id": str}, engine="calamine"
    )
    assert workbook["customer_id"].tolist() == scored["customer_id"].tolist()


def _pipeline_reports(pipeline) -> dict[str, bytes | None]:
    """The pipeline's own drift and campaign reports as they are now (None: not written)."""
    paths = pipeline.settings.paths
    return {
        str(p): p.read_bytes() if p.exists() else None
        for p in (paths.drift_report, paths.campaign_report)
    }


def test_campaign_value_based_beats_top_probability(pipeline, tmp_path):
    before = _pipeline_reports(pipeline)
    done = churn(pipeline, *score_args(pipeline, tmp_path / "l.csv"))
    assert done.returncode == 0, done.stderr
    # An ad-hoc --out gets its reports beside it; the pipeline's are left alone.
    assert _pipeline_reports(pipeline) == before
    assert json.loads((tmp_path / "l.drift.json").read_text())["status"] in ("ok", "warn")
    campaign = json.loads((tmp_path / "l.campaign.json").read_text())
    budget = campaign["budget"]
    assert 0 < campaign["value_based"]["spend"] <= budget
    assert 0 < campaign["top_probability"]["spend"] <= budget
    assert (
        campaign["value_based"]["expected_value_saved"]
        > campaign["top_probability"]["expected_value_saved"]
    )
    scored = pd.read_csv(tmp_path / "l.csv", encoding="utf-8-sig")
    chosen = scored[scored["selected"]]
    assert len(chosen) == campaign["value_based"]["customers"]
    assert chosen["action_cost"].sum() == pytest.approx(campaign["value_based"]["spend"])


def test_the_pipelines_model_directory_is_listed_by_registry_version(pipeline, tmp_path):
    other = tmp_path / "other_model"
    shutil.copytree(pipeline.settings.paths.model, other)
    expected = {"models/churn_model": pipeline.model_version, str(other): str(other)}
    for model, version in expected.items():
        out = tmp_path / "l.csv"
        done = churn(pipeline, "score", "--model", model, "--out", str(out), cwd=pipeline.root)
        assert done.returncode == 0, done.stderr
        scored = pd.read_csv(out, encoding="utf-8-sig", dtype={"model_version": str})
        assert set(scored["model_version"]) == {version}, model


def _params_with(pipeline, tmp_path: Path, **overrides) -> Path:
    params = merge(yaml.safe_load((pipeline.root / "params.yaml").read_text()), overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"features": {"horizon_days": 60}}, "horizon: model 90 days, params 60 days"),
        ({"features": {"windows_days": [30, 90]}}, "feature definitions: model"),
    ],
    ids=["horizon", "windows"],
)
def test_contract_mismatch_exits_3_and_says_what_differs(pipeline, tmp_path, overrides, message):
    out = tmp_path / "list.csv"
    done = churn(
        pipeline, *score_args(pipeline, out), params=_params_with(pipeline, tmp_path, **overrides)
    )
    assert done.returncode == 3, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_shifted_population_fails_on_drift_unless_allowed(pipeline, tmp_path):
    # A synthetic population: the real customers, every amount multiplied by 25.
    shifted = pd.read_parquet(pipeline.settings.paths.transactions)
    shifted["amount"] = shifted["amount"] * 25
    source = tmp_path / "shifted.parquet"
    shifted.to_parquet(source)
    before = _pipeline_reports(pipeline)
    out = tmp_path / "list.csv"
    done = churn(pipeline, *score_args(pipeline, out, source))
    assert done.returncode == 4, done.stderr
    assert "population drift above drift.fail_psi" in done.stderr
    assert not out.exists()
    assert _pipeline_reports(pipeline) == before
    report = json.loads((tmp_path / "list.drift.json").read_text())
    assert report["status"] == "fail"
    assert report["columns"]["monetary"]["status"] == "fail"
    assert report["columns"]["frequency"]["status"] == "ok"  # counts did not move
    allowed = churn(pipeline, *score_args(pipeline, out, source), "--allow-drift")
    assert allowed.returncode == 0, allowed.stderr
    assert out.exists()


def test_sigkill_mid_write_leaves_previous_list_and_no_partial_file(pipeline, tmp_path):
    # A scoring snapshot twice the bundled one, written 20 rows at a time.
    features = tmp_path / "features"
    features.mkdir()
    base = pd.read_parquet(pipeline.settings.paths.features / "score.parquet")
    big = pd.concat([base.assign(customer_id=base["customer_id"] + f"-{k}") for k in range(2)])
    big.to_parquet(features / "score.parquet")
    shutil.copy(pipeline.settings.paths.features / "spec.json", features / "spec.json")
    out_dir = tmp_path / "scored"
    out_dir.mkdir()
    target = out_dir / "retention_list.csv"
    target.write_text("previous list\n")
    params = _params_with(
        pipeline,
        tmp_path,
        paths={
            "features": str(features),
            "retention_list": str(target),
            "model": str(pipeline.settings.paths.model),
            "model_info": str(pipeline.settings.paths.model_info),
            "drift_report": str(tmp_path / "drift.json"),
        },
        score={"chunk_rows": 20},
    )
    scratch = tmp_path / "scratch"  # the killed job cannot clean its scratch up
    scratch.mkdir()
    with subprocess.Popen(
        [sys.executable, "-m", "churn", "--params", str(params), "score", "--allow-drift"],
        env={**os.environ, "MLFLOW_TRACKING_URI": pipeline.tracking_uri, "TMPDIR": str(scratch)},
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if "writing" in line:
                process.send_signal(signal.SIGKILL)
                break
        assert process.wait(timeout=120) == -signal.SIGKILL
    assert target.read_text() == "previous list\n"
    assert [p.name for p in out_dir.iterdir()] == ["retention_list.csv"]


def test_promote_and_rollback_move_the_champion(pipeline, tmp_path):
    import dataclasses

    from churn import train
    from churn.config import TrainSettings

    paths = dataclasses.replace(
        pipeline.settings.paths, model=tmp_path / "m", model_info=tmp_path / "info.json"
    )
    other = train.run(
        TrainSettings(max_rounds=3), pipeline.settings.mlflow, paths, seed=pipeline.settings.seed
    ).model_version
    promoted = churn(pipeline, "promote", other)
    assert promoted.returncode == 0, promoted.stderr
    assert _champion(pipeline) == other
    rolled = churn(pipeline, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert _champion(pipeline) == pipeline.model_version
    missing = churn(pipeline, "promote", "999")
    assert missing.returncode == 2
    assert "model 'churn' has no version 999" in missing.stderr


def _champion(pipeline) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=pipeline.tracking_uri)
    return str(client.get_model_version_by_alias("churn", "champion").version)


def test_json_logs_and_bad_input_exit_code(pipeline, tmp_path):
    done = churn(pipeline, *score_args(pipeline, tmp_path / "l.csv"), CHURN_LOG_FORMAT="json")
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(r["message"].startswith("score:") and r["level"] == "INFO" for r in records)
    bad = churn(pipeline, *score_args(pipeline, tmp_path / "l.csv", tmp_path / "nope.parquet"))
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith(
        "nope.parquet: file not found (expected a Parquet file `churn ingest` writes)"
    )


def test_an_export_given_as_transactions_is_named_not_read(pipeline, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("Customer ID,InvoiceDate\n1,2011-01-01\n")
    model = ("--model", "models:/churn@champion")
    bad = churn(pipeline, "score", *model, "--transactions", str(export))
    assert bad.returncode == 2
    assert "export.csv: not a Parquet file (expected the canonical table" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "models:/churn/99"), "cannot load model 'models:/churn/99'"),
        (("--model", "models:/churn@nosuch"), "cannot load model 'models:/churn@nosuch'"),
        (("--as-of", "2011-09-11"), "--as-of and --events go with --transactions"),
    ],
    ids=["unknown-version", "unknown-alias", "as-of-alone"],
)
def test_bad_score_options_exit_2_with_one_line(pipeline, tmp_path, args, message):
    done = churn(pipeline, "score", *args, "--out", str(tmp_path / "l.csv"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"churn: error: {message}")
    assert not (tmp_path / "l.csv").exists()


@pytest.mark.parametrize(
    ("stage", "missing", "earlier"),
    [
        ("features", "data/interim/transactions.parquet", "ingest"),
        ("train", "data/features/train.parquet", "features"),
        ("evaluate", "data/features/train.parquet", "features"),
        ("score", "models/churn_model", "train"),
        ("report", "data/scored/retention_list.csv", "score"),
    ],
)
def test_a_stage_run_before_the_one_it_reads_from_says_which(tmp_path, stage, missing, earlier):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    done = subprocess.run(
        [sys.executable, "-m", "churn", "--params", str(params), stage],
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith(
        f"{tmp_path / missing}: not found; run `churn {earlier}` first (or `dvc repro`)"
    )


def test_readme_production_script_runs_verbatim(pipeline, tmp_path):
    readme = (ROOT / "README.md").read_text()
    script = re.search(r"<!-- weekly-score.sh -->\s*```bash\n(.*?)```", readme, re.S)
    assert script, "README lost its weekly-score.sh block"
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(pipeline.root / "params.yaml", project / "params.yaml")
    shutil.copy(pipeline.root / "mlflow.db", project / "mlflow.db")
    (project / "weekly-score.sh").write_text(script.group(1))
    (project / "data" / "events").mkdir(parents=True)  # as in a checkout: no event exports
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", "weekly-score.sh"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    scored = pd.read_csv(project / "data/scored/retention_list.csv")
    assert len(scored) > 4000
    # --out is the pipeline's own list, so the reports are the pipeline's too.
    assert (project / "reports/drift.json").is_file()
    assert (project / "reports/campaign.json").is_file()
    assert sorted(p.name for p in (project / "data/scored").iterdir()) == ["retention_list.csv"]
    assert (scored["model_version"].astype(str) == _champion(pipeline)).all()
