"""``engine: spark``: the same Ibis definitions on a local Spark session give the DuckDB tables.

Skipped when PySpark (the ``spark`` extra) is not installed.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import ibis
import pandas as pd
import pytest

if os.environ.get("CHURN_REQUIRE_SPARK"):  # CI installs the extra: a skip would hide a gap
    import pyspark  # noqa: F401
pytest.importorskip("pyspark", reason="the spark extra is not installed (make install-spark)")

from churn import ChurnError, features, ingest, score
from churn.config import Engine, FeatureSettings, Settings, SparkSettings, settings_from_dict
from churn.io import InputError, connect, is_spark
from tests.conftest import SAMPLE, TINY_ROWS, merge, project_params, tx
from tests.test_ingest import BERLIN_TIMES, CP1252_EXPORT, MESSY, _long_export
from tests.test_ingest import _line_totals as line_totals

pytestmark = pytest.mark.spark

CUSTOMERS = 300  # a slice of the bundled data keeps a local Spark run to seconds
SPARK = Engine(
    name="spark",
    spark=SparkSettings(
        master="local[2]",
        config={
            "spark.sql.shuffle.partitions": 2,
            # Short runs: the JVM's quick compiler alone halves the session's warm-up here.
            "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC",
        },
    ),
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
    assert session.sparkContext.getConf().get("spark.ui.showConsoleProgress") == "false"


def test_unknown_time_zone_is_named_on_spark(spark_con):
    with pytest.raises(ChurnError, match=r"unknown time zone 'Mars/Olympus'"):
        connect(SPARK, timezone="Mars/Olympus")
    assert spark_con._session.conf.get("spark.sql.session.timeZone") == "UTC"


SPANNING_ROWS = [
    ("A", "O13", "2021-03-30 12:00", 3.0, "P2"),  # an order spanning the cutoff
    ("A", "O13", "2021-04-02 12:00", 3.0, "P3"),
    ("B", "O14", "2021-02-10 23:30", 7.0, "P5"),  # one spanning midnight, before it
    ("B", "O14", "2021-02-11 00:10", 2.0, "P4"),
]


@pytest.mark.parametrize(
    "rows", [TINY_ROWS, TINY_ROWS + SPANNING_ROWS], ids=["one_day", "spanning"]
)
def test_hand_checked_history_gives_the_duckdb_snapshot(spark_con, tmp_path, rows):
    settings = FeatureSettings(horizon_days=30, windows_days=(30, 90))
    path = tmp_path / "tiny.parquet"
    tx(rows).to_parquet(path, index=False)
    built = {}
    for name, con in (("duckdb", connect()), ("spark", spark_con)):
        table = features.with_day(con.read_parquet(path))
        past = features.history(table, settings)
        snapshot = features.labelled_snapshot(past, date(2021, 4, 1), settings)
        built[name], _ = features.snapshot_frame(features.executed_snapshot(snapshot), settings)
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
            {
                "engine": name,
                "data": {"transactions": {"path": str(sample_slice)}},
                "features": {"n_snapshots": 2},  # 4 cutoffs: train, validation, test, score
            },
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
    assert _report(spark.ingest_report) == _report(duck.ingest_report)


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


def _report(path: Path) -> dict:
    """The ingest report with each file's row count kept and its folder dropped."""
    report = json.loads(path.read_text())
    for section in (report, report.get("events", {})):
        if "files" in section:
            section["files"] = {Path(k).name: v for k, v in section["files"].items()}
    return report


def _ingest_on(engine: str, root: Path, overrides: dict, events: str | None) -> Settings:
    (root / "data" / "events").mkdir(parents=True)
    if events is not None:
        (root / "data" / "events" / "events.csv").write_text(events)
    params = merge(project_params(), {**overrides, "engine": engine})
    params["spark"] = {"master": SPARK.spark.master, "config": SPARK.spark.config}
    settings = settings_from_dict(params, root)
    ingest.run(settings.data, settings.paths, engine=settings.backend)
    return settings


EVENTS = (
    "customer_id,ts,event_type,value\n"
    "13085.0,2021-01-02 09:00:00,page_view,\n"
    "13085,2021-01-03 09:00:00,nps,3\n"
    ",2021-01-04 09:00:00,visit,\n"
    "13087,yesterday,visit,\n"
    "13087,2021-01-05 09:00:00,,\n"
)
CASES = {
    # duplicates, a missing id, an unparseable date and amount, a return, padded ids
    "messy": (
        MESSY,
        {"csv_delimiter": ";"},
        EVENTS,
    ),
    "us_dates": (
        "cust,when,total\n1,03/15/2021 08:05,10.5\n2,15/03/2021 08:05,3\n3,3/5/2021 18:00,2\n"
        '4,3/6/2021 09:00,"$1,234.50"\n5,3/7/2021 09:00,"1,000"\n6,3/8/2021 09:00,(12.50)\n'
        "7,3/9/2021 09:00,5.00-\n",
        {"ts_format": "%m/%d/%Y %H:%M", "columns": line_totals("cust", "when", "total")},
        None,
    ),
    "offsets": (
        "c,t,v\n" + "".join(f'{k},"{text}",5\n' for k, (text, _) in enumerate(BERLIN_TIMES)),
        {"timezone": "Europe/Berlin", "columns": line_totals("c", "t", "v")},
        None,
    ),
    # an offset in the ts_format (%z), and a time without one
    "zoned_format": (
        "c,t,v\n1,01/06/2021 10:00 -0400,5\n2,01/12/2021 10:00 +0000,5\n3,01/12/2021 10:00,5\n",
        {
            "timezone": "Europe/Berlin",
            "ts_format": "%d/%m/%Y %H:%M %z",
            "columns": line_totals("c", "t", "v"),
        },
        None,
    ),
    # Unix times across the switch to summer time, one in the wrong unit; day numbers
    "unix_ms": (
        "c,t,v\n1,1616889600000,5\n2,1616893200000,5\n3,1622541600123,5\n4,1622541600,5\n",
        {
            "timezone": "Europe/Berlin",
            "ts_format": "unix_ms",
            "columns": line_totals("c", "t", "v"),
        },
        None,
    ),
    "day_numbers": (
        "c,t,v\n1,0,5\n2,59,5\n3,-1,5\n4,1.5,5\n5,2021-06-01 10:00,5\n",
        {
            "timezone": "Europe/Berlin",
            "ts_format": "days since 2020-01-01",
            "columns": line_totals("c", "t", "v"),
        },
        None,
    ),
    # a header ending in LF, lines in CR LF
    "line_ends": (
        "c,t,v\n1,2021-06-01,5\r\n2,2021-06-02,(6)\r\n",
        {"columns": line_totals("c", "t", "v")},
        None,
    ),
    # a failed payment and a cancelled order (any case, padded) are no purchases
    "statuses": (
        "order,customer,date,total,status\n1,A,2021-01-01,20,Completed\n2,A,2021-01-02,15, FAILED\n"
        "3,B,2021-01-03,30,cancelled\n4,B,2021-01-04,12,Refunded\n5,C,2021-01-05,9,\n",
        {
            "columns": {
                **line_totals("customer", "date", "total"),
                "order_id": "order",
                "status": "status",
            }
        },
        None,
    ),
    # an order's lines that differ only in an unmapped sku, one of them twice
    "unmapped_column": (
        "order,customer,date,total,sku\n1,A,2021-05-03,9.99,X\n1,A,2021-05-03,9.99,Y\n"
        "1,A,2021-05-03,9.99,Y\n2,B,2021-05-04,5,X\n",
        {"columns": {**line_totals("customer", "date", "total"), "order_id": "order"}},
        None,
    ),
    # decimal commas, placeholder customer ids, implausible times, a purchase made twice,
    # amounts written for people (1.234,50 €, 12,50-; 1.000 is rejected, not misread)
    "european": (
        "c;t;v\n1;2021-03-15 08:05;5,95\nN/A;2021-03-15 08:05;3\n2;1900-01-01 00:00;2\n"
        "3;2021-03-16 10:00;4\n4;2021-03-17 10:00;1,5\n4;2021-03-17 10:00;1,5\n"
        "5;2021-03-18 10:00;1.234,50 €\n6;2021-03-18 11:00;1.000\n7;2021-03-19 10:00;12,50-\n",
        {"csv_delimiter": ";", "decimal_separator": ",", "columns": line_totals("c", "t", "v")},
        "customer_id,ts,event_type,value\nNULL,2021-01-02 09:00:00,visit,\n"
        "13085,2999-01-02 09:00:00,visit,\n13085,2021-01-03 09:00:00,nps,3\n",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spark_ingest_of_exports_equals_duckdb(case, tmp_path, spark_con):
    export, source, events = CASES[case]
    (tmp_path / "export.csv").write_text(export)
    overrides = {"data": {"transactions": {"path": str(tmp_path / "export.csv"), **source}}}
    duck, spark = (
        _ingest_on(engine, tmp_path / engine, overrides, events).paths
        for engine in ("duckdb", "spark")
    )
    assert len(pd.read_parquet(duck.transactions)) >= 2
    for table in ("transactions", "rejects", "events", "event_rejects"):
        expected = pd.read_parquet(getattr(duck, table))
        assert_same_table(expected, pd.read_parquet(getattr(spark, table)), list(expected.columns))
    assert _report(spark.ingest_report) == _report(duck.ingest_report)


def test_a_windows_encoded_export_reads_on_spark_as_on_duckdb(tmp_path, spark_con):
    """cp1252, which Spark does not read itself, and latin-1 spelt the Python way."""
    for encoding in ("cp1252", "latin-1"):
        text, decimals = (CP1252_EXPORT, ",") if encoding == "cp1252" else (MESSY, ".")
        export = tmp_path / f"{encoding}.csv"
        export.write_bytes(text.encode(encoding))
        source = {"path": str(export), "csv_delimiter": ";", "csv_encoding": encoding}
        overrides = {"data": {"transactions": {**source, "decimal_separator": decimals}}}
        duck, spark = (
            _ingest_on(engine, tmp_path / encoding / engine, overrides, None).paths
            for engine in ("duckdb", "spark")
        )
        expected = pd.read_parquet(duck.transactions)
        assert len(expected) >= 2
        actual = pd.read_parquet(spark.transactions)
        assert_same_table(expected, actual, list(expected.columns))
        assert _report(spark.ingest_report) == _report(duck.ingest_report)


def test_scoring_snapshot_on_spark_equals_duckdb(both_engines):
    """``churn score --transactions`` on Spark builds the snapshot ``churn features`` wrote."""
    settings = both_engines["spark"]
    duck = both_engines["duckdb"].paths.features
    spec = json.loads((duck / "spec.json").read_text())
    frame, scoring_spec = score.scoring_snapshot(
        settings.paths.transactions,
        date.fromisoformat(json.loads((duck / "scoring.json").read_text())["as_of"]),
        settings.features,
        engine=settings.backend,
    )
    assert scoring_spec["feature_hash"] == spec["feature_hash"]
    assert_same_table(pd.read_parquet(duck / "score.parquet"), frame, ["customer_id"])


def test_spark_reads_a_gzipped_export_in_a_subfolder_as_duckdb(tmp_path, spark_con):
    folder = tmp_path / "in"
    (folder / "2021").mkdir(parents=True)
    (folder / "a.csv").write_text(MESSY)
    with gzip.open(folder / "2021" / "b.csv.gz", "wt") as stream:
        stream.write(MESSY.replace("1001;", "2001;"))
    overrides = {"data": {"transactions": {"path": str(folder), "csv_delimiter": ";"}}}
    duck, spark = (
        _ingest_on(engine, tmp_path / engine, overrides, None).paths
        for engine in ("duckdb", "spark")
    )
    expected = pd.read_parquet(duck.transactions)
    assert len(expected) == 4  # MESSY's 3 kept lines, its first order renamed in b
    assert_same_table(expected, pd.read_parquet(spark.transactions), list(expected.columns))
    assert _report(spark.ingest_report) == _report(duck.ingest_report)


def test_a_bad_line_deep_in_an_export_names_the_file_on_spark(tmp_path, spark_con):
    export = tmp_path / "b.csv"
    _long_export(export, "99,1,2021-01-01 10:00:00,1,2.5,P1,UK,extra\n")
    # Country not mapped: Spark must still read (not prune) the field-count of each line.
    overrides = {"data": {"transactions": {"path": str(export), "columns": {"country": None}}}}
    with pytest.raises(InputError) as raised:
        _ingest_on("spark", tmp_path / "spark", overrides, None)
    message = str(raised.value)
    assert message.startswith(f"{export}: cannot read: ")
    assert "Malformed CSV record: 99,1,2021-01-01 10:00:00,1,2.5,P1,UK,extra" in message
    assert "\tat " not in message  # no Java stack frames
    assert message.endswith("data.transactions.csv_encoding (now 'utf-8') in params.yaml")


def test_spark_reads_typed_parquet_times_beside_csv_text_as_duckdb(tmp_path, spark_con):
    folder = tmp_path / "in"
    folder.mkdir()
    archive = pd.DataFrame(
        {
            "Invoice": ["1", "2"],
            "Customer ID": ["13085", "13086"],
            "InvoiceDate": pd.to_datetime(["2009-12-01 09:06", "2009-12-01 10:00"]),
            "Quantity": [2, 1],
            "Price": [4.33, 1.0],
            "StockCode": ["A", "B"],
            "Country": ["UK", "UK"],
        }
    )
    archive.to_parquet(folder / "archive.parquet", index=False)
    (folder / "export.csv").write_text(
        "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n"
        "7,13085,02/12/2009 10:30,1,2.0,A,UK\n8,13085,13/12/2009 11:00,1,2.0,A,UK\n"
    )
    source = {"path": str(folder), "ts_format": "%d/%m/%Y %H:%M"}
    duck, spark = (
        _ingest_on(engine, tmp_path / engine, {"data": {"transactions": source}}, None).paths
        for engine in ("duckdb", "spark")
    )
    expected = pd.read_parquet(duck.transactions)
    assert len(expected) == 4
    assert_same_table(expected, pd.read_parquet(spark.transactions), list(expected.columns))
    assert _report(spark.ingest_report) == _report(duck.ingest_report)


def test_one_export_in_another_date_format_is_named_on_spark(tmp_path, spark_con):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "uk.csv").write_text(
        "c,t,v\n" + "".join(f"{k},{k + 10}/01/2021 10:00,1\n" for k in range(10))
    )
    (folder / "us.csv").write_text(
        "c,t,v\n1,01/13/2021 10:00,1\n2,01/14/2021 10:00,1\n3,01/02/2021 10:00,1\n"
    )
    source = {
        "path": str(folder),
        "ts_format": "%d/%m/%Y %H:%M",
        "columns": line_totals("c", "t", "v"),
    }
    with pytest.raises(
        InputError, match=r"^\S*/us\.csv: 2 of 3 rows have a date that does not parse"
    ):
        _ingest_on("spark", tmp_path / "spark", {"data": {"transactions": source}}, None)


def test_an_empty_export_is_named_on_spark(tmp_path, spark_con):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.csv").write_text(MESSY)
    (folder / "b.csv").write_text("")
    source = {"path": str(folder), "csv_delimiter": ";"}
    with pytest.raises(InputError, match=r"^\S*/b\.csv: empty file \(no header\)"):
        _ingest_on("spark", tmp_path / "spark", {"data": {"transactions": source}}, None)
