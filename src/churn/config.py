"""``params.yaml`` parsed once into frozen, validated settings.

Nothing else in the package opens ``params.yaml``: the CLI loads a :class:`Settings` and hands
each stage the section it needs.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import yaml

from churn import ChurnError

CANONICAL_COLUMNS = (
    "customer_id",
    "ts",
    "order_id",
    "amount",
    "quantity",
    "unit_price",
    "product_id",
    "channel",
    "currency",
    "country",
    "status",
)
EVENT_COLUMNS = ("customer_id", "ts", "event_type", "value")
FORMATS = ("auto", "csv", "parquet", "excel")
ENGINES = ("duckdb", "spark")
DECIMAL_SEPARATORS = (".", ",")  # data.*.decimal_separator: "5.95" or "5,95"
# data.*.ts_format for times written as numbers: Unix time in a unit (numbers per second), or
# whole days counted from a date ("days since 2020-01-01": 0 is that day, 1 the next).
UNIX_TIME_UNITS = {"unix_s": 1, "unix_ms": 1_000, "unix_us": 1_000_000}
DAYS_SINCE = re.compile(r"days since (\d{4}-\d\d-\d\d)")
ATTRIBUTIONS = ("treeshap", "path")  # score.attribution: exact TreeSHAP, or path (Saabas)
RFM_SEGMENTS = (
    "Champions",
    "Loyal",
    "Potential",
    "New",
    "At risk",
    "Can't lose",
    "Hibernating",
    "Lost",
)
LOW = "low"  # the tier / value band of whatever no threshold reaches
AUTO_MEMORY_SHARE = 4  # duckdb.memory_limit: auto is the machine's memory over this


class ParamsError(ChurnError):
    """``params.yaml`` is missing, malformed, or holds a value out of range."""


@dataclass(frozen=True)
class Paths:
    transactions: Path
    rejects: Path
    events: Path
    event_rejects: Path
    ingest_report: Path
    features: Path
    model: Path
    model_info: Path
    metrics: Path
    plots: Path
    gate_report: Path
    drift_report: Path
    campaign_report: Path
    retention_list: Path
    report: Path


@dataclass(frozen=True)
class TransactionSource:
    path: tuple[Path, ...]
    columns: dict[str, str | None]
    format: str = "auto"
    ts_format: str | None = None
    csv_delimiter: str = ","
    csv_encoding: str = "utf-8"
    decimal_separator: str = "."  # in numbers given as text: amount, quantity, unit_price
    return_order_prefix: str | None = "C"
    timezone: str = "UTC"
    reporting_currency: str | None = None
    currency_rates: dict[str, float] = field(default_factory=dict)  # to the reporting currency
    # Values of columns.status (any case) of lines that are no purchase: left out as rejects.
    excluded_statuses: tuple[str, ...] = ("cancelled", "canceled", "failed", "voided")

    def conversion_rates(self) -> dict[str, float]:
        """Reporting-currency units per unit of each currency code (upper case), itself
        included at 1; empty when the export has no currency column."""
        if not self.columns.get("currency"):
            return {}
        rates = {code.strip().upper(): rate for code, rate in self.currency_rates.items()}
        return {str(self.reporting_currency).strip().upper(): 1.0, **rates}

    def statuses_left_out(self) -> tuple[str, ...]:
        """The ``excluded_statuses`` trimmed and in lower case; empty when the export has no
        status column."""
        if not self.columns.get("status"):
            return ()
        return tuple(status.strip().lower() for status in self.excluded_statuses)


@dataclass(frozen=True)
class NumberTime:
    """How a ``ts_format`` reads times written as numbers: Unix time, ``per_second``
    numbers a second, or whole days after ``origin``."""

    per_second: int | None = None
    origin: date | None = None


def number_time(ts_format: str | None) -> NumberTime | None:
    """The :class:`NumberTime` a ``ts_format`` names; None for a strptime format or none.

    >>> number_time("unix_ms")
    NumberTime(per_second=1000, origin=None)
    >>> number_time("days since 2020-01-01")
    NumberTime(per_second=None, origin=datetime.date(2020, 1, 1))
    """
    if ts_format in UNIX_TIME_UNITS:
        return NumberTime(per_second=UNIX_TIME_UNITS[ts_format])
    days = DAYS_SINCE.fullmatch(ts_format or "")
    return NumberTime(origin=date.fromisoformat(days.group(1))) if days else None


@dataclass(frozen=True)
class EventSource:
    """Optional engagement events (visits, email opens, tickets, survey answers...)."""

    path: tuple[Path, ...] = ()
    columns: dict[str, str | None] = field(default_factory=lambda: {c: c for c in EVENT_COLUMNS})
    families: dict[str, tuple[str, ...]] = field(default_factory=dict)
    format: str = "auto"
    ts_format: str | None = None
    csv_delimiter: str = ","
    csv_encoding: str = "utf-8"
    decimal_separator: str = "."  # in values given as text
    timezone: str = "UTC"


@dataclass(frozen=True)
class DataSettings:
    transactions: TransactionSource
    events: EventSource = field(default_factory=EventSource)


@dataclass(frozen=True)
class FeatureSettings:
    horizon_days: int = 90
    active_lookback_days: int = 365
    n_snapshots: int = 4
    snapshot_step_days: int = 30
    test_cutoff: date | None = None
    as_of: date | None = None
    windows_days: tuple[int, ...] = (30, 90, 180, 365)
    btyd_fit_customers: int = 50_000
    annual_discount_rate: float = 0.1
    # Channel values (any case) that count as online; left empty without a channel column.
    online_channels: tuple[str, ...] = ()
    # Whether the lines have a country: set from data.transactions.columns.country, not a key.
    country: bool = field(default=False, metadata={"derived": True})


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 0.03
    num_leaves: int = 15
    min_child_samples: int = 40
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    max_rounds: int = 2000
    early_stopping_rounds: int = 100
    eval_every: int = 10  # trees between two measures of the validation AUC
    n_trials: int = 5  # Optuna trials over the LightGBM parameters; 0 = use them as given
    max_rows: int = 1_000_000
    tune_rows: int = 200_000  # fitting and validation rows each trial uses at most
    num_threads: int = 0  # LightGBM's threads; 0 = every CPU this process may use


@dataclass(frozen=True)
class MlflowSettings:
    experiment: str = "churn"
    registered_model: str = "churn"
    tracking_uri: str | None = None
    artifact_location: str | None = None  # for a new experiment; None = beside a sqlite store


@dataclass(frozen=True)
class EvaluateSettings:
    top_fraction: float = 0.1
    capture_fraction: float = 0.2
    calibration_bins: int = 10


@dataclass(frozen=True)
class GateSettings:
    max_auc_drop: float = 0.0
    max_ece: float = 0.25


@dataclass(frozen=True)
class DriftSettings:
    bins: int = 10
    warn_psi: float = 0.1
    fail_psi: float = 0.5
    exempt: tuple[str, ...] = ("tenure_days",)


@dataclass(frozen=True)
class ScoreSettings:
    risk_tiers: dict[str, float] = field(default_factory=lambda: {"high": 0.7, "medium": 0.4})
    n_reasons: int = 3
    chunk_rows: int = 100_000
    attribution: str = "treeshap"
    num_threads: int = 0  # batches explained at once; 0 = every CPU this process may use


@dataclass(frozen=True)
class Action:
    """A retention action: what one contact costs and the share of churners it keeps."""

    label: str
    cost: float
    save_rate: float


@dataclass(frozen=True)
class ActionRule:
    """Customers in these segments, risk tiers and value bands get ``action`` (``*`` = all)."""

    action: str
    segments: tuple[str, ...] = ("*",)
    tiers: tuple[str, ...] = ("*",)
    values: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class ActionSettings:
    catalogue: dict[str, Action]
    rules: tuple[ActionRule, ...]
    value_bands: dict[str, float] = field(default_factory=lambda: {"high": 0.8, "medium": 0.5})


@dataclass(frozen=True)
class CampaignSettings:
    budget: float = 5000.0


@dataclass(frozen=True)
class SparkSettings:
    """The Spark session ``engine: spark`` runs on: any master URL, extra ``spark.*`` config."""

    master: str = "local[*]"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DuckDBSettings:
    """Embedded DuckDB's memory: above ``memory_limit`` it spills to the system temp folder;
    ``auto`` is a quarter of the machine's memory (see :func:`duckdb_memory_limit`)."""

    memory_limit: str = "auto"


@dataclass(frozen=True)
class Engine:
    """Where row-level work (ingest, features, scoring features) runs."""

    name: str = "duckdb"
    spark: SparkSettings = field(default_factory=SparkSettings)
    duckdb: DuckDBSettings = field(default_factory=DuckDBSettings)


@dataclass(frozen=True)
class Settings:
    paths: Paths
    data: DataSettings
    features: FeatureSettings
    train: TrainSettings
    mlflow: MlflowSettings
    evaluate: EvaluateSettings
    gate: GateSettings
    drift: DriftSettings
    score: ScoreSettings
    actions: ActionSettings
    campaign: CampaignSettings
    seed: int = 42
    engine: str = "duckdb"
    spark: SparkSettings = field(default_factory=SparkSettings)
    duckdb: DuckDBSettings = field(default_factory=DuckDBSettings)

    @property
    def backend(self) -> Engine:
        """The engine and its session settings, as the stages take them."""
        return Engine(name=self.engine, spark=self.spark, duckdb=self.duckdb)


def load_settings(path: Path) -> Settings:
    """Read and validate ``params.yaml``; relative paths resolve against its folder.

    Raises
    ------
    ParamsError
        When the file is missing or unreadable, a key is unknown or missing, or a value has the
        wrong type or range. The message names the key.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    settings = _build(Settings, raw, "")
    settings = _resolve_paths(settings, path.parent.resolve())
    _validate(settings)
    return settings


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where PyYAML's error is (line and column from 1) and what it found, on one line:
    its own message spans several lines with a copy of the offending text."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:  # not a marked error, e.g. bytes that are not text
        return ": " + " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}: {' '.join(problem.split())}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and (start.line, start.column) != (mark.line, mark.column):
        where += f" ({context} from line {start.line + 1}, column {start.column + 1})"
    elif context:
        where += f" ({context})"
    return where + "; fix the syntax there"


def settings_from_dict(raw: dict[str, Any], root: Path) -> Settings:
    """Build settings from an already-parsed mapping (used by tests and notebooks)."""
    settings = _resolve_paths(_build(Settings, raw, ""), root.resolve())
    _validate(settings)
    return settings


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"params: '{where or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"params: unknown key(s) {unknown} in '{where or 'top level'}'; "
            f"allowed: {sorted(fields)}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"params: missing required key '{key}'")
            continue
        values[name] = _coerce(hints[name], raw[name], key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is tuple:
        items = [] if value is None else value if isinstance(value, list) else [value]
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"params: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is date:
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise ParamsError(f"params: '{key}' must be a date YYYY-MM-DD, got {value!r}") from None
    if hint is Path:
        return Path(str(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ParamsError(f"params: '{key}' must be {hint.__name__}, got {value!r}")


def _resolve_paths(settings: Settings, root: Path) -> Settings:
    paths = Paths(
        **{f.name: root / getattr(settings.paths, f.name) for f in dataclasses.fields(Paths)}
    )
    data = settings.data
    transactions = dataclasses.replace(
        data.transactions, path=tuple(root / p for p in data.transactions.path)
    )
    events = dataclasses.replace(data.events, path=tuple(root / p for p in data.events.path))
    features = settings.features
    if not transactions.columns.get("channel"):  # no channel, no channel mix
        features = dataclasses.replace(features, online_channels=())
    features = dataclasses.replace(features, country=bool(transactions.columns.get("country")))
    return dataclasses.replace(
        settings,
        paths=paths,
        data=DataSettings(transactions=transactions, events=events),
        features=features,
    )


def _validate(s: Settings) -> None:
    src = s.data.transactions
    unknown = sorted(set(src.columns) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ParamsError(
            f"params: data.transactions.columns has unknown canonical name(s) "
            f"{unknown}; allowed: {list(CANONICAL_COLUMNS)}"
        )
    for required in ("customer_id", "ts"):
        if not src.columns.get(required):
            raise ParamsError(f"params: data.transactions.columns.{required} must name a column")
    if not src.columns.get("amount") and not (
        src.columns.get("quantity") and src.columns.get("unit_price")
    ):
        raise ParamsError(
            "params: data.transactions.columns needs 'amount', or both 'quantity' and 'unit_price'"
        )
    _validate_currency(src)
    for section, source in (("transactions", src), ("events", s.data.events)):
        _validate_ts_format(section, source.ts_format)
        try:
            codecs.lookup(source.csv_encoding)
        except LookupError:
            raise ParamsError(
                f"params: data.{section}.csv_encoding {source.csv_encoding!r} is not an "
                "encoding: use e.g. utf-8, cp1252 (Windows exports) or latin-1"
            ) from None
        if source.decimal_separator not in DECIMAL_SEPARATORS:
            raise ParamsError(
                f"params: data.{section}.decimal_separator must be '.' or ',', "
                f"got {source.decimal_separator!r}"
            )
    if src.format not in FORMATS:
        raise ParamsError(
            f"params: data.transactions.format must be one of {FORMATS}, got {src.format!r}"
        )
    if s.engine not in ENGINES:
        raise ParamsError(f"params: engine must be one of {ENGINES}, got {s.engine!r}")
    if not s.spark.master.strip():
        raise ParamsError("params: spark.master must name a master URL, e.g. 'local[*]'")
    bad = sorted(k for k in s.spark.config if not k.startswith("spark."))
    if bad:
        raise ParamsError(f"params: spark.config keys must start with 'spark.', got {bad}")
    duckdb_memory_limit(s.duckdb.memory_limit)
    f = s.features
    _positive(
        "features",
        horizon_days=f.horizon_days,
        active_lookback_days=f.active_lookback_days,
        n_snapshots=f.n_snapshots,
        snapshot_step_days=f.snapshot_step_days,
        btyd_fit_customers=f.btyd_fit_customers,
    )
    if not 0 <= f.annual_discount_rate < 1:
        raise ParamsError(
            f"params: features.annual_discount_rate must be in [0, 1), got {f.annual_discount_rate}"
        )
    _positive("features.windows_days", **{str(w): w for w in f.windows_days})
    if f.n_snapshots < 2:
        raise ParamsError(
            f"params: features.n_snapshots must be >= 2 (the newest validates "
            f"the others), got {f.n_snapshots}"
        )
    if f.test_cutoff and f.as_of and f.test_cutoff > f.as_of:
        raise ParamsError(
            f"params: features.test_cutoff {f.test_cutoff} is after features.as_of {f.as_of}"
        )
    t = s.train
    _positive(
        "train",
        learning_rate=t.learning_rate,
        num_leaves=t.num_leaves,
        max_rounds=t.max_rounds,
        early_stopping_rounds=t.early_stopping_rounds,
        eval_every=t.eval_every,
        max_rows=t.max_rows,
        tune_rows=t.tune_rows,
    )
    if t.num_leaves < 2:
        raise ParamsError(f"params: train.num_leaves must be >= 2, got {t.num_leaves}")
    for name in ("n_trials", "num_threads", "min_child_samples", "bagging_freq", "lambda_l2"):
        if getattr(t, name) < 0:
            raise ParamsError(f"params: train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("feature_fraction", "bagging_fraction"):
        if not 0 < getattr(t, name) <= 1:
            raise ParamsError(f"params: train.{name} must be in (0, 1], got {getattr(t, name)}")
    e = s.evaluate
    for name in ("top_fraction", "capture_fraction"):
        if not 0 < getattr(e, name) < 1:
            raise ParamsError(f"params: evaluate.{name} must be in (0, 1), got {getattr(e, name)}")
    _positive("evaluate", calibration_bins=e.calibration_bins)
    if s.gate.max_auc_drop < 0 or not 0 < s.gate.max_ece <= 1:
        raise ParamsError(
            f"params: gate.max_auc_drop must be >= 0 and gate.max_ece in (0, 1], "
            f"got {s.gate.max_auc_drop} and {s.gate.max_ece}"
        )
    d = s.drift
    if d.bins < 2 or not 0 < d.warn_psi <= d.fail_psi:
        raise ParamsError(
            f"params: drift needs bins >= 2 and 0 < warn_psi <= fail_psi, got "
            f"bins={d.bins}, warn_psi={d.warn_psi}, fail_psi={d.fail_psi}"
        )
    _positive("score", chunk_rows=s.score.chunk_rows, n_reasons=s.score.n_reasons)
    if s.score.num_threads < 0:
        raise ParamsError(f"params: score.num_threads must be >= 0, got {s.score.num_threads}")
    if s.score.attribution not in ATTRIBUTIONS:
        raise ParamsError(
            f"params: score.attribution must be one of {ATTRIBUTIONS}, got {s.score.attribution!r}"
        )
    _validate_actions(s.actions, s.score.risk_tiers)
    if not all(0 < v < 1 for v in s.actions.value_bands.values()):
        raise ParamsError(
            f"params: actions.value_bands are quantiles in (0, 1), got {s.actions.value_bands}"
        )
    if s.campaign.budget < 0:
        raise ParamsError(f"params: campaign.budget must be >= 0, got {s.campaign.budget}")
    tiers = s.score.risk_tiers
    if not tiers or any(not 0 < v < 1 for v in tiers.values()):
        raise ParamsError(
            f"params: score.risk_tiers must map tier names to thresholds in (0, 1), got {tiers}"
        )
    _ranked("score.risk_tiers", tiers)
    _ranked("actions.value_bands", s.actions.value_bands)


def _ranked(key: str, thresholds: dict[str, float]) -> None:
    """A ``high`` threshold must lie above a ``medium`` one: swapped, the list would call
    the riskiest or most valuable customers medium."""
    if {"high", "medium"} <= set(thresholds) and thresholds["high"] <= thresholds["medium"]:
        raise ParamsError(
            f"params: {key}.high ({thresholds['high']}) must be above {key}.medium "
            f"({thresholds['medium']})"
        )


def duckdb_memory_limit(limit: str) -> str:
    """The size DuckDB gets for ``duckdb.memory_limit``: ``limit`` itself, or for ``auto``
    a quarter of the machine's memory (the rest holds the snapshots in pandas, LightGBM and
    the system), 4GB where the system does not tell it.

    Raises :class:`ParamsError` unless DuckDB's own parser reads the size.
    """
    if limit.strip().lower() == "auto":
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such value
            return "4GB"
        return f"{max(memory // AUTO_MEMORY_SHARE >> 20, 1024)}MiB"
    try:
        duckdb.connect(config={"memory_limit": limit}).close()
    except duckdb.Error:
        raise ParamsError(
            f"params: duckdb.memory_limit: {limit!r} is not a size; use e.g. 'auto', '4GB' "
            "or '512MB'"
        ) from None
    return limit


def _validate_ts_format(section: str, ts_format: str | None) -> None:
    """A ``ts_format`` is a strptime format (with a ``%`` directive) or names a
    :class:`NumberTime`."""
    if not ts_format or "%" in ts_format:
        return
    try:
        known = number_time(ts_format)
    except ValueError as exc:  # "days since" a date that does not exist
        raise ParamsError(f"params: data.{section}.ts_format {ts_format!r}: {exc}") from None
    if known is None:
        raise ParamsError(
            f"params: data.{section}.ts_format {ts_format!r} is not a strptime format (no % "
            'directive): write one such as "%d/%m/%Y %H:%M"; for times written as numbers, '
            f"{', '.join(UNIX_TIME_UNITS)} (Unix time in seconds, milliseconds, microseconds) "
            'or "days since 2020-01-01" (whole days counted from that date)'
        )


def _validate_currency(src: TransactionSource) -> None:
    if src.columns.get("currency") and not src.reporting_currency:
        raise ParamsError(
            "params: data.transactions.columns.currency is set, so "
            "data.transactions.reporting_currency must name the currency amounts are converted to"
        )
    bad = {code: rate for code, rate in src.currency_rates.items() if not rate > 0}
    if bad:
        raise ParamsError(f"params: data.transactions.currency_rates must be > 0, got {bad}")
    reporting = (src.reporting_currency or "").strip().upper()
    own = [rate for code, rate in src.currency_rates.items() if code.strip().upper() == reporting]
    if any(rate != 1 for rate in own):
        raise ParamsError(
            f"params: data.transactions.currency_rates gives the reporting currency {reporting} "
            f"the rate {own[0]}; it must be 1 (or left out)"
        )


def _validate_actions(actions: ActionSettings, tiers: dict[str, float]) -> None:
    """Every segment x tier x value band must resolve to exactly one known action."""
    unknown = sorted({r.action for r in actions.rules} - set(actions.catalogue))
    if unknown:
        raise ParamsError(
            f"params: actions.rules name unknown action(s) {unknown}; "
            f"actions.catalogue has {sorted(actions.catalogue)}"
        )
    for action in actions.catalogue.values():
        if action.cost < 0 or not 0 <= action.save_rate <= 1:
            raise ParamsError(
                f"params: action '{action.label}' needs cost >= 0 and save_rate "
                f"in [0, 1], got {action.cost} and {action.save_rate}"
            )
    grid = {"segments": RFM_SEGMENTS, "tiers": (*tiers, LOW), "values": (*actions.value_bands, LOW)}
    gaps, overlaps = [], []
    for cell in itertools.product(*grid.values()):
        hits = [
            r.action
            for r in actions.rules
            if all(
                "*" in getattr(r, axis) or value in getattr(r, axis)
                for axis, value in zip(grid, cell, strict=True)
            )
        ]
        if not hits:
            gaps.append(cell)
        elif len(hits) > 1:
            overlaps.append((cell, hits))
    if gaps or overlaps:
        raise ParamsError(
            "params: actions.rules must give every (segment, risk tier, value band) exactly one "
            f"action; {len(gaps)} without one, e.g. {gaps[:3]}; {len(overlaps)} with several, "
            f"e.g. {overlaps[:3]}"
        )


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ParamsError(f"params: {section}.{name} must be > 0, got {value}")
