"""Reading exports (the whitespace-separated text layout of the CDNOW files) and the
engine connection."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import ibis
import numpy as np
import pandas as pd
import pytest

from churn import ChurnError
from churn.config import DuckDBSettings, Engine
from churn.io import (
    UMASK,
    WHITESPACE,
    connect,
    engine_cause,
    expand_inputs,
    map_in_threads,
    materialise,
    mixed_line_ends,
    parquet_parts,
    read_ahead,
    read_table,
    write_csv,
    write_parquet,
    write_xlsx,
)
from tests.conftest import ROOT


def test_whitespace_separated_text_splits_on_runs_of_blanks(tmp_path):
    export = tmp_path / "cdnow.txt"
    export.write_bytes(
        b" customer_id  date number_of_cds  dollar_value\r\n"
        b" 00001 19970101  1   11.77\r\n"
        b"\t00002 19970112\t 5   77.00\r\n"
        b" 00003 19970102\r\n"
    )
    table = read_table(connect(), export, "csv", delimiter=WHITESPACE).to_pandas()
    assert list(table.columns) == ["customer_id", "date", "number_of_cds", "dollar_value"]
    assert table.fillna("<null>").values.tolist() == [
        ["00001", "19970101", "1", "11.77"],
        ["00002", "19970112", "5", "77.00"],
        ["00003", "19970102", "<null>", "<null>"],  # too few fields: for ingest to reject
    ]


@pytest.mark.parametrize(
    ("data", "mixed"),
    [
        (b"a\r\nb\r\n", False),
        (b"a\nb\n", False),
        (b"a\nb\r\n", True),
        (b"a\r\nb\n", True),
        # a CR LF split between two blocks of a megabyte is one line end
        (b"x" * ((1 << 20) - 1) + b"\r\nb\r\n", False),
        (b"x" * ((1 << 20) - 1) + b"\r\nb\n", True),
    ],
)
def test_mixed_line_ends_are_found_across_blocks(tmp_path, data, mixed):
    export = tmp_path / "export.csv"
    export.write_bytes(data)
    assert mixed_line_ends(export) is mixed
    # A check of the first bytes reads whole blocks of a megabyte: a second one is not read.
    assert mixed_line_ends(export, limit=2) is (mixed and len(data) < 10)


def test_duckdb_memory_limit_is_applied_and_a_bad_size_is_named():
    con = connect(Engine(duckdb=DuckDBSettings(memory_limit="512MB")))
    limit = con.raw_sql("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit == "488.2 MiB"  # 512 * 10^6 bytes, printed in binary units
    with pytest.raises(ChurnError, match=r"duckdb\.memory_limit: 'lots'"):
        connect(Engine(duckdb=DuckDBSettings(memory_limit="lots")))


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux's /proc/meminfo")
def test_auto_memory_limit_is_a_quarter_of_the_machines_memory():
    con = connect(Engine(duckdb=DuckDBSettings(memory_limit="auto")))
    number, unit = con.raw_sql("SELECT current_setting('memory_limit')").fetchone()[0].split()
    with open("/proc/meminfo") as meminfo:  # "MemTotal:  24684712 kB", in KiB
        total_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    assert unit == "GiB"
    quarter_gib = total_kib / 4 / 2**20
    assert quarter_gib - 0.1 < float(number) <= quarter_gib  # printed cut to one decimal


def test_a_table_materialised_clustered_keeps_its_rows_in_that_order():
    rng = np.random.default_rng(0)
    n = 300_000  # several row groups, read back by several threads
    frame = pd.DataFrame(
        {"customer_id": rng.integers(0, 5_000, n).astype(str), "day": rng.integers(0, 900, n)}
    )
    con = connect()
    kept = materialise(con, "clustered", ibis.memtable(frame), clustered_by=("customer_id", "day"))
    stored = kept.to_pandas()  # a plain scan, no ORDER BY
    expected = frame.sort_values(["customer_id", "day"], kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(stored, expected)


def test_parquet_parts_become_one_file_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "snapshot.parquet"
    with parquet_parts(target) as append:
        append(pd.DataFrame({"customer_id": ["A"], "spend": [1.5]}))
        append(pd.DataFrame({"customer_id": ["B", "C"], "spend": [float("nan"), 2.0]}))
    written = pd.read_parquet(target)
    assert written["customer_id"].tolist() == ["A", "B", "C"]
    assert written["spend"].isna().tolist() == [False, True, False]

    def stopped_mid_way() -> None:
        with parquet_parts(target) as append:
            append(pd.DataFrame({"customer_id": ["D"], "spend": [9.0]}))
            raise RuntimeError("stopped mid-way")

    with pytest.raises(RuntimeError):
        stopped_mid_way()
    assert pd.read_parquet(target)["customer_id"].tolist() == ["A", "B", "C"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.parquet"]


def _recorded(log: list[str], count: int, fail_at: int | None = None):
    for k in range(count):
        if k == fail_at:
            raise ValueError(f"item {k} failed")
        log.append(f"made {k}")
        yield k


def test_written_files_get_the_permissions_of_a_new_file_not_a_temporary_one(tmp_path):
    frame = pd.DataFrame({"a": [1]})
    write_parquet(frame, tmp_path / "a.parquet")
    write_xlsx(frame, tmp_path / "a.xlsx")
    write_csv(frame, tmp_path / "a.csv")
    assert UMASK & 0o044 == 0  # as here: a umask that lets others read new files
    for name in ("a.parquet", "a.xlsx", "a.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~UMASK, name


def test_read_ahead_makes_the_next_item_while_this_one_is_used():
    log: list[str] = []
    with read_ahead(_recorded(log, 3)) as items:
        for k in items:
            # the next item is made in the background thread while this one is in use
            deadline = time.monotonic() + 10
            while k < 2 and f"made {k + 1}" not in log and time.monotonic() < deadline:
                time.sleep(0.01)
            log.append(f"used {k}")
    assert [e for e in log if e.startswith("used")] == ["used 0", "used 1", "used 2"]
    assert log.index("made 1") < log.index("used 0")
    assert log.index("made 2") < log.index("used 1")


def test_read_ahead_raises_an_error_where_its_item_is_taken():
    log: list[str] = []
    taken = []
    with (
        pytest.raises(ValueError, match="item 1 failed"),
        read_ahead(_recorded(log, 3, fail_at=1)) as items,
    ):
        taken.extend(items)
    assert taken == [0]


def test_leaving_read_ahead_early_stops_the_thread():
    log: list[str] = []
    with read_ahead(_recorded(log, 1000)) as items:
        assert next(items) == 0
    done = len(log)
    assert done <= 3  # the item taken, the one queued, the one being offered
    assert not [t for t in threading.enumerate() if t.name == "churn-read-ahead"]


def test_map_in_threads_keeps_the_order_and_takes_at_most_workers_items_ahead():
    log: list[str] = []
    running, most = 0, 0
    lock = threading.Lock()

    def slow_square(k: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02 * (k % 3))  # later items may finish first
        with lock:
            running -= 1
        return k * k

    results = []
    for value in map_in_threads(slow_square, _recorded(log, 9), workers=3):
        taken = sum(e.startswith("made") for e in log)
        assert taken - len(results) <= 3  # this result's item and at most two more
        results.append(value)
    assert results == [k * k for k in range(9)]
    assert 1 < most <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("churn-worker")]


def test_map_in_threads_raises_an_error_where_its_result_is_taken():
    def fails_on_two(k: int) -> int:
        if k == 2:
            raise ValueError("item 2 failed")
        return k

    taken = []
    with pytest.raises(ValueError, match="item 2 failed"):
        taken.extend(map_in_threads(fails_on_two, range(100), workers=2))
    assert taken == [0, 1]
    assert list(map_in_threads(fails_on_two, [5, 6], workers=1)) == [5, 6]


HEADER = "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n"
LINE = "1,13085,2021-01-01 10:00:00,2,3.0,P1,{country}\n"


def test_unreadable_csv_keeps_the_engines_cause_and_names_the_settings(tmp_path):
    export = tmp_path / "orders.csv"
    export.write_bytes((HEADER + LINE.format(country="caf\xe9")).encode("latin-1"))
    with pytest.raises(ChurnError) as raised:
        read_table(connect(), export, "csv", delimiter=";", section="data.events")
    message = str(raised.value)
    assert message.startswith(f"{export}: cannot read as csv: ")
    assert "This file is not utf-8 encoded" in message
    assert "data.events.csv_delimiter (now ';') and data.events.csv_encoding (now 'utf-8')" in (
        message
    )
    assert "ignore_errors" not in message  # DuckDB's advice on its own options
    assert "\n" not in message


def test_engine_cause_keeps_the_problem_and_drops_the_engines_advice():
    duckdb_message = (
        "Invalid Input Error: CSV Error on Line: 25000\n"
        "Original Line: 99,1,2011-01-01 10:00:00,1,2.5,P1,UK,x,y\n"
        "Expected Number of Columns: 8 Found: 9\n"
        "Possible fixes:\n"
        "* Disable the parser's strict mode (strict_mode=false) to allow reading rows\n"
        "* Enable ignore errors (ignore_errors=true) to skip this row\n"
        "\n"
        "  file = /data/in/orders.csv\n"
        "  delimiter = , (Set By User)\n"
    )
    assert engine_cause(duckdb_message) == (
        "Invalid Input Error: CSV Error on Line: 25000; "
        "Original Line: 99,1,2011-01-01 10:00:00,1,2.5,P1,UK,x,y; "
        "Expected Number of Columns: 8 Found: 9"
    )
    spark_message = (
        "An error occurred while calling o234.collectToPython.\n"
        ": org.apache.spark.SparkException: Encountered error while reading file x.csv.\n"
        "\tat org.apache.spark.sql.errors.QueryExecutionErrors$.cannotReadFilesError\n"
        "Caused by: org.apache.spark.SparkException: Malformed records are detected.\n"
        "Parse Mode: FAILFAST. To process malformed records as null result, try PERMISSIVE.\n"
        "\t... 18 more\n"
    )
    assert engine_cause(spark_message) == (
        "org.apache.spark.SparkException: Encountered error while reading file x.csv.; "
        "org.apache.spark.SparkException: Malformed records are detected."
    )


# --- finding the exports ------------------------------------------------------------------


def _files(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n")


def test_a_folder_gives_its_exports_in_subfolders_and_compressed_too(tmp_path):
    _files(
        tmp_path,
        "in/a.csv",
        "in/b.csv.gz",
        "in/2011/c.CSV",
        "in/2012/d.csv.zst",
        "in/2012/e.parquet",
        "in/.gitkeep",
        "in/.DS_Store",
        "in/.cache/f.csv",
        "in/README.md",
    )
    found = expand_inputs((tmp_path / "in",))
    assert [p.relative_to(tmp_path / "in").as_posix() for p in found] == [
        "2011/c.CSV",
        "2012/d.csv.zst",
        "2012/e.parquet",
        "a.csv",
        "b.csv.gz",
    ]


def test_a_file_of_unknown_format_in_a_folder_is_named_not_skipped(tmp_path):
    _files(tmp_path, "in/a.csv", "in/2011/notes.docx", "in/b.parquet.gz")
    with pytest.raises(ChurnError) as raised:
        expand_inputs((tmp_path / "in",), section="data.events")
    assert str(raised.value) == (
        f"{tmp_path / 'in'}: cannot tell the format of {tmp_path / 'in/2011/notes.docx'}, "
        f"{tmp_path / 'in/b.parquet.gz'}; remove it or set data.events.format in params.yaml"
    )
    declared = expand_inputs((tmp_path / "in",), declared_format="csv")
    assert len(declared) == 3  # a declared format reads every file


def test_an_events_folder_with_only_a_readme_and_hidden_files_names_no_file(tmp_path):
    _files(tmp_path, "events/README.md", "events/.gitkeep")
    assert expand_inputs((tmp_path / "events",), allow_empty=True) == []
    assert expand_inputs((ROOT / "data" / "events",), allow_empty=True) == []  # the repo's
    with pytest.raises(ChurnError, match=r"events: folder holds no CSV"):
        expand_inputs((tmp_path / "events",))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("exports/*/orders.csv", ["2010/orders.csv", "2011/orders.csv"]),
        (
            "exports/**/*.csv",
            ["2010/orders.csv", "2011/deep/returns.csv", "2011/orders.csv", "top.csv"],
        ),
        ("exports/20?1/*.csv", ["2011/orders.csv"]),
    ],
    ids=["folder-wildcard", "recursive", "question-mark"],
)
def test_glob_wildcards_in_folder_parts_match(tmp_path, pattern, expected):
    _files(
        tmp_path / "exports",
        "top.csv",
        "2010/orders.csv",
        "2011/orders.csv",
        "2011/deep/returns.csv",
        "2011/README.csv",
        ".old/orders.csv",
    )
    found = expand_inputs((tmp_path / pattern,))
    assert [p.relative_to(tmp_path / "exports").as_posix() for p in found] == expected
