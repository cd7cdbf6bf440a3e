"""Shared fixtures: the project's params, tiny hand-checked tables, a temporary MLflow store."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
import pytest
import yaml

from churn.config import Settings, settings_from_dict
from churn.ingest import LINE_COLUMNS

if TYPE_CHECKING:
    from churn.model import ChurnModel
    from churn.train import Fitted

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = ROOT / "data" / "sample"
# For tests of the wiring (DVC, a tracking server): tuning is tested in test_train_evaluate.
NO_TUNING = {"train": {"n_trials": 0}}


def pytest_configure(config: pytest.Config) -> None:
    """Give each pytest-xdist worker its own share of the CPUs. LightGBM, the scoring threads
    and the commands a worker starts (dvc, churn) size themselves to the CPUs they may use:
    without a share, every worker starts a thread per CPU and they run against each other."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= workers:
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) :: workers])


def project_params() -> dict[str, Any]:
    """The repository's params.yaml as a plain mapping."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_settings(tmp_path: Path):
    """Settings from the project's params with overrides, paths under ``tmp_path``."""

    def _make(**overrides: Any) -> Settings:
        (tmp_path / "data" / "events").mkdir(parents=True, exist_ok=True)  # as in the repo
        return settings_from_dict(merge(project_params(), overrides), tmp_path)

    return _make


def tx(rows: list[tuple]) -> pd.DataFrame:
    """A canonical transaction table from (customer, order, ts, amount[, product]) rows."""
    frame = pd.DataFrame(
        [(*r, None)[:5] if len(r) == 4 else r for r in rows],
        columns=["customer_id", "order_id", "ts", "amount", "product_id"],
    )
    frame["ts"] = pd.to_datetime(frame["ts"]).astype("datetime64[us]")
    frame["amount"] = frame["amount"].astype("float64")
    frame["quantity"] = frame["amount"].apply(lambda a: -1.0 if a < 0 else 1.0)
    for unknown in ("channel", "country"):
        frame[unknown] = pd.Series([None] * len(frame), dtype="string")
    frame["is_return"] = frame["amount"] < 0
    text = {"customer_id": "string", "order_id": "string", "product_id": "string"}
    return frame[list(LINE_COLUMNS)].astype(text)


# Hand-checked history; cutoff 2021-04-01, horizon 30 days, windows 30 and 90 days.
TINY_ROWS = [
    ("A", "O1", "2021-01-01 10:00", 6.0, "P1"),
    ("A", "O1", "2021-01-01 10:00", 4.0, "P2"),
    ("A", "O2", "2021-02-01 09:00", 20.0, "P1"),
    ("A", "O3", "2021-03-20 18:30", 30.0, "P3"),
    ("A", "C1", "2021-03-25 12:00", -5.0, "P3"),
    ("A", "O4", "2021-04-10 08:00", 15.0, "P1"),
    ("B", "O5", "2020-06-01 12:00", 100.0, "P4"),
    ("B", "O6", "2021-03-31 23:59", 50.0, "P4"),
    ("C", "O7", "2019-01-01 12:00", 10.0, "P1"),
    ("C", "O8", "2021-04-05 12:00", 10.0, "P1"),
    ("D", "O9", "2021-04-01 00:00", 10.0, "P1"),
]


@pytest.fixture
def tiny_tx() -> pd.DataFrame:
    return tx(TINY_ROWS)


@pytest.fixture
def tracking(tmp_path: Path) -> Iterator[str]:
    """A fresh MLflow sqlite store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def needs_shared(*parts: str) -> Path:
    """A path under ../shared, or skip the test when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (shared data is for developers and CI only)")
    return path


@dataclass(frozen=True)
class TrainedPipeline:
    """Ingest, features, train and evaluate run once on the bundled data, with a store."""

    settings: Settings
    root: Path
    tracking_uri: str
    model_version: str
    run_id: str
    metrics: dict[str, Any]
    promoted: bool


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Iterator[TrainedPipeline]:
    from churn import evaluate, features, ingest, train

    root = tmp_path_factory.mktemp("pipeline")
    (root / "data" / "events").mkdir(parents=True)
    # Two tuning trials (the default is more) keep the suite quick and still nest runs.
    params = merge(
        project_params(),
        {"data": {"transactions": {"path": str(SAMPLE)}}, "train": {"n_trials": 2}},
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    settings = settings_from_dict(params, root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    ingest.run(settings.data, settings.paths)
    features.run(settings.features, settings.paths)
    trained = train.run(settings.train, settings.mlflow, settings.paths, seed=settings.seed)
    evaluated = evaluate.run(
        settings.evaluate,
        settings.gate,
        settings.mlflow,
        settings.paths,
        horizon_days=90,
        btyd_fit_customers=settings.features.btyd_fit_customers,
    )
    yield TrainedPipeline(
        settings,
        root,
        uri,
        trained.model_version,
        trained.run_id,
        evaluated.metrics,
        evaluated.promoted,
    )
    mlflow.set_tracking_uri(previous)


def unsaved_model(fitted: Fitted, folder: Path) -> ChurnModel:
    """The :class:`churn.model.ChurnModel` of a ``train.build_model`` result, its artifacts
    written to ``folder``, without MLflow."""
    from types import SimpleNamespace

    from churn.model import ChurnModel, write_artifacts

    model = ChurnModel()
    model.load_context(
        SimpleNamespace(artifacts=write_artifacts(fitted.booster, fitted.card, folder))
    )
    return model


def snapshot_aucs(
    features_dir: Path, settings: Settings, model_dir: Path
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Train a model on the snapshots in ``features_dir`` (no tracking store), score its test
    snapshot, and return that snapshot with the ROC-AUC of the model and both BTYD models."""
    from sklearn.metrics import roc_auc_score

    from churn import evaluate, train
    from churn.features import LABEL

    snapshots = pd.read_parquet(features_dir / "train.parquet")
    spec = json.loads((features_dir / "spec.json").read_text())
    fitted = train.build_model(snapshots, settings.train, spec, seed=settings.seed)
    model = unsaved_model(fitted, model_dir)
    test = pd.read_parquet(features_dir / "test.parquet")
    btyd = evaluate.btyd_probabilities(
        test, settings.features.horizon_days, settings.features.btyd_fit_customers
    )
    scorers = {"model": model.predict_proba(test), **btyd}
    return test, {name: roc_auc_score(test[LABEL], p) for name, p in scorers.items()}
