from __future__ import annotations

from datetime import date

import pytest

from churn.config import Engine, ParamsError, SparkSettings, load_settings
from tests.conftest import ROOT


def test_project_params_load():
    settings = load_settings(ROOT / "params.yaml")
    assert settings.features.horizon_days == 90
    assert settings.features.windows_days == (30, 90, 180, 365)
    assert settings.data.transactions.path == (ROOT / "data" / "sample",)
    assert settings.paths.metrics == ROOT / "reports" / "metrics.json"
    assert settings.backend == Engine(name="duckdb", spark=SparkSettings(master="local[*]"))


def test_spark_engine_settings(make_settings):
    settings = make_settings(
        engine="spark",
        spark={"master": "spark://head:7077", "config": {"spark.executor.memory": "8g"}},
    )
    assert settings.backend.name == "spark"
    assert settings.backend.spark.master == "spark://head:7077"
    assert settings.backend.spark.config == {"spark.executor.memory": "8g"}


def test_dates_and_lists_are_parsed(make_settings):
    settings = make_settings(
        features={"test_cutoff": "2011-09-10"}, data={"transactions": {"path": ["a.csv", "b.csv"]}}
    )
    assert settings.features.test_cutoff == date(2011, 9, 10)
    assert [p.name for p in settings.data.transactions.path] == ["a.csv", "b.csv"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"features": {"horizon_days": 0}}, r"features.horizon_days must be > 0, got 0"),
        ({"features": {"horizon_dayz": 90}}, r"unknown key\(s\) \['horizon_dayz'\]"),
        ({"features": {"n_snapshots": "four"}}, r"'features.n_snapshots' must be int"),
        ({"features": {"test_cutoff": "next week"}}, r"must be a date YYYY-MM-DD"),
        ({"train": {"feature_fraction": 1.5}}, r"train.feature_fraction must be in \(0, 1\]"),
        ({"train": {"num_threads": -1}}, r"train.num_threads must be >= 0, got -1"),
        ({"score": {"num_threads": -2}}, r"score.num_threads must be >= 0, got -2"),
        ({"data": {"transactions": {"columns": {"ts": None}}}}, r"columns.ts must name"),
        (
            {"data": {"transactions": {"columns": {"amount": None, "unit_price": None}}}},
            r"needs 'amount', or both 'quantity' and 'unit_price'",
        ),
        ({"data": {"transactions": {"format": "xml"}}}, r"format must be one of"),
        (
            {"data": {"events": {"decimal_separator": ";"}}},
            r"data.events.decimal_separator must be '.' or ',', got ';'",
        ),
        (
            {"data": {"transactions": {"ts_format": "DD/MM/YYYY"}}},
            r"data.transactions.ts_format 'DD/MM/YYYY' is not a strptime format \(no % "
            r'directive\): write one such as "%d/%m/%Y %H:%M"; for times written as numbers, '
            r"unix_s, unix_ms, unix_us",
        ),
        (
            {"data": {"events": {"ts_format": "days since 2021-02-30"}}},
            r"data.events.ts_format 'days since 2021-02-30': day is out of range for month",
        ),
        (
            {"data": {"transactions": {"csv_encoding": "windows"}}},
            r"data.transactions.csv_encoding 'windows' is not an encoding: use e.g. utf-8, cp1252",
        ),
        ({"score": {"risk_tiers": {"high": 1.5}}}, r"score.risk_tiers"),
        ({"score": {"attribution": "lime"}}, r"score.attribution must be one of .*'lime'"),
        ({"engine": "polars"}, r"engine must be one of \('duckdb', 'spark'\), got 'polars'"),
        ({"spark": {"master": " "}}, r"spark.master must name a master URL"),
        ({"spark": {"config": {"executor.memory": "8g"}}}, r"must start with 'spark.'"),
        ({"duckdb": {"memory_limit": "80%"}}, r"duckdb.memory_limit: '80%' is not a size"),
        ({"train": {"num_leaves": 1}}, r"train.num_leaves must be >= 2, got 1"),
        ({"train": {"lambda_l2": -1.0}}, r"train.lambda_l2 must be >= 0, got -1.0"),
        ({"train": {"bagging_freq": -1}}, r"train.bagging_freq must be >= 0, got -1"),
        ({"evaluate": {"calibration_bins": 0}}, r"evaluate.calibration_bins must be > 0"),
        (
            {"score": {"risk_tiers": {"high": 0.4, "medium": 0.7}}},
            r"score.risk_tiers.high \(0.4\) must be above score.risk_tiers.medium \(0.7\)",
        ),
        (
            {"actions": {"value_bands": {"high": 0.5, "medium": 0.8}}},
            r"actions.value_bands.high \(0.5\) must be above",
        ),
    ],
    ids=[
        "zero-horizon",
        "typo",
        "wrong-type",
        "bad-date",
        "fraction",
        "threads",
        "score-threads",
        "no-ts",
        "no-amount",
        "format",
        "decimal-separator",
        "ts-format-words",
        "days-since-no-date",
        "encoding",
        "tiers",
        "attribution",
        "engine",
        "spark-master",
        "spark-config",
        "duckdb-memory",
        "one-leaf",
        "negative-l2",
        "bagging-freq",
        "no-bins",
        "tiers-swapped",
        "bands-swapped",
    ],
)
def test_bad_params_are_named(make_settings, overrides, message):
    with pytest.raises(ParamsError, match=message):
        make_settings(**overrides)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_settings(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "seed: 1\n engine: duckdb\n",
            "at line 2, column 8: mapping values are not allowed here",
        ),
        (
            "seed: 1\nfeatures:\n  windows_days: [30, 90\n  horizon_days: 90\n",
            "at line 4, column 15: expected ',' or ']', but got ':' "
            "(while parsing a flow sequence from line 3, column 17)",
        ),
    ],
    ids=["indent", "unclosed-list"],
)
def test_invalid_yaml_is_one_line_naming_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as error:
        load_settings(path)
    assert str(error.value) == f"{path}: not valid YAML {where}; fix the syntax there"
