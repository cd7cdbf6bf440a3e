"""Train, register and score against a real MLflow tracking server over HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pandas as pd
import pytest
import yaml

from tests.conftest import NO_TUNING, ROOT, SAMPLE, merge, project_params

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    port = _free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url, folder
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_pipeline_trains_registers_and_scores_over_http(server, tmp_path):
    url, server_folder = server
    (tmp_path / "data" / "sample").mkdir(parents=True)
    shutil.copytree(ROOT / "data" / "events", tmp_path / "data" / "events")
    for path in sorted(SAMPLE.glob("*.parquet")):
        frame = pd.read_parquet(path)
        frame[frame["Customer ID"].fillna(0) % 3 == 0].to_parquet(
            tmp_path / "data/sample" / path.name
        )
    params = merge(
        project_params(), {"data": {"transactions": {"path": "data/sample"}}, **NO_TUNING}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    for command in (
        ["ingest"],
        ["features"],
        ["train"],
        ["evaluate"],
        [
            "score",
            "--model",
            "models:/churn@champion",
            "--transactions",
            "data/interim/transactions.parquet",
            "--out",
            "list.csv",
        ],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "churn", *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    champion = client.get_model_version_by_alias("churn", "champion")
    scored = pd.read_csv(tmp_path / "list.csv", encoding="utf-8-sig")
    snapshot = pd.read_parquet(tmp_path / "data/features/score.parquet")
    assert len(scored) == len(snapshot)
    assert (scored["model_version"].astype(str) == str(champion.version)).all()
    # The model went over HTTP: its files are in the server's artifact store, not here.
    assert list(server_folder.joinpath("artifacts").rglob("booster.txt"))
    assert not (tmp_path / "mlruns").exists()
