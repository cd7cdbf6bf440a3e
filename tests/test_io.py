"""Reading exports (the whitespace-separated text layout of the CDNOW files) and the
engine connection."""

from __future__ import annotations

import pandas as pd
import pytest

from churn import ChurnError
from churn.config import DuckDBSettings, Engine
from churn.io import WHITESPACE, connect, parquet_parts, read_table


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


def test_duckdb_memory_limit_is_applied_and_a_bad_size_is_named():
    con = connect(Engine(duckdb=DuckDBSettings(memory_limit="512MB")))
    limit = con.raw_sql("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit == "488.2 MiB"  # 512 * 10^6 bytes, printed in binary units
    with pytest.raises(ChurnError, match=r"duckdb\.memory_limit: 'lots'"):
        connect(Engine(duckdb=DuckDBSettings(memory_limit="lots")))


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
