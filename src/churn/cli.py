"""Command line: one command per pipeline stage, called by ``dvc.yaml`` and by batch jobs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from churn import ChurnError

app = typer.Typer(
    help="Customer churn pipeline. The stages ingest, features, train, evaluate, score and "
    "report run in that order (`dvc repro` runs them all); promote and rollback move the "
    "registry's champion alias; synth writes synthetic data and bench times the pipeline on it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("churn")

ParamsOption = Annotated[Path, typer.Option("--params", help="Path of params.yaml.")]


@dataclasses.dataclass
class _State:
    params: Path = Path("params.yaml")


state = _State()


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, for log collectors (``CHURN_LOG_FORMAT=json``)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _setup_logging() -> None:
    level = os.environ.get("CHURN_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        raise ChurnError(f"CHURN_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
    handler = logging.StreamHandler()
    if os.environ.get("CHURN_LOG_FORMAT", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


@app.callback()
def main_callback(params: ParamsOption = Path("params.yaml")) -> None:
    """Set up logging (CHURN_LOG_LEVEL, CHURN_LOG_FORMAT=text|json); stages read PARAMS."""
    _setup_logging()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    state.params = params


def _settings():
    from churn.config import load_settings

    return load_settings(state.params)


def _require(stage: str, *paths: Path) -> None:
    """Stop with one line when a file that ``churn STAGE`` writes is missing."""
    for path in paths:
        if not path.exists():
            raise ChurnError(f"{path}: not found; run `churn {stage}` first (or `dvc repro`)")


def _tracking(settings) -> None:
    """Point MLflow at ``MLFLOW_TRACKING_URI``, else params, else ``mlflow.db`` beside params."""
    import mlflow

    uri = (
        os.environ.get("MLFLOW_TRACKING_URI")
        or settings.mlflow.tracking_uri
        or f"sqlite:///{state.params.resolve().parent / 'mlflow.db'}"
    )
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    log.info("MLflow tracking at %s", uri)


@app.command()
def ingest() -> None:
    """Read the transaction exports into the canonical table; quarantine unusable rows."""
    from churn import ingest as stage

    settings = _settings()
    s = stage.run(settings.data, settings.paths, engine=settings.backend)
    log.info(
        "ingest: read %d rows, kept %d, rejected %d %s, removed %d duplicates; %d customers",
        s.rows_read,
        s.rows_kept,
        s.rows_rejected,
        s.rejected_by_reason,
        s.duplicates_removed,
        s.customers,
    )


@app.command()
def features() -> None:
    """Build point-in-time train, test and scoring snapshots."""
    from churn import features as stage

    settings = _settings()
    _require("ingest", settings.paths.transactions, settings.paths.events)
    s = stage.run(
        settings.features,
        settings.paths,
        families=tuple(settings.data.events.families),
        engine=settings.backend,
    )
    log.info(
        "features: train cutoffs %s, test %s, as-of %s; rows %s",
        [str(c) for c in s.plan.train],
        s.plan.test,
        s.plan.as_of,
        s.rows,
    )


@app.command()
def train() -> None:
    """Train, calibrate, log and register the LightGBM churn model."""
    from churn import train as stage

    settings = _settings()
    snapshots = settings.paths.features
    _require("features", snapshots / "train.parquet", snapshots / "spec.json")
    _tracking(settings)
    s = stage.run(
        settings.train,
        settings.mlflow,
        settings.paths,
        seed=settings.seed,
        drift_bins=settings.drift.bins,
    )
    log.info(
        "train: run %s, model version %s, %d trees, validation AUC %.4f",
        s.run_id,
        s.model_version,
        s.best_iteration,
        s.validation_auc,
    )


@app.command()
def evaluate() -> None:
    """Compare the model with the baselines out of time; gate the champion alias."""
    from churn import evaluate as stage

    settings = _settings()
    snapshots = settings.paths.features
    _require("features", snapshots / "train.parquet", snapshots / "test.parquet")
    _require("train", settings.paths.model, settings.paths.model_info)
    _tracking(settings)
    s = stage.run(
        settings.evaluate,
        settings.gate,
        settings.mlflow,
        settings.paths,
        horizon_days=settings.features.horizon_days,
        btyd_fit_customers=settings.features.btyd_fit_customers,
    )
    log.info(
        "evaluate: model ROC-AUC %.4f (recency %.4f, rfm %.4f); champion: %s",
        s.metrics["model"]["roc_auc"],
        s.metrics["baselines"]["recency"]["roc_auc"],
        s.metrics["baselines"]["rfm"]["roc_auc"],
        "promoted" if s.promoted else "kept",
    )


@app.command()
def score(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model to load: a directory or an MLflow URI such as models:/churn@champion. "
            "Default: the pipeline's model directory."
        ),
    ] = None,
    transactions: Annotated[
        Path | None,
        typer.Option(
            help="Canonical transactions Parquet (written by `churn ingest`). Default: the "
            "pipeline's scoring snapshot."
        ),
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="Scoring date YYYY-MM-DD (with --transactions). Default: the day "
            "after the last transaction.",
        ),
    ] = None,
    events: Annotated[
        Path | None,
        typer.Option(
            help="Canonical events Parquet (with --transactions), when the model "
            "was trained with engagement events."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="CSV to write. Default: paths.retention_list. Another file gets its drift and "
            "campaign reports beside it (OUT-STEM.drift.json, OUT-STEM.campaign.json)."
        ),
    ] = None,
    allow_drift: Annotated[
        bool, typer.Option(help="Write the list even when drift exceeds drift.fail_psi.")
    ] = False,
    xlsx: Annotated[
        bool, typer.Option(help="Also write the list as an Excel workbook beside the CSV.")
    ] = False,
) -> None:
    """Score every active customer into the retention list.

    Exit codes: 2 bad input or params, 3 model contract mismatch, 4 drift above
    drift.fail_psi.
    """
    import tempfile

    from churn import score as stage
    from churn.io import write_parquet
    from churn.model import load_model

    settings = _settings()
    if transactions is None and (as_of is not None or events is not None):
        raise ChurnError(
            "--as-of and --events go with --transactions; without it the pipeline's scoring "
            "snapshot is scored (built at features.as_of by `churn features`)"
        )
    if model is None:
        _require("train", settings.paths.model, settings.paths.model_info)
    else:
        _tracking(settings)
    if transactions is None:
        snapshots = settings.paths.features
        _require("features", snapshots / "score.parquet", snapshots / "spec.json")
    else:
        stage.require_canonical(transactions, events)
    uri = model or str(settings.paths.model)
    churn_model = load_model(uri)
    if Path(uri).resolve() == settings.paths.model.resolve():  # the pipeline's own model
        _require("train", settings.paths.model_info)
        version = json.loads(settings.paths.model_info.read_text())["model_version"]
    else:
        version = _registry_version(uri)
    retention_list, drift_report, campaign_report = stage.report_paths(out, settings.paths)
    job = stage.ScoreJob(
        out=retention_list,
        drift_report=drift_report,
        campaign_report=campaign_report,
        model_version=version,
        allow_drift=allow_drift,
        xlsx=xlsx,
    )
    with tempfile.TemporaryDirectory(prefix="churn-snapshot-") as folder:
        snapshot = settings.paths.features / "score.parquet"
        if transactions is not None:  # built here, then scored like the pipeline's snapshot
            frame, spec = stage.scoring_snapshot(
                transactions,
                _as_of(as_of, transactions),
                settings.features,
                events=events,
                families=tuple(settings.data.events.families),
                engine=settings.backend,
            )
            snapshot = Path(folder) / "score.parquet"
            write_parquet(frame, snapshot)
        else:
            spec = json.loads((settings.paths.features / "spec.json").read_text())
        s = stage.run(
            snapshot,
            spec,
            churn_model,
            job,
            settings=settings.score,
            drift=settings.drift,
            actions=settings.actions,
            campaign=settings.campaign,
            memory=settings.backend.duckdb,
        )
    log.info(
        "score: %d customers as of %s, by tier %s; drift %s; selected %d for %.2f, "
        "expected value saved %.2f (top-by-probability list: %.2f)",
        s.customers,
        s.as_of,
        s.by_tier,
        s.drift,
        s.campaign["value_based"]["customers"],
        s.campaign["value_based"]["spend"],
        s.campaign["value_based"]["expected_value_saved"],
        s.campaign["top_probability"]["expected_value_saved"],
    )


@app.command()
def report() -> None:
    """Write the self-contained HTML report for the marketing team."""
    from churn import report as stage

    settings = _settings()
    _require("score", settings.paths.retention_list, settings.paths.campaign_report)
    _require("evaluate", settings.paths.metrics, settings.paths.plots / "gains.csv")
    s = stage.run(settings.paths)
    log.info("report: %s (%d customers, value at risk %.0f)", s.path, s.customers, s.value_at_risk)


@app.command()
def promote(version: Annotated[str, typer.Argument(help="Registry version to make champion.")]):
    """Point the champion alias at VERSION (the one it leaves can be restored by rollback)."""
    from churn import registry

    settings = _settings()
    _tracking(settings)
    old = registry.promote(settings.mlflow.registered_model, version)
    log.info("champion: version %s (was %s)", version, old)


@app.command()
def rollback() -> None:
    """Move the champion alias back to the version it replaced last."""
    from churn import registry

    settings = _settings()
    _tracking(settings)
    version = registry.rollback(settings.mlflow.registered_model)
    log.info("champion: rolled back to version %s", version)


_SYNTH_OPTIONS = {"n_customers": "--customers", "months": "--months", "seed": "--seed"}


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder for the Parquet files (created if missing).")],
    customers: Annotated[int, typer.Option(help="Customers signing up over the window.")] = 1000,
    months: Annotated[int, typer.Option(help="Window length in months.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed; equal options give equal data.")] = 0,
    start: Annotated[str, typer.Option(help="First day of the window, YYYY-MM-DD.")] = "2022-01-01",
) -> None:
    """Write synthetic transactions, events and true churn times (truth) to OUT.

    The files are ``transactions.parquet``, ``events.parquet`` and ``truth.parquet``, with the
    canonical column names: point ``data.transactions.path`` and ``data.events.path`` at the
    first two.
    """
    from churn import synth as generator

    try:
        first = date.fromisoformat(start)
    except ValueError:
        raise ChurnError(f"--start: expected a date YYYY-MM-DD, got {start!r}") from None
    try:
        spec = generator.SynthSpec(n_customers=customers, months=months, seed=seed, start=first)
    except generator.SynthSpecError as exc:
        option = _SYNTH_OPTIONS.get(exc.field, f"SynthSpec.{exc.field}")
        raise ChurnError(f"{option}: {exc.problem}") from None
    data = generator.generate(spec)
    paths = generator.write(data, out)
    churned = int(data.truth["churn_ts"].notna().sum())
    for name, path in paths.items():
        typer.echo(f"{path}: {len(getattr(data, name))} rows")
    typer.echo(f"{customers} customers, {churned} churned before the window ended")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Benchmark the pipeline on synthetic data (1M and 10M rows) into reports/bench.json.

    Runs the harness in the repository's ``benchmarks/`` folder (run from the repository
    root); its options pass through: --sizes N..., --100m, --repeats N, --out PATH,
    --btyd-fit-customers N.
    """
    harness = Path.cwd() / "benchmarks" / "run.py"
    if not harness.is_file():
        raise ChurnError(f"{harness}: not found; run `churn bench` from the repository root")
    sys.path.insert(0, str(harness.parents[1]))
    from benchmarks.run import main as run_benchmarks

    run_benchmarks(list(ctx.args))


def _as_of(text: str | None, transactions: Path) -> date:
    if text is None:
        import pandas as pd

        last = pd.read_parquet(transactions, columns=["ts"])["ts"].max()
        return (last + pd.Timedelta(days=1)).date()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ChurnError(f"--as-of: expected a date YYYY-MM-DD, got {text!r}") from None


def _registry_version(uri: str) -> str:
    """The registry version behind ``models:/name@alias`` or ``models:/name/N``; else the URI
    (a ``runs:/`` URI or a model directory other than the pipeline's) as given."""
    if not uri.startswith("models:/"):
        return uri
    import mlflow

    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, ref).version)
    return name.rpartition("/")[2]


def main() -> None:
    """Entry point: expected problems become one line on stderr and a non-zero exit code."""
    try:
        app()
    except ChurnError as exc:
        print(f"churn: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
