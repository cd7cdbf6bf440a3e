"""Score stage: every customer active at the as-of date, ranked by churn risk.

Columns of the retention list, in order: see :func:`retention_columns` and the README.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from churn.actions import (
    assign_actions,
    campaign_summary,
    expected_value_saved,
    select_by_value,
    select_top_probability,
    value_bands,
)
from churn.config import (
    ActionSettings,
    CampaignSettings,
    DriftSettings,
    DuckDBSettings,
    Engine,
    FeatureSettings,
    Paths,
    ScoreSettings,
)
from churn.drift import DriftError, bin_counts, drift_status, psi
from churn.features import (
    customer_features,
    executed_snapshot,
    feature_spec,
    history,
    load_engagement,
    season_prior,
    snapshot_frame,
    with_day,
    with_season_prior,
)
from churn.io import (
    InputError,
    atomic_text,
    connect,
    map_in_threads,
    write_json,
    write_xlsx,
)
from churn.model import ChurnModel, usable_cpus
from churn.progress import progress
from churn.reasons import explain

log = logging.getLogger(__name__)

BASE_COLUMNS = (
    "customer_id",
    "as_of",
    "churn_probability",
    "risk_decile",
    "risk_tier",
    "rfm_segment",
    "customer_value",
    "value_band",
    "clv_12m",
    "value_at_risk",
    "recency_days",
    "frequency",
    "monetary",
)
ACTION_COLUMNS = ("action", "action_cost", "expected_value_saved", "selected", "model_version")


def retention_columns(n_reasons: int) -> list[str]:
    """The retention list's columns, in order: a contract documented in the README."""
    reasons = [f"reason_{i + 1}" for i in range(n_reasons)]
    return [*BASE_COLUMNS, *reasons, "top_reasons", *ACTION_COLUMNS]


@dataclass(frozen=True)
class ScoreSummary:
    customers: int
    as_of: str
    by_tier: dict[str, int]
    drift: str
    campaign: dict[str, Any]


def risk_deciles(probability: np.ndarray) -> np.ndarray:
    """Decile of each probability, 1 = riskiest tenth; ties broken by position.

    >>> risk_deciles(np.array([0.1, 0.9, 0.5, 0.3, 0.7])).tolist()
    [9, 1, 5, 7, 3]
    """
    order = np.argsort(-probability, kind="stable")
    ranks = np.empty(len(probability), dtype="int64")
    ranks[order] = np.arange(len(probability))
    return ranks * 10 // max(len(probability), 1) + 1


def risk_tiers(probability: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """Name each probability's tier: the highest threshold it reaches, else ``low``.

    >>> risk_tiers(np.array([0.8, 0.5, 0.1]), {"high": 0.7, "medium": 0.4}).tolist()
    ['high', 'medium', 'low']
    """
    ordered = sorted(thresholds.items(), key=lambda kv: -kv[1])
    return np.select([probability >= t for _, t in ordered], [n for n, _ in ordered], default="low")


def customer_value(snapshot: pd.DataFrame) -> np.ndarray:
    """Spend in the last 12 months net of the customer's return rate (never negative)."""
    kept = 1 - np.clip(snapshot["return_rate"].to_numpy("float64"), 0, 1)
    return np.clip(snapshot["spend_365d"].to_numpy("float64") * kept, 0, None)


def for_marketers(table: pd.DataFrame, n_reasons: int) -> pd.DataFrame:
    """The CSV view: contract columns, probabilities to 4 places, money to 2."""
    out = table[retention_columns(n_reasons)].copy()
    out["churn_probability"] = out["churn_probability"].round(4)
    for money in (
        "customer_value",
        "clv_12m",
        "value_at_risk",
        "monetary",
        "action_cost",
        "expected_value_saved",
    ):
        out[money] = out[money].round(2)
    return out


def require_canonical(*paths: Path | None) -> None:
    """Stop unless each path given is a Parquet file, as ``churn ingest`` writes them."""
    for path in paths:
        if path is None:
            continue
        if not path.is_file():
            raise InputError(
                f"{path}: file not found (expected a Parquet file `churn ingest` writes)"
            )
        with path.open("rb") as stream:
            if stream.read(4) != b"PAR1":
                raise InputError(
                    f"{path}: not a Parquet file (expected the canonical table `churn ingest` "
                    "writes from an export, not the export itself)"
                )


def scoring_snapshot(
    transactions: Path,
    as_of: date,
    settings: FeatureSettings,
    *,
    events: Path | None = None,
    families: tuple[str, ...] = (),
    engine: Engine | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Features of every customer active at ``as_of`` from canonical transaction (and event)
    files, with the spec they were built to; row-level work runs on ``engine``."""
    require_canonical(transactions, events)
    con = connect(engine)
    tx = with_day(con.read_parquet(transactions))
    engagement = load_engagement(con, events, families) if events else None
    spec = feature_spec(settings, engagement.families if engagement else ())
    past = history(tx, settings, engagement)
    frame, _ = snapshot_frame(executed_snapshot(customer_features(past, as_of, settings)), settings)
    return with_season_prior(frame, {as_of: season_prior(past, as_of, settings)}), spec


@dataclass(frozen=True)
class ScoreJob:
    """Where a scoring run writes, and how strict it is about drift."""

    out: Path
    drift_report: Path
    campaign_report: Path
    model_version: str
    allow_drift: bool = False
    xlsx: bool = False


def report_paths(out: Path | None, paths: Paths) -> tuple[Path, Path, Path]:
    """The retention list, drift report and campaign report a scoring run writes.

    Without ``out``, or with the pipeline's own list, the pipeline's paths. Any other ``out``
    gets its reports beside it, ``<stem>.drift.json`` and ``<stem>.campaign.json``: an
    ad-hoc run never changes the outputs the pipeline tracks.
    """
    if out is None or out.resolve() == paths.retention_list.resolve():
        return paths.retention_list, paths.drift_report, paths.campaign_report
    return out, out.with_name(f"{out.stem}.drift.json"), out.with_name(f"{out.stem}.campaign.json")


def _check_drift(report: dict[str, Any], drift: DriftSettings, job: ScoreJob) -> None:
    """Write the drift report; stop above ``drift.fail_psi`` unless allowed, else warn."""
    write_json(report, job.drift_report)
    failing = [k for k, v in report["columns"].items() if v["status"] == "fail"]
    if failing and not job.allow_drift:
        raise DriftError(
            f"population drift above drift.fail_psi={drift.fail_psi} in {failing} "
            f"(see {job.drift_report}); investigate the input, then pass --allow-drift to "
            "score anyway (under dvc repro: raise drift.fail_psi in params.yaml)"
        )
    moved = {k: v["psi"] for k, v in report["columns"].items() if v["status"] != "ok"}
    if moved:
        log.warning("drift above drift.warn_psi=%s: %s", drift.warn_psi, moved)


# --------------------------------------------------------------------------- streamed scoring
# The snapshot is read twice in batches of ``score.chunk_rows``. The first pass keeps only
# what ranking, value bands, actions and the budget need per customer (a few numbers and
# labels) and the drift bin counts; the second explains each batch and spills its finished
# rows with their rank to Parquet, which DuckDB writes in rank order as the CSV. Peak
# memory is that small per-customer table plus one batch, not the snapshot.

KEY_COLUMNS = (
    "customer_id",
    "cutoff",
    "rfm_segment",
    "return_rate",
    "spend_365d",
    "clv_12m",
    "season_prior",
)


@dataclass
class _Population:
    """Per-customer figures of the first pass, in file order, and drift bin counts."""

    key: pd.DataFrame
    counts: dict[str, np.ndarray]
    as_of: date


def _batches(file: pq.ParquetFile, columns: list[str], rows: int) -> Iterator[pd.DataFrame]:
    for batch in file.iter_batches(batch_size=rows, columns=columns):
        yield batch.to_pandas()


def _first_pass(file: pq.ParquetFile, model: ChurnModel, settings: ScoreSettings) -> _Population:
    columns = list(dict.fromkeys([*KEY_COLUMNS, *model.feature_names]))
    counts = {n: np.zeros(len(r["edges"]) + 2, "int64") for n, r in model.reference.items()}
    parts = []
    with progress("score: customers predicted", file.metadata.num_rows) as advance:
        for frame in _batches(file, columns, settings.chunk_rows):
            parts.append(_predict_batch(frame, model, counts))
            as_of = frame["cutoff"].iloc[0]
            advance(len(frame))
    return _Population(pd.concat(parts, ignore_index=True), counts, as_of)


def _predict_batch(
    frame: pd.DataFrame, model: ChurnModel, counts: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Probability, value and segment of one batch; its drift bin counts added to ``counts``."""
    references = model.reference
    # Drift compares the probability before its move to this season with the validation's.
    calibrated = model.validation_season_proba(frame)
    probability = model.in_season(calibrated, frame)
    for name in model.feature_names:
        if name in references:  # features the model cannot use are not profiled
            counts[name] += bin_counts(references[name], frame[name].to_numpy("float64"))
    counts["churn_probability"] += bin_counts(references["churn_probability"], calibrated)
    return pd.DataFrame(
        {
            "customer_id": frame["customer_id"].to_numpy(),
            "churn_probability": probability,
            "rfm_segment": frame["rfm_segment"].to_numpy(),
            "customer_value": customer_value(frame),
            "clv_12m": frame["clv_12m"].to_numpy("float64"),
        }
    )


def _ranked(
    key: pd.DataFrame, settings: ScoreSettings, actions: ActionSettings, budget: float
) -> tuple[pd.DataFrame, np.ndarray]:
    """Tier, decile, value band, action and selection of every customer, riskiest first
    (the retention list's order); column ``row`` is the position in the file."""
    probability = key["churn_probability"].to_numpy()
    value = key["customer_value"].to_numpy()
    table = key.assign(
        row=np.arange(len(key)),
        risk_decile=risk_deciles(probability),
        risk_tier=risk_tiers(probability, settings.risk_tiers),
        value_band=value_bands(value, actions.value_bands),
        value_at_risk=probability * key["clv_12m"].to_numpy(),
    )
    table["action"] = assign_actions(table, actions)
    table = expected_value_saved(table, actions)
    table = table.sort_values(
        ["risk_decile", "churn_probability", "customer_id"],
        ascending=[True, False, True],
        kind="stable",
    ).reset_index(drop=True)
    table["selected"] = select_by_value(table, budget)
    return table, select_top_probability(table, budget)


def _write_ranked_parts(
    file: pq.ParquetFile,
    model: ChurnModel,
    table: pd.DataFrame,
    folder: Path,
    *,
    settings: ScoreSettings,
    model_version: str,
    as_of: date,
) -> None:
    """Second pass: each batch explained and finished into marketer rows with their rank,
    written as a Parquet part. ``settings.num_threads`` batches (every usable CPU's when 0)
    are explained at once, which the attribution's NumPy and LightGBM work allows."""
    by_row = table.sort_values("row")
    rank = by_row.index.to_numpy()
    columns = list(
        dict.fromkeys([*KEY_COLUMNS, "recency_days", "frequency", "monetary", *model.feature_names])
    )
    model.prepare_attribution(settings.attribution)  # shared by the threads, built once

    def numbered(batches: Iterator[pd.DataFrame]) -> Iterator[tuple[int, int, pd.DataFrame]]:
        start = 0
        for part, frame in enumerate(batches):
            yield part, start, frame
            start += len(frame)

    def finish(item: tuple[int, int, pd.DataFrame]) -> int:
        part, start, frame = item
        stop = start + len(frame)
        out = _finished_rows(
            frame,
            by_row.iloc[start:stop].reset_index(drop=True),
            model,
            settings,
            model_version=model_version,
            as_of=as_of,
        )
        out["_rank"] = rank[start:stop]
        rows = pa.Table.from_pandas(out, preserve_index=False)
        pq.write_table(rows, folder / f"{part:06d}.parquet")
        return len(frame)

    batches = numbered(_batches(file, columns, settings.chunk_rows))
    with progress("score: customers explained", file.metadata.num_rows) as advance:
        for rows in map_in_threads(finish, batches, settings.num_threads or usable_cpus()):
            advance(rows)


def _finished_rows(
    frame: pd.DataFrame,
    rows: pd.DataFrame,
    model: ChurnModel,
    settings: ScoreSettings,
    *,
    model_version: str,
    as_of: date,
) -> pd.DataFrame:
    """Marketer rows of one batch (``rows``: its customers' ranked figures, same order)."""
    out = pd.DataFrame(
        {
            "customer_id": frame["customer_id"].to_numpy(),
            "as_of": as_of.isoformat(),
            "churn_probability": rows["churn_probability"].to_numpy(),
            "risk_decile": rows["risk_decile"].to_numpy(),
            "risk_tier": rows["risk_tier"].to_numpy(),
            "rfm_segment": frame["rfm_segment"].to_numpy(),
            "customer_value": rows["customer_value"].to_numpy(),
            "value_band": rows["value_band"].to_numpy(),
            "clv_12m": rows["clv_12m"].to_numpy(),
            "value_at_risk": rows["value_at_risk"].to_numpy(),
            "recency_days": frame["recency_days"].to_numpy(),
            "frequency": frame["frequency"].to_numpy(),
            "monetary": frame["monetary"].to_numpy(dtype="float64"),
            "model_version": model_version,
        }
    )
    contributions = model.contributions(frame, settings.attribution)
    reasons = explain(contributions, frame, n=settings.n_reasons)
    out = out.join(reasons.reset_index(drop=True))
    for column in ("action", "action_cost", "expected_value_saved", "selected"):
        out[column] = rows[column].to_numpy()
    return for_marketers(out, settings.n_reasons)


def _write_in_rank_order(folder: Path, target: Path, memory: DuckDBSettings) -> None:
    """The spilled rows, in rank order, as the CSV pandas would write (``utf-8-sig``,
    ``selected`` as True/False, nothing for an empty text).

    DuckDB sorts and writes them whatever the engine, within ``memory.memory_limit``; above
    it, the sort spills beside the rows."""
    con = connect(Engine(duckdb=memory)).con
    con.execute(f"SET temp_directory = '{folder / 'sort'}'")
    parts = f"read_parquet('{folder}/*.parquet')"
    # DuckDB quotes an empty text (""), pandas leaves the field empty as for a null.
    described = con.execute(f"DESCRIBE SELECT * FROM {parts}").fetchall()
    replace = [f"nullif({n}, '') AS {n}" for n, kind, *_ in described if kind == "VARCHAR"]
    replace.append("if(selected, 'True', 'False') AS selected")
    body = folder / "retention_list.csv"
    con.execute(
        f"COPY (SELECT * EXCLUDE (_rank) REPLACE ({', '.join(replace)}) FROM {parts} "
        f"ORDER BY _rank) TO '{body}' (FORMAT csv, HEADER)"
    )
    with atomic_text(target, encoding="utf-8-sig") as stream, body.open(newline="") as rows:
        shutil.copyfileobj(rows, stream, 1 << 24)  # 16M characters at a time


def run(
    snapshot: Path,
    spec: dict[str, Any],
    model: ChurnModel,
    job: ScoreJob,
    *,
    settings: ScoreSettings,
    drift: DriftSettings,
    actions: ActionSettings,
    campaign: CampaignSettings,
    memory: DuckDBSettings | None = None,
) -> ScoreSummary:
    """Check the model's contract and drift, then write the retention list, drift and
    campaign reports of a snapshot Parquet file, read in batches of ``settings.chunk_rows``:
    memory grows with a few numbers per customer, not with the snapshot. The rows are put
    in rank order within ``memory`` (DuckDB's limit; its default when None).

    ``spec`` describes how the snapshot was built (``feature_hash``, ``horizon_days``).

    Raises
    ------
    ModelError
        When the model was trained on other feature definitions, horizon or columns.
    DriftError
        When a population moved beyond ``drift.fail_psi`` and ``job.allow_drift`` is off;
        the drift report is written, the retention list is not.
    """
    memory = memory or DuckDBSettings()
    file = pq.ParquetFile(snapshot)
    if file.metadata.num_rows == 0:
        raise InputError("no customer is active at the as-of date: nothing to score")
    model.check_contract(
        feature_hash=spec["feature_hash"],
        horizon_days=spec["horizon_days"],
        columns=file.schema_arrow.names,
    )
    population = _first_pass(file, model, settings)
    as_of = population.as_of
    psis = {name: psi(model.reference[name], c) for name, c in population.counts.items()}
    report = {
        "as_of": str(as_of),
        **drift_status(psis, warn_psi=drift.warn_psi, fail_psi=drift.fail_psi, exempt=drift.exempt),
    }
    _check_drift(report, drift, job)
    table, naive = _ranked(population.key, settings, actions, campaign.budget)
    summary = campaign_summary(table, table["selected"].to_numpy(), naive, campaign.budget)
    write_json(summary, job.campaign_report)
    log.info("writing %d rows to %s", len(table), job.out)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    # Spilled rows go to the system temp folder: a killed job leaves nothing beside the list.
    with tempfile.TemporaryDirectory(prefix="churn-score-") as tmp:
        _write_ranked_parts(
            file,
            model,
            table,
            Path(tmp),
            settings=settings,
            model_version=job.model_version,
            as_of=as_of,
        )
        _write_in_rank_order(Path(tmp), job.out, memory)
    if job.xlsx:
        write_xlsx(
            pd.read_csv(job.out, encoding="utf-8-sig", dtype=str, keep_default_na=False),
            job.out.with_suffix(".xlsx"),
        )
    return ScoreSummary(
        customers=len(table),
        as_of=as_of.isoformat(),
        by_tier=table["risk_tier"].value_counts().to_dict(),
        drift=report["status"],
        campaign=summary,
    )
