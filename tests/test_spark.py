"""``engine: spark``: the same Ibis definitions on a local Spark session give the DuckDB tables.

Skipped when PySpark (the ``spark`` extra) is not installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import ibis
import pandas as pd
import pytest

pytest.importorskip("pyspark")

from churn import features, ingest
from churn.config import Engine, FeatureSettings, Settings, SparkSettings, settings_from_dict
from churn.io import connect, is_spark
from tests.conftest import SAMPLE, TINY_ROWS, merge, project_params, tx

pytestmark = pytest.mark.spark

CUSTOMERS = 300  # a slice of the bundled data keeps a local Spark run to seconds
SPARK = Engine(
    name="spark",
    spark=SparkSettings(master="local[2]", config={"spark.sql.shuffle.partitions": 2}),
)


@pytest.fixture(scope="module")
def spark_con() -> Iterator[ibis.BaseBackend]:
    con = connect(SPARK)
    yield con
    con.disconnect()


@pytest.fixture(scope="module")
def sample_slice(tmp_path_factory) -> Path:
    """The bundled exports restricted to their first ``CUSTOMERS`` customer ids."""
    folder = tmp_path_factory.mktemp("slice")
    frames = [pd.read_parquet(p) for p in sorted(SAMPLE.glob("*.parquet"))]
    ids = sorted(set(frames[0]["Customer ID"].dropna()))[:CUSTOMERS]
    for k, frame in enumerate(frames):
        frame[frame["Customer ID"].isin(ids)].to_parquet(folder / f"part{k}.parquet", index=False)
    return folder


def assert_same_table(duck: pd.DataFrame, spark: pd.DataFrame, keys: list[str]) -> None:
    """Same columns, rows and types; floats equal within 1e-9 relative."""
    assert list(spark.columns) == list(duck.columns)
    duck = duck.sort_values(keys, kind="stable").reset_index(drop=True)
    spark = spark.sort_values(keys, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(spark, duck, check_exact=False, rtol=1e-9, atol=1e-12)


def test_connect_returns_a_spark_backend(spark_con):
    assert is_spark(spark_con)
    session = spark_con._session
    assert session.conf.get("spark.sql.session.timeZone") == "UTC"
    assert session.conf.get("spark.sql.shuffle.partitions") == "2"


def test_hand_checked_history_gives_the_duckdb_snapshot(spark_con, tmp_path):
    settings = FeatureSettings(horizon_days=30, windows_days=(30, 90))
    path = tmp_path / "tiny.parquet"
    tx(TINY_ROWS).to_parquet(path, index=False)
    built = {}
    for name, con in (("duckdb", connect()), ("spark", spark_con)):
        table = features.with_day(con.read_parquet(path))
        built[name], _ = features.snapshot_frame(
            features.labelled_snapshot(table, date(2021, 4, 1), settings), settings
        )
    assert built["spark"]["customer_id"].tolist() == ["A", "B"]
    assert_same_table(built["duckdb"], built["spark"], ["cutoff", "customer_id"])


@pytest.fixture(scope="module")
def both_engines(sample_slice, tmp_path_factory, spark_con) -> dict[str, Settings]:
    """Ingest and features run on the slice once per engine, each into its own folder."""
    out = {}
    for name in ("duckdb", "spark"):
        root = tmp_path_factory.mktemp(name)
        (root / "data" / "events").mkdir(parents=True)
        params = merge(
            project_params(),
            {"engine": name, "data": {"transactions": {"path": str(sample_slice)}}},
        )
        params["spark"] = {"master": SPARK.spark.master, "config": SPARK.spark.config}
        settings = settings_from_dict(params, root)
        ingest.run(settings.data, settings.paths, engine=settings.backend)
        features.run(settings.features, settings.paths, engine=settings.backend)
        out[name] = settings
    return out


def test_spark_ingest_writes_the_duckdb_transactions(both_engines):
    duck, spark = (both_engines[n].paths for n in ("duckdb", "spark"))
    for table in ("transactions", "rejects"):
        expected = pd.read_parquet(getattr(duck, table))
        got = pd.read_parquet(getattr(spark, table))
        assert len(got) == len(expected) > 0 if table == "transactions" else True
        assert_same_table(expected, got, list(expected.columns))
    assert json.loads(spark.ingest_report.read_text()) == json.loads(duck.ingest_report.read_text())


@pytest.mark.parametrize("snapshot", ["train", "test", "score"])
def test_spark_features_equal_duckdb(both_engines, snapshot):
    duck, spark = (both_engines[n].paths.features for n in ("duckdb", "spark"))
    expected = pd.read_parquet(duck / f"{snapshot}.parquet")
    got = pd.read_parquet(spark / f"{snapshot}.parquet")
    assert len(expected) > 50
    assert_same_table(expected, got, ["cutoff", "customer_id"])
    assert json.loads((spark / "spec.json").read_text()) == json.loads(
        (duck / "spec.json").read_text()
    )
