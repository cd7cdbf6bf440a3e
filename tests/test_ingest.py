from __future__ import annotations

import gzip
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import ibis
import pandas as pd
import pytest

from churn import ChurnError, ingest
from churn.config import CANONICAL_COLUMNS
from churn.io import InputError, read_table
from tests.conftest import ROOT, SAMPLE

MESSY = """Invoice;Customer ID;InvoiceDate;Quantity;Price;StockCode;Country
1001;13085.0;2021-01-01 10:00:00;2;3.0;P1;United Kingdom
1001;13085.0;2021-01-01 10:00:00;2;3.0;P1;United Kingdom
1002;;2021-01-02 10:00:00;1;5.0;P2;France
1003;13086;not a date;1;5.0;P2;France
1004;13086;2021-01-03 10:00:00;abc;5.0;P2;France
C1005;13085;2021-01-04 10:00:00;-1;3.0;P1;United Kingdom
1006; 13087 ;2021-01-05 10:00:00;1;0.0;P3; EIRE\t
"""


def _line_totals(customer_id: str, ts: str, amount: str) -> dict[str, str | None]:
    """A column mapping for an export with only customer, time and line total."""
    return {
        "customer_id": customer_id,
        "ts": ts,
        "amount": amount,
        "order_id": None,
        "quantity": None,
        "unit_price": None,
        "product_id": None,
        "country": None,
    }


def _ctv_settings(make_settings, export: Path, **source: Any):
    """Settings reading ``export``: customer ``c``, time ``t`` and line total ``v``."""
    columns = _line_totals("c", "t", "v")
    return make_settings(data={"transactions": {"path": str(export), **source, "columns": columns}})


def _refused(settings) -> str:
    """The message of the :class:`InputError` ingest stops with; nothing is written."""
    with pytest.raises(InputError) as raised:
        ingest.run(settings.data, settings.paths)
    assert not settings.paths.transactions.exists()
    return str(raised.value)


@pytest.fixture
def messy_settings(tmp_path: Path, make_settings):
    export = tmp_path / "export.csv"
    export.write_text(MESSY, encoding="utf-8")
    return make_settings(data={"transactions": {"path": str(export), "csv_delimiter": ";"}})


def test_messy_rows_reconcile(messy_settings):
    summary = ingest.run(messy_settings.data, messy_settings.paths)
    assert summary.rows_read == 7
    assert summary.duplicates_removed == 1
    assert summary.rejected_by_reason == {
        "missing_customer_id": 1,
        "unparseable_ts": 1,
        "implausible_ts": 0,
        "non_finite_amount": 1,
        "non_finite_quantity": 0,
    }
    assert summary.rows_kept == 3
    assert summary.customers == 2
    report = json.loads(messy_settings.paths.ingest_report.read_text())
    assert report["reconciles"] is True
    assert (
        report["rows_read"]
        == report["rows_kept"] + report["rows_rejected"] + report["duplicates_removed"]
    )


def test_kept_lines_are_canonical(messy_settings):
    ingest.run(messy_settings.data, messy_settings.paths)
    kept = pd.read_parquet(messy_settings.paths.transactions).sort_values("order_id")
    assert kept["customer_id"].tolist() == ["13085", "13087", "13085"]
    assert kept["order_id"].tolist() == ["1001", "1006", "C1005"]
    assert kept["amount"].tolist() == [6.0, 0.0, -3.0]
    assert kept["is_return"].tolist() == [False, False, True]
    assert kept["country"].tolist() == ["United Kingdom", "EIRE", "United Kingdom"]
    assert str(kept["ts"].iloc[0]) == "2021-01-01 10:00:00"


def test_rejects_keep_source_text_and_reason(messy_settings):
    ingest.run(messy_settings.data, messy_settings.paths)
    rejects = pd.read_parquet(messy_settings.paths.rejects).set_index("source_order_id")
    assert rejects.loc["1003", "source_ts"] == "not a date"
    assert rejects.loc["1003", "reason"] == "unparseable_ts"
    assert rejects.loc["1004", "source_quantity"] == "abc"


def test_only_rejected_lines_keep_their_source_text():
    parsed = ibis.memtable(
        {
            "source_ts": ["not a date", "2021-01-01"],
            "source_quantity": ["1", "2"],
            "quantity": [1.0, 2.0],
            "reason": ["unparseable_ts", None],
        }
    )
    kept = ingest.sources_of_rejects(parsed).to_pyarrow()
    assert kept["source_ts"].to_pylist() == ["not a date", None]
    assert kept["source_quantity"].to_pylist() == ["1", None]
    assert kept["quantity"].to_pylist() == [1.0, 2.0]


def test_ts_format_parses_non_iso_dates(tmp_path, make_settings):
    export = tmp_path / "us.csv"
    export.write_text("cust,when,total\n1,03/15/2021,10.5\n2,15/03/2021,3\n")
    settings = make_settings(
        data={
            "transactions": {
                "path": str(export),
                "ts_format": "%m/%d/%Y",
                "columns": _line_totals("cust", "when", "total"),
            }
        }
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rows_kept == 1
    assert summary.rejected_by_reason["unparseable_ts"] == 1
    kept = pd.read_parquet(settings.paths.transactions)
    assert kept["order_id"].iloc[0] == "1@03/15/2021"  # no order id column: one per timestamp


def test_misspelt_column_suggests_the_closest(tmp_path, make_settings):
    export = tmp_path / "export.csv"
    export.write_text(MESSY.replace("Customer ID", "CustomerID"))
    settings = make_settings(data={"transactions": {"path": str(export), "csv_delimiter": ";"}})
    with pytest.raises(
        InputError,
        match=r"export.csv: column 'Customer ID'.*did you mean "
        r"'CustomerID'",
    ):
        ingest.run(settings.data, settings.paths)
    assert not settings.paths.transactions.exists()


def test_missing_file_is_named(tmp_path, make_settings):
    settings = make_settings(data={"transactions": {"path": str(tmp_path / "nope.csv")}})
    with pytest.raises(InputError, match=r"nope.csv: input file not found"):
        ingest.run(settings.data, settings.paths)


def test_all_rows_rejected_stops(tmp_path, make_settings):
    export = tmp_path / "export.csv"
    export.write_text(
        "Invoice;Customer ID;InvoiceDate;Quantity;Price;StockCode;Country\n1;;2021-01-01;1;1;P;UK\n"
    )
    settings = make_settings(data={"transactions": {"path": str(export), "csv_delimiter": ";"}})
    with pytest.raises(InputError, match="all 1 rows rejected"):
        ingest.run(settings.data, settings.paths)
    assert not settings.paths.ingest_report.exists()


def test_all_rows_rejected_counts_the_rejected_and_names_the_dominant_setting(
    tmp_path, make_settings
):
    export = tmp_path / "export.csv"
    line = "1;;2021-01-01;1;1;P;UK\n"  # no customer id
    export.write_text(
        "Invoice;Customer ID;InvoiceDate;Quantity;Price;StockCode;Country\n"
        + line * 3
        + "2;;2021-01-02;1;1;P;UK\n"
        + "3;7;not a date;1;1;P;UK\n"
    )
    settings = make_settings(data={"transactions": {"path": str(export), "csv_delimiter": ";"}})
    message = _refused(settings)
    # 5 rows read: 2 duplicates of the first line are removed, not rejected
    assert message.startswith(f"{export}: all 3 rows rejected (and 2 exact duplicates removed)")
    assert "'missing_customer_id': 2, 'unparseable_ts': 1" in message
    assert message.endswith(
        "most are missing_customer_id: check data.transactions.columns.customer_id in params.yaml"
    )


def test_bundled_online_retail_reconciles(make_settings):
    settings = make_settings(data={"transactions": {"path": str(SAMPLE)}})
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rows_read == 1_067_370
    assert summary.customers == 5_942
    assert (
        summary.rows_read == summary.rows_kept + summary.rows_rejected + summary.duplicates_removed
    )
    # The two yearly files overlap on 2010-12-01..09: the overlap is removed as duplicates.
    assert summary.duplicates_removed > 30_000
    assert summary.first_ts == "2009-12-01 07:45:00"
    assert summary.last_ts == "2011-12-09 12:50:00"


def test_excel_export_is_read(tmp_path, make_settings):
    export = tmp_path / "orders.xlsx"
    pd.DataFrame(
        {
            "Invoice": ["1", "2"],
            "Customer ID": [7.0, 8.0],
            "InvoiceDate": ["2021-01-01 10:00:00", "2021-01-02 11:00:00"],
            "Quantity": [2, 1],
            "Price": [1.5, 4.0],
            "StockCode": ["A", "B"],
            "Country": ["Germany", "France"],
        }
    ).to_excel(export, index=False)
    settings = make_settings(data={"transactions": {"path": str(export)}})
    assert ingest.run(settings.data, settings.paths).rows_kept == 2
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["customer_id"].tolist() == ["7", "8"]
    assert kept["amount"].tolist() == [3.0, 4.0]


# An .xls workbook as shop systems still export it: dates are date cells, not text. Order
# ids start with the region ("CA-2016-152156"), not with a cancellation's C.
XLS_EXPORT = {
    "path": str(ROOT / "tests/data/orders.xls"),
    "columns": {
        "customer_id": "Customer ID",
        "ts": "Order Date",
        "order_id": "Order ID",
        "amount": "Sales",
        "quantity": "Quantity",
        "unit_price": None,
        "product_id": None,
        "country": None,
    },
}


def test_old_excel_workbook_is_read_with_its_date_cells(make_settings):
    export = {**XLS_EXPORT, "return_order_prefix": None}
    settings = make_settings(data={"transactions": export})
    assert ingest.run(settings.data, settings.paths).rows_kept == 4
    kept = pd.read_parquet(settings.paths.transactions).sort_values(["ts", "amount"])
    assert kept["customer_id"].tolist() == ["SO-20335", "DV-13045", "CG-12520", "CG-12520"]
    assert kept["ts"].dt.strftime("%Y-%m-%d %H:%M").tolist() == [
        "2015-10-11 00:00",
        "2016-06-12 00:00",
        "2016-11-08 00:00",
        "2016-11-08 00:00",
    ]
    assert kept["amount"].tolist() == [957.5775, 14.62, 261.96, 731.94]
    assert kept["quantity"].tolist() == [5.0, 2.0, 2.0, 3.0]
    assert not kept["is_return"].any()


def test_return_prefix_that_would_make_most_lines_returns_stops_ingest(make_settings):
    # With the default prefix C, three of the four purchases would become returns.
    settings = make_settings(data={"transactions": XLS_EXPORT})
    assert _refused(settings) == (
        f"{XLS_EXPORT['path']}: 3 of 4 lines would be returns only because their order id "
        "starts with 'C' (data.transactions.return_order_prefix), e.g. ['CA-2016-138688', "
        "'CA-2016-152156']; their quantity (or amount) is positive. If such "
        "order ids are not returns in this export, set data.transactions.return_order_prefix: "
        "null in params.yaml"
    )


def _sheet(invoices: list[str], **renamed: str) -> pd.DataFrame:
    """Lines of a workbook sheet, one per invoice; ``renamed`` renames columns."""
    return pd.DataFrame(
        {
            "Invoice": invoices,
            "Customer ID": ["7"] * len(invoices),
            "InvoiceDate": ["2021-01-01 10:00:00"] * len(invoices),
            "Quantity": ["1"] * len(invoices),
            "Price": ["2.5"] * len(invoices),
            "StockCode": ["A"] * len(invoices),
            "Country": ["UK"] * len(invoices),
        }
    ).rename(columns=renamed)


def test_every_sheet_of_a_workbook_is_read(tmp_path, make_settings):
    export = tmp_path / "orders.xlsx"
    with pd.ExcelWriter(export) as book:
        _sheet(["1", "2"]).to_excel(book, sheet_name="2020", index=False)
        _sheet(["3"]).to_excel(book, sheet_name="2021", index=False)
        pd.DataFrame().to_excel(book, sheet_name="notes", index=False)  # empty: left out
    settings = make_settings(data={"transactions": {"path": str(export)}})
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_read, summary.rows_kept) == (3, 3)
    kept = pd.read_parquet(settings.paths.transactions)
    assert sorted(kept["order_id"]) == ["1", "2", "3"]


def test_sheets_with_different_columns_stop_naming_the_sheets(tmp_path, make_settings):
    export = tmp_path / "orders.xlsx"
    with pd.ExcelWriter(export) as book:
        _sheet(["1"]).to_excel(book, sheet_name="orders", index=False)
        _sheet(["2"], Price="Unit price").to_excel(book, sheet_name="pivot", index=False)
    settings = make_settings(data={"transactions": {"path": str(export)}})
    message = _refused(settings)
    assert message.startswith(f"{export}: its sheets have different columns (sheet 'orders': [")
    assert "sheet 'pivot': ['Invoice', 'Customer ID', 'InvoiceDate', 'Quantity', 'Unit price'" in (
        message
    )


def test_unreadable_file_is_named(tmp_path, make_settings):
    export = tmp_path / "broken.parquet"
    export.write_bytes(b"not parquet at all")
    settings = make_settings(data={"transactions": {"path": str(export)}})
    with pytest.raises(InputError, match=r"broken.parquet: cannot read as parquet"):
        ingest.run(settings.data, settings.paths)


def test_glob_reads_every_matching_file_and_drops_the_overlap(tmp_path, make_settings):
    header = "Invoice;Customer ID;InvoiceDate;Quantity;Price;StockCode;Country\n"
    shared = "2;8;2021-01-31 10:00:00;1;2.0;B;UK\n"  # in every monthly export
    (tmp_path / "jan.csv").write_text(header + "1;7;2021-01-02 10:00:00;1;1.0;A;UK\n" + shared)
    (tmp_path / "feb.csv").write_text(header + shared + "3;7;2021-02-02 10:00:00;1;3.0;C;UK\n")
    (tmp_path / "mar.csv").write_text(header + shared + shared)
    (tmp_path / "notes.txt").write_text("not an export")
    settings = make_settings(
        data={"transactions": {"path": str(tmp_path / "*.csv"), "csv_delimiter": ";"}}
    )
    summary = ingest.run(settings.data, settings.paths)
    assert len(summary.files) == 3
    assert summary.rows_read == 6
    assert summary.duplicates_removed == 3
    assert summary.rows_kept == 3
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["order_id"].tolist() == ["1", "2", "3"]
    assert kept["channel"].isna().all()  # not mapped: null on every line


# Text timestamps and their time in Berlin (UTC+2 on 1 June 2021), worked out by hand.
BERLIN_TIMES = [
    ("2021-06-01 10:00:00", "2021-06-01 10:00:00"),  # naive: already Berlin time
    ("2021-06-01T10:00", "2021-06-01 10:00:00"),
    ("2021-06-01", "2021-06-01 00:00:00"),
    ("2021-06-01 10:00:00+00:00", "2021-06-01 12:00:00"),
    ("2021-06-01T10:00:00Z", "2021-06-01 12:00:00"),
    ("2021-06-01 10:00:00+0200", "2021-06-01 10:00:00"),
    ("2021-06-01 10:00:00-03", "2021-06-01 15:00:00"),
    ("2021-06-01 10:00:00.5+01:00", "2021-06-01 11:00:00.500000"),
    ("2021-06-01 10:00:00 UTC", "2021-06-01 12:00:00"),
    ("2021-06-01 10:00:00 America/New_York", "2021-06-01 16:00:00"),  # EDT, UTC-4
    ("\t2021-06-01 10:00:00+00:00 ", "2021-06-01 12:00:00"),
    ("2021-06-01 10:00:00 -0400", "2021-06-01 16:00:00"),  # Shopify's "Created at"
    ("2021-12-01 10:00:00 +00:00", "2021-12-01 11:00:00"),  # CET in winter
]


def test_offsets_convert_to_the_shop_time_zone(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    rows = [{"c": k, "t": text, "v": 5} for k, (text, _) in enumerate(BERLIN_TIMES)]
    pd.DataFrame(rows).to_csv(export, index=False)
    settings = make_settings(
        data={
            "transactions": {
                "path": str(export),
                "timezone": "Europe/Berlin",
                "columns": _line_totals("c", "t", "v"),
            }
        }
    )
    assert ingest.run(settings.data, settings.paths).rows_kept == len(BERLIN_TIMES)
    kept = pd.read_parquet(settings.paths.transactions)
    kept = kept.sort_values("customer_id", key=lambda ids: ids.astype(int))
    assert [str(t) for t in kept["ts"]] == [berlin for _, berlin in BERLIN_TIMES]


# (text, ts_format, the time kept in Europe/Berlin or None when rejected as unparseable)
NUMBER_TIMES = [
    ("1616889600000", "unix_ms", "2021-03-28 01:00:00"),  # 00:00 UTC, CET (UTC+1)
    ("1616893200000", "unix_ms", "2021-03-28 03:00:00"),  # 01:00 UTC, CEST from then on
    ("1622541600123", "unix_ms", "2021-06-01 12:00:00.123000"),
    ("1622541600", "unix_ms", None),  # seconds: January 1970 in milliseconds
    ("1622541600", "unix_s", "2021-06-01 12:00:00"),
    ("1622541600.5", "unix_s", "2021-06-01 12:00:00.500000"),
    ("1622541600123", "unix_s", None),  # milliseconds: the year 53,000 in seconds
    ("1622541600123456", "unix_us", "2021-06-01 12:00:00.123456"),
    ("0", "days since 2020-01-01", "2020-01-01 00:00:00"),  # a calendar day: no offset
    (" 59 ", "days since 2020-01-01", "2020-02-29 00:00:00"),
    ("366", "days since 2020-01-01", "2021-01-01 00:00:00"),
    ("-1", "days since 2020-01-01", "2019-12-31 00:00:00"),
    ("1.5", "days since 2020-01-01", None),
    ("2021-06-01 10:00", "days since 2020-01-01", "2021-06-01 10:00:00"),  # ISO beside
    ("day 3", "days since 2020-01-01", None),
]


@pytest.mark.parametrize("ts_format", sorted({f for _, f, _ in NUMBER_TIMES}))
def test_times_written_as_numbers_read_with_their_unit(ts_format, tmp_path, make_settings):
    cases = [(text, kept) for text, f, kept in NUMBER_TIMES if f == ts_format]
    export = tmp_path / "orders.csv"
    rows = [{"c": k, "t": text, "v": 5} for k, (text, _) in enumerate(cases)]
    pd.DataFrame(rows).to_csv(export, index=False)
    settings = _ctv_settings(make_settings, export, timezone="Europe/Berlin", ts_format=ts_format)
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rejected_by_reason["unparseable_ts"] == sum(k is None for _, k in cases)
    kept = pd.read_parquet(settings.paths.transactions)
    kept = kept.sort_values("customer_id", key=lambda ids: ids.astype(int))
    assert [str(t) for t in kept["ts"]] == [k for _, k in cases if k is not None]


def test_unix_times_in_a_typed_parquet_column_are_read(tmp_path, make_settings):
    export = tmp_path / "app.parquet"
    times = pd.Series([1622541600123, 1616889600000], dtype="int64")
    pd.DataFrame({"c": ["1", "2"], "t": times, "v": [5.0, 6.0]}).to_parquet(export)
    settings = _ctv_settings(make_settings, export, timezone="Europe/Berlin", ts_format="unix_ms")
    assert ingest.run(settings.data, settings.paths).rows_kept == 2
    kept = pd.read_parquet(settings.paths.transactions).sort_values("customer_id")
    assert [str(t) for t in kept["ts"]] == ["2021-06-01 12:00:00.123000", "2021-03-28 01:00:00"]


def test_unix_times_in_another_unit_name_the_units(tmp_path, make_settings):
    export = tmp_path / "app.csv"
    export.write_text("c,t,v\n1,1622541600,5\n2,1622541600,5\n")
    settings = _ctv_settings(make_settings, export, ts_format="unix_ms")
    assert _refused(settings) == (
        f"{export}: 2 of 2 rows have no Unix time in the unit of ts_format 'unix_ms' (one "
        "between 1973 and the year 5138), e.g. ['1622541600', '1622541600']; check the unit in "
        "data.transactions.ts_format: unix_s counts seconds, unix_ms milliseconds, unix_us "
        "microseconds"
    )


def test_a_ts_format_with_an_offset_converts_to_the_shop_time_zone(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    export.write_text("c,t,v\n1,01/06/2021 10:00 -0400,5\n2,01/12/2021 10:00 +0000,5\n")
    zoned = "%d/%m/%Y %H:%M %z"
    settings = _ctv_settings(make_settings, export, timezone="Europe/Berlin", ts_format=zoned)
    assert ingest.run(settings.data, settings.paths).rows_kept == 2
    kept = pd.read_parquet(settings.paths.transactions).sort_values("customer_id")
    assert [str(t) for t in kept["ts"]] == ["2021-06-01 16:00:00", "2021-12-01 11:00:00"]


TYPED = pd.DataFrame(
    {
        "Customer ID": [13085.0, 13085.0, 13086.0, 13087.0],
        "InvoiceDate": pd.to_datetime(
            ["2021-06-01 10:00", "2021-06-01 10:00", None, "2021-06-02 09:30"]
        ).tz_localize("UTC"),
        "Invoice": ["1", "1", "2", "3"],
        "Quantity": [2, 2, 1, -1],
        "Price": [4.33, 4.33, 1.0, 2.5],
        "StockCode": ["A", "A", "B", "C"],
        "Country": ["Germany", "Germany", "France", "Spain"],
    }
)


def _typed_settings(make_settings, path: Path):
    return make_settings(
        data={"transactions": {"path": str(path), "timezone": "Europe/Berlin", "columns": {}}}
    )


def test_parquet_exports_of_one_schema_are_read_together_and_the_overlap_dropped(
    tmp_path, make_settings
):
    TYPED.to_parquet(tmp_path / "may.parquet", index=False)
    june = TYPED.assign(Invoice=["1", "4", "5", "6"])  # its first line is also in May
    june.to_parquet(tmp_path / "june.parquet", index=False)
    settings = _typed_settings(make_settings, tmp_path / "*.parquet")
    summary = ingest.run(settings.data, settings.paths)
    assert summary.files == {str(tmp_path / "june.parquet"): 4, str(tmp_path / "may.parquet"): 4}
    # May repeats its line 1, June repeats May's: both copies go.
    assert (summary.rows_kept, summary.rows_rejected, summary.duplicates_removed) == (4, 2, 2)
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["order_id"].tolist() == ["1", "3", "4", "6"]
    assert kept["amount"].tolist() == [8.66, -2.5, 8.66, -2.5]


def test_without_order_ids_only_the_overlap_of_exports_is_removed(tmp_path, make_settings):
    # Day-level exports without order ids: a customer's two same-day purchases of 9.99 are
    # two identical lines. May holds A's pair and B's line; June repeats the pair (the
    # exports overlap) and holds A's line of another day three times.
    header = "customer,date,total\n"
    (tmp_path / "may.csv").write_text(
        header + "A,2021-05-31,9.99\nA,2021-05-31,9.99\nB,2021-05-30,5\n"
    )
    (tmp_path / "june.csv").write_text(
        header + "A,2021-05-31,9.99\nA,2021-05-31,9.99\n" + "A,2021-06-02,1.5\n" * 3
    )
    columns = _line_totals("customer", "date", "total")
    settings = make_settings(data={"transactions": {"path": str(tmp_path), "columns": columns}})
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_read, summary.rows_kept, summary.duplicates_removed) == (8, 6, 2)
    kept = pd.read_parquet(settings.paths.transactions)
    spend = kept.groupby(["customer_id", kept["ts"].dt.date.astype(str)])["amount"]
    assert spend.agg(["count", "sum"]).round(2).to_dict("index") == {
        ("A", "2021-05-31"): {"count": 2, "sum": 19.98},
        ("A", "2021-06-02"): {"count": 3, "sum": 4.5},
        ("B", "2021-05-30"): {"count": 1, "sum": 5.0},
    }


def test_lines_differing_in_an_unmapped_column_are_not_duplicates(tmp_path, make_settings):
    # May: an order's two lines of 9.99 differ only in their sku, which is not mapped: two
    # lines; the third repeats the second exactly. June repeats May's order (the exports
    # overlap) with another export date, and holds B's line.
    header = "order,customer,date,total,sku,exported\n"
    (tmp_path / "may.csv").write_text(
        header + "1,A,2021-05-03,9.99,X,05-31\n1,A,2021-05-03,9.99,Y,05-31\n"
        "1,A,2021-05-03,9.99,Y,05-31\n"
    )
    (tmp_path / "june.csv").write_text(
        header + "1,A,2021-05-03,9.99,X,06-30\n1,A,2021-05-03,9.99,Y,06-30\n"
        "2,B,2021-06-01,5,X,06-30\n"
    )
    columns = {**_line_totals("customer", "date", "total"), "order_id": "order"}
    settings = make_settings(data={"transactions": {"path": str(tmp_path), "columns": columns}})
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_read, summary.rows_kept, summary.duplicates_removed) == (6, 3, 3)
    kept = pd.read_parquet(settings.paths.transactions)
    assert kept.groupby("order_id")["amount"].sum().round(2).to_dict() == {"1": 19.98, "2": 5.0}


def test_a_negative_line_total_without_a_quantity_is_a_return(tmp_path, make_settings):
    (tmp_path / "sales.csv").write_text("c,t,v\nA,2021-05-03,10\nA,2021-05-20,-4\nB,2021-05-21,0\n")
    columns = _line_totals("c", "t", "v")
    settings = make_settings(data={"transactions": {"path": str(tmp_path), "columns": columns}})
    ingest.run(settings.data, settings.paths)
    kept = pd.read_parquet(settings.paths.transactions).sort_values("ts")
    assert kept[["amount", "is_return"]].values.tolist() == [[10, False], [-4, True], [0, False]]


def test_typed_parquet_columns_are_taken_as_typed(tmp_path, make_settings):
    """Zoned timestamps, integer quantities and double prices are used without text; the
    rejects still show each value as text."""
    TYPED.to_parquet(tmp_path / "typed.parquet", index=False)
    settings = _typed_settings(make_settings, tmp_path / "typed.parquet")
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_kept, summary.duplicates_removed) == (2, 1)
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["customer_id"].tolist() == ["13085", "13087"]
    # 10:00 and 09:30 UTC in Berlin summer time; 2 x 4.33; a return is negative.
    assert [str(t) for t in kept["ts"]] == ["2021-06-01 12:00:00", "2021-06-02 11:30:00"]
    assert kept["amount"].tolist() == [8.66, -2.5]
    assert kept["quantity"].tolist() == [2.0, -1.0]
    rejected = pd.read_parquet(settings.paths.rejects).iloc[0]
    assert rejected["reason"] == "unparseable_ts"
    assert rejected[["source_customer_id", "source_quantity", "source_unit_price"]].tolist() == [
        "13086.0",
        "1",
        "1.0",
    ]
    assert pd.isna(rejected["source_ts"])


def test_exports_typed_differently_are_read_as_text(tmp_path, make_settings):
    """One month as typed Parquet, the next as CSV, and a float32 price (whose double is
    not the number shown): all read through text, none lost."""
    TYPED.to_parquet(tmp_path / "may.parquet", index=False)
    june = TYPED.assign(Invoice=["4", "4", "5", "6"], Price=TYPED["Price"].astype("float32"))
    june.to_parquet(tmp_path / "june.parquet", index=False)
    pd.read_parquet(tmp_path / "may.parquet").assign(Invoice=["7", "7", "8", "9"]).to_csv(
        tmp_path / "july.csv", index=False
    )
    settings = _typed_settings(make_settings, tmp_path / "*.*")
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_kept, summary.rows_rejected, summary.duplicates_removed) == (6, 3, 3)
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["amount"].tolist() == [8.66, -2.5] * 3
    assert {str(t) for t in kept["ts"]} == {"2021-06-01 12:00:00", "2021-06-02 11:30:00"}


def test_typed_parquet_times_beside_csv_text_in_a_ts_format_are_kept(tmp_path, make_settings):
    archive = TYPED.assign(InvoiceDate=pd.to_datetime(["2009-12-01 09:06"] * 4))
    archive.to_parquet(tmp_path / "archive.parquet", index=False)
    (tmp_path / "export.csv").write_text(
        "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n"
        "7,13085,02/12/2009 10:30,1,2.0,A,UK\n8,13085,13/12/2009 11:00,1,2.0,A,UK\n"
    )
    settings = make_settings(
        data={"transactions": {"path": str(tmp_path), "ts_format": "%d/%m/%Y %H:%M"}}
    )
    summary = ingest.run(settings.data, settings.paths)
    # The archive holds its line 1 twice: one copy is removed.
    assert (summary.rows_kept, summary.rows_rejected, summary.duplicates_removed) == (5, 0, 1)
    kept = pd.read_parquet(settings.paths.transactions).set_index("order_id")
    assert {k: str(t) for k, t in kept["ts"].items()} == {
        "1": "2009-12-01 09:06:00",
        "2": "2009-12-01 09:06:00",
        "3": "2009-12-01 09:06:00",
        "7": "2009-12-02 10:30:00",
        "8": "2009-12-13 11:00:00",
    }


def test_unknown_time_zone_is_named(tmp_path, make_settings):
    settings = make_settings(data={"transactions": {"timezone": "Mars/Olympus"}})
    with pytest.raises(ChurnError, match=r"unknown time zone 'Mars/Olympus'"):
        ingest.run(settings.data, settings.paths)


def test_wrong_date_format_shows_examples_and_format(tmp_path, make_settings):
    export = tmp_path / "us.csv"
    export.write_text(
        "c,t,v\n" + "".join(f"{i},13/0{i}/2021,1\n" for i in range(1, 6)) + "9,2021-01-01,1\n"
    )
    settings = make_settings(
        data={
            "transactions": {
                "path": str(export),
                "columns": _line_totals("c", "t", "v"),
            }
        }
    )
    with pytest.raises(
        InputError,
        match=r"5 of 6 rows have a date that does not parse with "
        r"ISO 8601 \(ts_format: null\), e\.g\. \['13/0",
    ):
        ingest.run(settings.data, settings.paths)
    assert not settings.paths.transactions.exists()


def test_one_export_in_another_date_format_stops_naming_that_file(tmp_path, make_settings):
    """The other exports parse, so over all lines most do: the check is per file too."""
    header = "c,t,v\n"
    (tmp_path / "uk.csv").write_text(
        header + "".join(f"{k},{k + 10}/01/2021 10:00,1\n" for k in range(10))
    )
    (tmp_path / "us.csv").write_text(
        header + "1,01/13/2021 10:00,1\n2,01/14/2021 10:00,1\n"
        "3,01/15/2021 10:00,1\n4,01/02/2021 10:00,1\n"
    )
    settings = make_settings(
        data={
            "transactions": {
                "path": str(tmp_path),
                "ts_format": "%d/%m/%Y %H:%M",
                "columns": _line_totals("c", "t", "v"),
            }
        }
    )
    message = _refused(settings)
    assert message.startswith(
        f"{tmp_path / 'us.csv'}: 3 of 4 rows have a date that does not parse with ts_format "
        "'%d/%m/%Y %H:%M', e.g. ['01/1"
    )
    assert "uk.csv" not in message


def test_lines_in_two_exports_are_one_line_of_the_first(tmp_path, make_settings):
    """A line repeated across exports is removed once, and counted with the first file."""
    header = "c,t,v\n"
    (tmp_path / "a.csv").write_text(header + "1,2021-01-01,1\n2,2021-01-02,1\n")
    (tmp_path / "b.csv").write_text(header + "2,2021-01-02,1\n3,x,1\n4,y,1\n")
    settings = make_settings(
        data={"transactions": {"path": str(tmp_path), "columns": _line_totals("c", "t", "v")}}
    )
    with pytest.raises(InputError, match=r"b\.csv: 2 of 2 rows have a date that does not parse"):
        ingest.run(settings.data, settings.paths)


def test_events_are_ingested_into_families(tmp_path, make_settings, messy_settings):
    events = tmp_path / "data" / "events" / "events.csv"
    events.write_text(
        "customer_id,ts,event_type,value\n"
        "13085.0,2021-01-02 09:00:00,page_view,\n"
        "13085,2021-01-03 09:00:00,nps,3\n"
        "13087,2021-01-04 09:00:00,webinar,\n"
        ",2021-01-04 09:00:00,visit,\n"
        "13087,yesterday,visit,\n"
        "13087,2021-01-05 09:00:00,,\n"
        "13087,2021-01-05 09:00:00,,\n"
    )
    summary = ingest.run(messy_settings.data, messy_settings.paths)
    assert summary.rows_kept == 3  # the transactions as before
    kept = pd.read_parquet(messy_settings.paths.events).sort_values("ts")
    assert kept["customer_id"].tolist() == ["13085", "13085", "13087"]
    assert kept["family"].tolist() == ["visit", "nps", "other"]
    assert kept["value"].iloc[1] == 3.0
    report = json.loads(messy_settings.paths.ingest_report.read_text())["events"]
    assert report["rejected_by_reason"] == {
        "missing_customer_id": 1,
        "unparseable_ts": 1,
        "implausible_ts": 0,
        "missing_event_type": 1,
    }
    assert report["duplicates_removed"] == 1
    assert report["reconciles"] is True


def test_without_events_an_empty_events_table_is_written(messy_settings):
    ingest.run(messy_settings.data, messy_settings.paths)
    events = pd.read_parquet(messy_settings.paths.events)
    assert events.empty
    assert list(events.columns) == ["customer_id", "ts", "event_type", "family", "value"]
    report = json.loads(messy_settings.paths.ingest_report.read_text())
    assert "events" not in report


# --- order status -------------------------------------------------------------------------

# A WooCommerce-style export: a failed payment and two cancelled orders (one of them with a
# date that does not parse) are no purchases; a refund and an order on hold are.
STATUSES = """order,customer,date,total,status
1,A,2021-01-01 10:00,20,Completed
2,A,2021-01-02 10:00,15, FAILED
3,B,2021-01-03 10:00,30,cancelled
4,B,someday,30,Cancelled
5,B,2021-01-05 10:00,12,Refunded
6,C,2021-01-06 10:00,8,On hold
7,C,2021-01-07 10:00,9,
"""


def _status_settings(tmp_path: Path, make_settings, **source: Any):
    export = tmp_path / "orders.csv"
    export.write_text(STATUSES)
    columns = {
        **_line_totals("customer", "date", "total"),
        "order_id": "order",
        "status": "status",
    }
    return make_settings(data={"transactions": {"path": str(export), "columns": columns, **source}})


def test_lines_with_an_excluded_status_are_no_purchases(tmp_path, make_settings):
    settings = _status_settings(tmp_path, make_settings)
    summary = ingest.run(settings.data, settings.paths)
    kept = pd.read_parquet(settings.paths.transactions)
    assert sorted(kept["order_id"]) == ["1", "5", "6", "7"]
    # Order 4's date does not parse either: its status is checked first.
    no_other = dict.fromkeys(ingest.REJECT_REASONS, 0)
    assert summary.rejected_by_reason == {**no_other, "excluded_status": 3}
    rejects = pd.read_parquet(settings.paths.rejects).set_index("source_order_id")
    assert rejects["source_status"].to_dict() == {
        "2": " FAILED",
        "3": "cancelled",
        "4": "Cancelled",
    }
    report = json.loads(settings.paths.ingest_report.read_text())
    assert report["reconciles"] is True


def test_the_excluded_statuses_are_a_setting(tmp_path, make_settings):
    settings = _status_settings(tmp_path, make_settings, excluded_statuses=["Refunded", "on hold"])
    summary = ingest.run(settings.data, settings.paths)
    kept = pd.read_parquet(settings.paths.transactions)
    assert sorted(kept["order_id"]) == ["1", "2", "3", "7"]  # 4's date does not parse
    assert summary.rejected_by_reason["excluded_status"] == 2
    assert summary.rejected_by_reason["unparseable_ts"] == 1


# --- currency -----------------------------------------------------------------------------

CURRENCIES = """Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Currency
1,A,2021-01-01 10:00,2,10.0,P1,GBP
2,A,2021-01-02 10:00,1,50.0,P2,eur
3,B,2021-01-03 10:00,3,5.0,P1, EUR
C4,B,2021-01-04 10:00,-1,5.0,P1,EUR
5,B,2021-01-05 10:00,1,8.0,P3,USD
6,C,2021-01-06 10:00,1,8.0,P3,USD
7,C,2021-01-07 10:00,4,2.5,P3,
8,C,2021-01-08 10:00,2,100,P4,JPY
"""


@pytest.fixture
def currency_settings(tmp_path: Path, make_settings):
    export = tmp_path / "currencies.csv"
    export.write_text(CURRENCIES)
    return make_settings(
        data={
            "transactions": {
                "path": str(export),
                "columns": {"currency": "Currency", "country": None},
                "reporting_currency": "GBP",
                "currency_rates": {"EUR": 0.86, "JPY": 0.0052},
            }
        }
    )


def test_amounts_are_converted_to_the_reporting_currency(currency_settings):
    summary = ingest.run(currency_settings.data, currency_settings.paths)
    kept = pd.read_parquet(currency_settings.paths.transactions).set_index("order_id")
    # 2 x 10 GBP; 50 EUR x 0.86; 3 x 5 EUR x 0.86; a return of 5 EUR; 2 x 100 JPY x 0.0052
    expected = {"1": 20.0, "2": 43.0, "3": 12.9, "C4": -4.3, "8": 1.04}
    assert kept["amount"].round(6).to_dict() == expected
    assert summary.rejected_by_reason == {
        "missing_customer_id": 0,
        "unparseable_ts": 0,
        "implausible_ts": 0,
        "non_finite_amount": 0,
        "non_finite_quantity": 0,
        "missing_currency": 1,
        "unknown_currency": 2,
    }


def test_unknown_currencies_are_rejected_by_name_and_reconcile(currency_settings):
    ingest.run(currency_settings.data, currency_settings.paths)
    rejects = pd.read_parquet(currency_settings.paths.rejects).set_index("source_order_id")
    assert rejects["reason"].to_dict() == {
        "5": "unknown_currency",
        "6": "unknown_currency",
        "7": "missing_currency",
    }
    assert rejects.loc["5", "source_currency"] == "USD"
    report = json.loads(currency_settings.paths.ingest_report.read_text())
    assert report["reconciles"] is True
    assert (report["rows_read"], report["rows_kept"], report["rows_rejected"]) == (8, 5, 3)
    assert report["currency"] == {
        "reporting_currency": "GBP",
        "rates": {"GBP": 1.0, "EUR": 0.86, "JPY": 0.0052},
        "kept_by_currency": {
            "EUR": {"lines": 3, "amount": 51.6},  # 43.0 + 12.9 - 4.3
            "GBP": {"lines": 1, "amount": 20.0},
            "JPY": {"lines": 1, "amount": 1.04},
        },
        "rejected_unknown_currencies": {"USD": 2},
    }


def test_without_a_currency_column_nothing_is_converted(messy_settings):
    ingest.run(messy_settings.data, messy_settings.paths)
    report = json.loads(messy_settings.paths.ingest_report.read_text())
    assert "currency" not in report
    assert "unknown_currency" not in report["rejected_by_reason"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"columns": {"currency": "Currency"}, "reporting_currency": None},
            r"reporting_currency must name",
        ),
        ({"currency_rates": {"EUR": 0}}, r"currency_rates must be > 0, got \{'EUR': 0.0\}"),
        (
            {"reporting_currency": "GBP", "currency_rates": {"gbp": 1.2}},
            r"reporting currency GBP the rate 1.2; it must be 1",
        ),
    ],
    ids=["no-reporting-currency", "zero-rate", "reporting-rate-not-one"],
)
def test_currency_params_are_checked(make_settings, overrides, message):
    with pytest.raises(ChurnError, match=message):
        make_settings(data={"transactions": overrides})


# --- returns matched to orders ------------------------------------------------------------

RETURNS = """Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode
1,A,2021-01-01 10:00,2,10.0,P1
2,A,2021-01-05 10:00,1,10.0,P1
3,A,2021-01-06 10:00,1,4.0,P2
C10,A,2021-01-07 10:00,-1,10.0,P1
C11,A,2021-01-02 10:00,-1,10.0,P1
C12,A,2021-01-07 10:00,-1,4.0,P3
4,B,2021-01-08 10:00,1,4.0,P3
C13,B,2021-01-07 10:00,-1,4.0,P3
C14,B,2021-01-09 10:00,-1,4.0,P1
5,B,2021-01-10 10:00,1,4.0,P1
"""


def _returns_settings(tmp_path: Path, make_settings, **columns):
    export = tmp_path / "returns.csv"
    export.write_text(RETURNS)
    columns = {"country": None, **columns}
    return make_settings(data={"transactions": {"path": str(export), "columns": columns}})


def test_returns_are_matched_to_the_latest_earlier_purchase(tmp_path, make_settings):
    settings = _returns_settings(tmp_path, make_settings)
    ingest.run(settings.data, settings.paths)
    kept = pd.read_parquet(settings.paths.transactions).set_index("order_id")
    matched = {k: None if pd.isna(v) else v for k, v in kept["matched_order_id"].items()}
    assert matched == {
        "1": None,
        "2": None,
        "3": None,
        "4": None,
        "5": None,
        "C10": "2",  # A bought P1 in orders 1 and 2; 2 is the latest before the return
        "C11": "1",  # only order 1 came before this one
        "C12": None,  # A never bought P3
        "C13": None,  # B bought P3 only after returning it
        "C14": None,  # B's P1 purchase comes later; A's purchases are not B's
    }
    report = json.loads(settings.paths.ingest_report.read_text())
    assert report["returns"] == {"lines": 5, "matched": 2, "unmatched": 3}
    assert report["reconciles"] is True


def test_without_order_ids_no_return_is_matched(tmp_path, make_settings):
    settings = _returns_settings(tmp_path, make_settings, order_id=None)
    ingest.run(settings.data, settings.paths)
    kept = pd.read_parquet(settings.paths.transactions)
    assert kept["matched_order_id"].isna().all()
    assert kept["is_return"].sum() == 5  # negative quantities
    report = json.loads(settings.paths.ingest_report.read_text())
    assert report["returns"] == {"lines": 5, "matched": 0, "unmatched": 5}


# --- exports the engine reads lazily ------------------------------------------------------


def _long_export(path: Path, bad_line: str) -> None:
    """A header and 30,000 good lines, line 25,000 (past DuckDB's 20,480-line sniff
    sample) replaced by ``bad_line``; written as latin-1."""
    lines = [f"{k},{k % 50},2021-01-01 10:00:00,1,2.5,P1,UK\n" for k in range(30_000)]
    lines[24_998] = bad_line
    header = "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n"
    path.write_bytes((header + "".join(lines)).encode("latin-1"))


@pytest.mark.parametrize(
    ("bad_line", "cause"),
    [
        (
            "99,1,2021-01-01 10:00:00,1,2.5,P1,UK,extra\n",
            r"Original Line: 99,1,2021-01-01 10:00:00,1,2.5,P1,UK,extra; "
            r"Expected Number of Columns: 7 Found: 8",
        ),
        ("99,1,2021-01-01 10:00:00,1,2.5,P1,caf\xe9\n", r"This file is not utf-8 encoded"),
    ],
    ids=["extra-field", "latin-1-byte"],
)
def test_a_bad_line_past_the_sniff_sample_names_the_file_and_the_cause(
    tmp_path, make_settings, bad_line, cause
):
    (tmp_path / "a.csv").write_text(MESSY.replace(";", ","))
    _long_export(tmp_path / "b.csv", bad_line)
    settings = make_settings(data={"transactions": {"path": str(tmp_path / "*.csv")}})
    message = _refused(settings)
    assert message.startswith(f"{tmp_path / 'b.csv'}: cannot read: ")
    assert re.search(r"CSV Error on Line: 25000; .*" + cause, message)
    assert message.endswith(
        "check data.transactions.csv_delimiter (now ',') and data.transactions.csv_encoding "
        "(now 'utf-8') in params.yaml"
    )
    assert "ignore_errors" not in message


def test_a_bad_line_within_the_sniff_sample_is_named_not_taken_for_the_header(
    tmp_path, make_settings
):
    export = tmp_path / "short.csv"
    lines = [f"{k},{k % 5},2021-01-01 10:00:00,1,2.5,P1,UK\n" for k in range(100)]
    lines[48] = "99,1,2021-01-01 10:00:00,1,2.5,P1,UK,extra\n"  # line 50 of the file
    export.write_text(
        "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n" + "".join(lines)
    )
    settings = make_settings(data={"transactions": {"path": str(export)}})
    message = _refused(settings)
    assert message.startswith(f"{export}: cannot read: ")
    assert re.search(r"CSV Error on Line: 50; Original Line: 99,1,.*,UK,extra; ", message)
    assert "Expected Number of Columns: 7 Found: 8" in message


# cp1252 is read from a UTF-8 copy: the message still names the export.
@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_an_empty_file_in_a_folder_is_named(tmp_path, make_settings, encoding):
    (tmp_path / "a.csv").write_text(MESSY.replace(";", ","))
    (tmp_path / "b.csv").write_text("")
    source = {"path": str(tmp_path), "csv_encoding": encoding}
    settings = make_settings(data={"transactions": source})
    assert _refused(settings) == (
        f"{tmp_path / 'b.csv'}: empty file (no header); remove it or export it again"
    )


def test_a_header_names_repeated_and_empty_columns_as_duckdb_does(tmp_path):
    export = tmp_path / "dup.csv"
    export.write_text("a, b ,a,,a\n1,2,3,4,5\n")
    assert read_table(ibis.duckdb.connect(), export, "csv").columns == (
        "a",
        "b",
        "a_1",
        "column3",
        "a_2",
    )


def test_the_same_long_export_reads_with_its_encoding(tmp_path, make_settings):
    _long_export(tmp_path / "b.csv", "late,1,2021-01-01 10:00:00,1,2.5,P1,caf\xe9\n")
    settings = make_settings(
        data={"transactions": {"path": str(tmp_path / "b.csv"), "csv_encoding": "latin-1"}}
    )
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_read, summary.rows_kept) == (30_000, 30_000)
    kept = pd.read_parquet(settings.paths.transactions)
    assert kept.loc[kept["order_id"] == "late", "country"].tolist() == ["café"]


# Windows exports: €, the dash and the quote are bytes 0x80, 0x96 and 0x92 in cp1252, control
# codes in latin-1
DASH, QUOTE = "\u2013", "\u2019"
CP1252_EXPORT = "Invoice;Customer ID;InvoiceDate;Quantity;Price;StockCode;Country\n" + (
    f"1;Société Générale;2021-01-01 10:00:00;1;2,5;MUG{DASH}€;Côte d{QUOTE}Ivoire\n"
    "2;Straße 5;2021-01-02 10:00:00;2;3;P1;Österreich\n"
)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_an_export_in_a_windows_encoding_is_read_with_its_characters(
    tmp_path, make_settings, compressed
):
    data = CP1252_EXPORT.encode("cp1252")
    export = tmp_path / ("orders.csv.gz" if compressed else "orders.csv")
    export.write_bytes(gzip.compress(data) if compressed else data)
    source = {"path": str(export), "csv_delimiter": ";", "decimal_separator": ","}
    settings = make_settings(data={"transactions": {**source, "csv_encoding": "cp1252"}})
    assert ingest.run(settings.data, settings.paths).rows_kept == 2
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["customer_id"].tolist() == ["Société Générale", "Straße 5"]
    assert kept["product_id"].tolist() == [f"MUG{DASH}€", "P1"]
    assert kept["country"].tolist() == [f"Côte d{QUOTE}Ivoire", "Österreich"]
    assert kept["amount"].tolist() == [2.5, 6.0]


@pytest.mark.parametrize("encoding", ["iso-8859-1", "latin1", "UTF8", "utf-8-sig"])
def test_every_spelling_of_an_encoding_reads(tmp_path, make_settings, encoding):
    export = tmp_path / "orders.csv"
    text = CP1252_EXPORT.replace(f"{DASH}€", "").replace(QUOTE, "'")  # in latin-1 too
    export.write_bytes(text.encode(encoding))
    source = {"path": str(export), "csv_delimiter": ";", "decimal_separator": ","}
    settings = make_settings(data={"transactions": {**source, "csv_encoding": encoding}})
    assert ingest.run(settings.data, settings.paths).rows_kept == 2
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["country"].tolist() == ["Côte d'Ivoire", "Österreich"]


def test_a_byte_not_in_the_encoding_names_the_file_and_the_setting(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    export.write_bytes(CP1252_EXPORT.encode("cp1252").replace(b"P1", b"P\x81"))
    source = {"path": str(export), "csv_delimiter": ";", "csv_encoding": "cp1252"}
    settings = make_settings(data={"transactions": source})
    assert _refused(settings) == (
        f"{export}: cannot read as cp1252: character maps to <undefined> (byte 0x81); check "
        "data.transactions.csv_encoding in params.yaml"
    )


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_a_header_and_lines_ending_in_different_ways_are_read(tmp_path, make_settings, compressed):
    # CDNOW_sample.txt's layout: the header ends in LF, every line in CR LF.
    data = (
        b" master_id sample_id date number_of_cds dollar_value\n"
        b" 00004 0001 19970101  2   29.33\r\n 00004 0001 19970118  2   29.73\r\n"
        b" 00018 0002 19970102  2   13.97\r\n"
    )
    export = tmp_path / ("sample.txt.gz" if compressed else "sample.txt")
    export.write_bytes(gzip.compress(data) if compressed else data)
    columns = {**_line_totals("master_id", "date", "dollar_value"), "quantity": "number_of_cds"}
    source = {"format": "csv", "csv_delimiter": "whitespace", "ts_format": "%Y%m%d"}
    settings = make_settings(
        data={"transactions": {"path": str(export), **source, "columns": columns}}
    )
    assert ingest.run(settings.data, settings.paths).rows_kept == 3
    kept = pd.read_parquet(settings.paths.transactions).sort_values("ts")
    assert kept["customer_id"].tolist() == ["00004", "00018", "00004"]
    assert kept["amount"].tolist() == [29.33, 13.97, 29.73]
    assert kept["quantity"].tolist() == [2.0, 2.0, 2.0]


def test_lines_ending_in_different_ways_past_the_first_megabyte_are_named(tmp_path, make_settings):
    export = tmp_path / "b.csv"
    _long_export(export, "99,1,2021-01-01 10:00:00,1,2.5,P1,UK\n")
    data = export.read_bytes().replace(b"\n", b"\r\n")
    export.write_bytes(data + b"100,1,2021-01-01 10:00:00,1,2.5,P1,UK\n" * 2)
    settings = make_settings(data={"transactions": {"path": str(export)}})
    message = _refused(settings)
    assert message.startswith(f"{export}: cannot read")
    assert message.endswith(
        "; its lines end both in CR LF (Windows) and in LF alone (Unix) past its first 1 MB: "
        "save it again with one kind of line end (e.g. dos2unix)"
    )


def test_a_bad_line_of_an_export_read_from_a_utf8_copy_names_the_export(tmp_path, make_settings):
    _long_export(tmp_path / "b.csv", "99,1,2021-01-01 10:00:00,1,2.5,P1,UK,extra\n")
    source = {"path": str(tmp_path / "b.csv"), "csv_encoding": "cp1252"}
    settings = make_settings(data={"transactions": source})
    message = _refused(settings)
    assert message.startswith(f"{tmp_path / 'b.csv'}: cannot read: ")
    assert "CSV Error on Line: 25000" in message
    assert "churn-utf8" not in message  # the copy's folder


# --- placeholder customer ids -------------------------------------------------------------

PLACEHOLDER_IDS = ["NULL", " n/a ", "NA", "nan", "None", "-", "N/A", "null"]


def test_placeholder_customer_ids_are_missing_not_one_customer(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    ids = [*PLACEHOLDER_IDS, "NAB", "7"]  # real ids that merely look alike are kept
    export.write_text(
        "c,t,v\n" + "".join(f"{c},2021-01-{k + 1:02d},5\n" for k, c in enumerate(ids))
    )
    settings = make_settings(
        data={"transactions": {"path": str(export), "columns": _line_totals("c", "t", "v")}}
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rejected_by_reason["missing_customer_id"] == len(PLACEHOLDER_IDS)
    assert sorted(pd.read_parquet(settings.paths.transactions)["customer_id"]) == ["7", "NAB"]
    rejects = pd.read_parquet(settings.paths.rejects)
    assert sorted(rejects["source_customer_id"]) == sorted(PLACEHOLDER_IDS)


def test_placeholder_customer_ids_in_events_are_missing(tmp_path, messy_settings):
    (tmp_path / "data" / "events" / "events.csv").write_text(
        "customer_id,ts,event_type,value\n"
        + "".join(f"{c},2021-01-02 09:00:00,visit,\n" for c in PLACEHOLDER_IDS)
        + "13085,2021-01-02 09:00:00,visit,\n"
    )
    ingest.run(messy_settings.data, messy_settings.paths)
    assert pd.read_parquet(messy_settings.paths.events)["customer_id"].tolist() == ["13085"]
    report = json.loads(messy_settings.paths.ingest_report.read_text())["events"]
    assert report["rejected_by_reason"]["missing_customer_id"] == len(PLACEHOLDER_IDS)


# --- implausible times --------------------------------------------------------------------


def test_times_before_1970_or_after_the_run_are_implausible(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    today = datetime.now(UTC).date()
    times = {
        "1": "1900-01-01 10:00:00",
        "2": "1969-12-31 23:59:59",
        "3": "1970-01-01 00:00:00",  # the first plausible time
        "4": "2011-03-04 10:00:00",
        "5": f"{today} 08:00:00",  # today is plausible
        "6": "2999-01-01 00:00:00",  # a typo for a year
        "7": "2011-03-05 10:00:00",
    }
    export.write_text("c,t,v\n" + "".join(f"{c},{t},5\n" for c, t in times.items()))
    settings = make_settings(
        data={"transactions": {"path": str(export), "columns": _line_totals("c", "t", "v")}}
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rejected_by_reason["implausible_ts"] == 3
    assert (summary.rows_kept, summary.rows_rejected) == (4, 3)
    rejects = pd.read_parquet(settings.paths.rejects).set_index("source_customer_id")
    assert rejects["reason"].to_dict() == dict.fromkeys(["1", "2", "6"], "implausible_ts")
    assert rejects.loc["6", "source_ts"] == "2999-01-01 00:00:00"
    report = json.loads(settings.paths.ingest_report.read_text())
    assert report["rejected_by_reason"]["implausible_ts"] == 3
    assert report["reconciles"] is True


def test_a_two_digit_year_read_with_percent_y_is_implausible(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    export.write_text("c,t,v\n1,01/02/2011,5\n2,01/02/11,5\n3,03/02/2011,5\n")
    settings = make_settings(
        data={
            "transactions": {
                "path": str(export),
                "ts_format": "%d/%m/%Y",
                "columns": _line_totals("c", "t", "v"),
            }
        }
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rejected_by_reason["implausible_ts"] == 1  # the year 11
    assert pd.read_parquet(settings.paths.rejects)["source_ts"].tolist() == ["01/02/11"]


def test_mostly_implausible_dates_stop_with_examples_and_the_format(tmp_path, make_settings):
    export = tmp_path / "orders.csv"
    export.write_text("c,t,v\n1,01/02/11,5\n2,03/02/11,5\n3,03/02/2011,5\n")
    settings = make_settings(
        data={
            "transactions": {
                "path": str(export),
                "ts_format": "%d/%m/%Y",
                "columns": _line_totals("c", "t", "v"),
            }
        }
    )
    with pytest.raises(
        InputError,
        match=r"2 of 3 rows have a date before 1970-01-01 or more than a day after now \(UTC\) "
        r"when read with ts_format '%d/%m/%Y', e\.g\. \['0[13]/02/11', '0[13]/02/11'\]; check "
        r"data\.transactions\.ts_format",
    ):
        ingest.run(settings.data, settings.paths)


def test_plausible_times_end_one_day_after_the_run():
    times = ["1970-01-01", "2021-06-02 12:00:00", "2021-06-02 12:00:01"]
    empty = {c: pd.Series([None] * 3, dtype="string") for c in CANONICAL_COLUMNS}
    raw = pd.DataFrame(empty).assign(customer_id="7", ts=times, amount="5").astype("string")
    parsed = ingest.parse_lines(
        ibis.memtable(raw),
        ts_format=None,
        return_order_prefix=None,
        run_at=datetime(2021, 6, 1, 12, 0),
    )
    reasons = parsed.order_by("source_ts").reason.to_pyarrow().to_pylist()
    assert reasons == [None, None, "implausible_ts"]


def test_implausible_event_times_are_rejected(tmp_path, messy_settings):
    (tmp_path / "data" / "events" / "events.csv").write_text(
        "customer_id,ts,event_type,value\n"
        "13085,2021-01-02 09:00:00,visit,\n"
        "13085,1900-01-01 09:00:00,visit,\n"
        "13087,2999-01-03 09:00:00,visit,\n"
        "13087,2021-01-03 09:00:00,visit,\n"
    )
    ingest.run(messy_settings.data, messy_settings.paths)
    assert len(pd.read_parquet(messy_settings.paths.events)) == 2
    report = json.loads(messy_settings.paths.ingest_report.read_text())["events"]
    assert report["rejected_by_reason"]["implausible_ts"] == 2
    rejected = pd.read_parquet(messy_settings.paths.event_rejects)
    assert sorted(rejected["source_ts"]) == ["1900-01-01 09:00:00", "2999-01-03 09:00:00"]


# --- decimal commas -----------------------------------------------------------------------


def _decimal_comma_export(path: Path) -> None:
    """A European export: 199 lines priced 5,95 (quoted, as the delimiter is a comma too)
    and one priced 6."""
    lines = [f'{k},{k % 20},2021-01-01 10:00:00,2,"5,95",P1,DE\n' for k in range(199)]
    path.write_text(
        "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n"
        + "".join(lines)
        + "199,3,2021-01-01 10:00:00,2,6,P2,DE\n"
    )


def test_decimal_commas_read_with_the_comma_separator(tmp_path, make_settings):
    export = tmp_path / "de.csv"
    _decimal_comma_export(export)
    settings = make_settings(data={"transactions": {"path": str(export), "decimal_separator": ","}})
    summary = ingest.run(settings.data, settings.paths)
    assert (summary.rows_kept, summary.rows_rejected) == (200, 0)
    kept = pd.read_parquet(settings.paths.transactions)
    assert kept["amount"].round(6).value_counts().to_dict() == {11.9: 199, 12.0: 1}


# Text, its number with the decimal point, and with the decimal comma (None: unparsed).
WRITTEN_NUMBERS = [
    ("1234.5", 1234.5, None),
    ("$1,234.50", 1234.5, None),
    ("-$5.00", -5.0, None),
    ("$-5.00", -5.0, None),
    ("£ 12.50", 12.5, None),
    ("1,234,567", 1234567.0, None),
    ("1 234.5", 1234.5, None),
    ("1\u00a0234,5", None, 1234.5),
    ("1'234,5", None, 1234.5),
    ("1.234,5 €", None, 1234.5),
    ("1.234.567", None, 1234567.0),
    ("5,95", None, 5.95),
    # One separator, once: read only as the setting's decimal, never as thousands.
    ("1,000", None, 1.0),
    ("1.000", 1.0, None),
    ("2.5", 2.5, None),
    ("1,23.4", None, None),
    ("12.50 EUR", None, None),
    ("(12.50)", -12.5, None),
    ("($1,234.50)", -1234.5, None),
    ("(1.234,50 €)", None, -1234.5),
    ("12.50-", -12.5, None),
    ("12,50 -", None, -12.5),
    ("-12.50-", None, None),
    ("(-12.50)", None, None),
    ("(12.50", None, None),
    ("€", None, None),
]


@pytest.mark.parametrize("decimal_separator", [".", ","])
def test_numbers_written_for_people_are_read_where_only_one_reading_exists(decimal_separator):
    column = 1 if decimal_separator == "." else 2
    texts = ibis.memtable({"text": [row[0] for row in WRITTEN_NUMBERS]})
    read = texts.select(number=ingest._number(texts.text, decimal_separator)).to_pyarrow()
    expected = [row[column] for row in WRITTEN_NUMBERS]
    assert read["number"].to_pylist() == expected


def test_decimal_comma_with_a_thousands_point_is_read_as_thousands(tmp_path, make_settings):
    export = tmp_path / "de.csv"
    export.write_text('c,t,v\n1,2021-01-01,"1.234,5"\n2,2021-01-02,"4,5"\n3,2021-01-03,7\n')
    settings = make_settings(
        data={
            "transactions": {
                "path": str(export),
                "decimal_separator": ",",
                "columns": _line_totals("c", "t", "v"),
            }
        }
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rows_rejected == 0
    kept = pd.read_parquet(settings.paths.transactions).sort_values("customer_id")
    assert kept["amount"].tolist() == [1234.5, 4.5, 7.0]


def test_mostly_non_numeric_amounts_stop_with_examples_and_the_settings(tmp_path, make_settings):
    export = tmp_path / "de.csv"
    _decimal_comma_export(export)
    settings = make_settings(data={"transactions": {"path": str(export)}})
    message = _refused(settings)
    assert message.startswith(
        f"{export}: 199 of 200 rows have no numeric amount (quantity, unit_price), e.g. "
        "[{'quantity': '2', 'unit_price': '5,95'}"
    )
    assert "set data.transactions.decimal_separator: \",\" (now '.')" in message
    assert message.endswith("else check data.transactions.columns in params.yaml")


def _with_line_totals(path: Path, text: str, make_settings):
    """Settings for an export with customer, time, quantity and a line total."""
    path.write_text(text)
    columns = {**_line_totals("c", "t", "total"), "quantity": "qty"}
    return make_settings(data={"transactions": {"path": str(path), "columns": columns}})


def test_a_quantity_that_is_not_a_number_is_rejected_though_the_amount_is_given(
    tmp_path, make_settings
):
    settings = _with_line_totals(
        tmp_path / "orders.csv",
        'c,t,qty,total\n1,2021-01-01,two,5\n2,2021-01-02,"1,000",5\n'
        '3,2021-01-03,"-1,000",-5\n4,2021-01-04,,5\n5,2021-01-05,-2,-5\n6,2021-01-06,3,9\n'
        "7,2021-01-07,1,1\n8,2021-01-08,1,1\n",
        make_settings,
    )
    summary = ingest.run(settings.data, settings.paths)
    assert summary.rejected_by_reason["non_finite_quantity"] == 3
    assert summary.rows_kept == 5
    rejects = pd.read_parquet(settings.paths.rejects).set_index("source_customer_id")
    assert rejects["source_quantity"].to_dict() == {"1": "two", "2": "1,000", "3": "-1,000"}
    assert set(rejects["reason"]) == {"non_finite_quantity"}
    kept = pd.read_parquet(settings.paths.transactions).set_index("customer_id")
    # An empty quantity is allowed when the line total is given.
    assert kept["is_return"].to_dict() == {
        "4": False,
        "5": True,
        "6": False,
        "7": False,
        "8": False,
    }


def test_mostly_non_numeric_quantities_stop_naming_the_quantity(tmp_path, make_settings):
    settings = _with_line_totals(
        tmp_path / "orders.csv",
        "c,t,qty,total\n1,2021-01-01,two,5\n2,2021-01-02,three,5\n3,2021-01-03,1,5\n",
        make_settings,
    )
    message = _refused(settings)
    assert message.startswith(
        f"{tmp_path / 'orders.csv'}: 2 of 3 rows have no numeric quantity (quantity), e.g. "
    )
    assert "{'quantity': 'two'}" in message


def test_event_values_read_with_the_comma_separator(tmp_path, messy_settings, make_settings):
    (tmp_path / "data" / "events" / "events.csv").write_text(
        'customer_id,ts,event_type,value\n13085,2021-01-02 09:00:00,csat,"4,5"\n'
    )
    settings = make_settings(
        data={
            "transactions": {"path": str(tmp_path / "export.csv"), "csv_delimiter": ";"},
            "events": {"decimal_separator": ","},
        }
    )
    ingest.run(settings.data, settings.paths)
    assert pd.read_parquet(settings.paths.events)["value"].tolist() == [4.5]


# --- folders ------------------------------------------------------------------------------


def test_a_folder_reads_compressed_exports_and_subfolders(tmp_path, make_settings):
    folder = tmp_path / "in"
    (folder / "2011").mkdir(parents=True)
    header = "Invoice,Customer ID,InvoiceDate,Quantity,Price,StockCode,Country\n"
    (folder / "a.csv").write_text(header + "1,7,2011-01-02 10:00:00,1,1.0,A,UK\n")
    with gzip.open(folder / "b.csv.gz", "wt") as stream:
        stream.write(header + "2,7,2011-01-03 10:00:00,1,2.0,B,UK\n")
    (folder / "2011" / "c.csv").write_text(header + "3,8,2011-02-02 10:00:00,1,3.0,C,UK\n")
    zstd = duckdb.connect()
    zstd.execute(
        f"COPY (SELECT '4' AS Invoice, '8' AS \"Customer ID\", '2011-03-02 10:00:00' AS "
        "InvoiceDate, '1' AS Quantity, '4.0' AS Price, 'D' AS StockCode, 'UK' AS Country) "
        f"TO '{folder / '2011' / 'd.csv.zst'}' (HEADER, COMPRESSION zstd)"
    )
    (folder / ".gitkeep").write_text("")
    settings = make_settings(data={"transactions": {"path": str(folder)}})
    summary = ingest.run(settings.data, settings.paths)
    assert summary.files == {
        str(folder / name): 1 for name in ("2011/c.csv", "2011/d.csv.zst", "a.csv", "b.csv.gz")
    }
    kept = pd.read_parquet(settings.paths.transactions).sort_values("order_id")
    assert kept["amount"].tolist() == [1.0, 2.0, 3.0, 4.0]
