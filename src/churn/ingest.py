"""Ingest stage: exports in, one canonical transaction table out, unusable rows quarantined.

The canonical table has one row per transaction line::

    customer_id  string     normalised (``13085.0`` -> ``13085``)
    order_id     string     the export's order id, or customer id + timestamp when absent
    ts           timestamp  naive, as exported
    amount       float64    line total, in data.transactions.reporting_currency when the
                            export has a currency column; negative for returns
    quantity     float64    null when the export has none
    product_id   string     null when the export has none
    channel      string     null when the export has none
    country      string     null when the export has none
    is_return    boolean    negative quantity (amount, without a quantity) or an order id
                            with the return prefix
    matched_order_id string for a return, the order of the customer's latest purchase of
                            the same product at or before it (null when none, or when
                            the export has no order ids)

Counts reconcile: rows read = kept + rejected + exact duplicates removed.
"""

from __future__ import annotations

import collections
import difflib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ibis
import ibis.expr.datatypes as dt
import pandas as pd
from ibis.expr import types as ir

from churn.config import (
    CANONICAL_COLUMNS,
    EVENT_COLUMNS,
    DataSettings,
    Engine,
    EventSource,
    NumberTime,
    Paths,
    TransactionSource,
    number_time,
)
from churn.io import (
    InputError,
    connect,
    csv_hint,
    expand_inputs,
    file_format,
    is_spark,
    materialise,
    read_table,
    reading,
    write_json,
    write_parquet,
)

# The canonical table's columns as :func:`canonical` selects them (``matched_order_id`` follows).
LINE_COLUMNS = (
    "customer_id",
    "order_id",
    "ts",
    "amount",
    "quantity",
    "product_id",
    "channel",
    "country",
    "is_return",
)
REJECT_REASONS = (
    "missing_customer_id",
    "unparseable_ts",
    "implausible_ts",
    "non_finite_amount",
    "non_finite_quantity",
)
CURRENCY_REASONS = ("missing_currency", "unknown_currency")  # only with a currency column
STATUS_REASONS = ("excluded_status",)  # only with a status column
EVENT_REJECT_REASONS = (
    "missing_customer_id",
    "unparseable_ts",
    "implausible_ts",
    "missing_event_type",
)
# A time before this, or more than FUTURE_SLACK after the run, is a typo or a wrong
# ts_format ("01/02/11" read with %Y is the year 11), not a real purchase or event. The
# slack covers any shop time zone ahead of UTC.
EARLIEST_TS = datetime(1970, 1, 1)
FUTURE_SLACK = timedelta(days=1)
# The column DuckDB adds to Parquet exports read together: the index of each line's file.
FILE_COLUMN = "_churn_file_index"
FILE_INDEX = "int16"  # the type of a line's file index: a narrow key groups fast
NUMERIC_COLUMNS = frozenset({"amount", "quantity", "unit_price", "value"})
# Placeholders exports write for "no customer" (any case): missing, not one customer who
# would merge every anonymous line.
MISSING_IDS = ("null", "n/a", "na", "nan", "none", "-")
# What Ibis's strip removes; a text with none of them at either end is left as it is.
BLANKS = " \t\n\r\v\f"
# The start of an ISO 8601 date ("2021-06-01 ..."), read as such whatever the ts_format.
ISO_DATE = r"^\d{4}-\d\d-\d\d"
# A time followed by an offset or a zone name ("10:00:00+02:00", "10:00Z", "10:00 UTC").
ZONED_TIME = r":\d\d(\.\d*)?\s*([+-]\d|[A-Za-z])"


@dataclass(frozen=True)
class IngestSummary:
    rows_read: int
    rows_kept: int
    rows_rejected: int
    duplicates_removed: int
    rejected_by_reason: dict[str, int]
    customers: int
    first_ts: str | None
    last_ts: str | None
    files: dict[str, int]


@ibis.udf.scalar.builtin(name="try_strptime")
def _try_strptime(value: str, fmt: str) -> datetime:  # type: ignore[empty-body]
    """DuckDB's ``try_strptime``: null where the text does not match the format."""


@ibis.udf.scalar.builtin(name="try_to_timestamp")
def _try_to_timestamp(value: str, fmt: str) -> datetime:  # type: ignore[empty-body]
    """Spark's ``try_to_timestamp``: null where the text does not match the pattern."""


@ibis.udf.scalar.builtin(name="make_timestamp")
def _utc_micros(micros: int) -> datetime:  # type: ignore[empty-body]
    """DuckDB's ``make_timestamp``: microseconds since the epoch as a naive UTC time."""


@ibis.udf.scalar.builtin(name="timezone")
def _in_zone(zone: str, naive: datetime) -> dt.Timestamp(timezone="UTC"):  # type: ignore[empty-body,valid-type]
    """DuckDB's ``timezone``: a naive time read in ``zone``, as a zoned time."""


@ibis.udf.scalar.builtin(name="timestamp_micros")
def _spark_micros(micros: int) -> datetime:  # type: ignore[empty-body]
    """Spark's ``timestamp_micros``: microseconds since the epoch, shown in the session's zone."""


# Unix times read as seconds outside this range (1973-03-03 to the year 5138) are another
# unit's: 1.4e12 is milliseconds, 1.4e9 read as milliseconds would be January 1970.
UNIX_SECONDS = (1e8, 1e11)
MAX_DAY_NUMBER = 1e6  # |days| from a day-number origin beyond this are no date


# strptime directives as Spark datetime pattern letters (numbers accept 1 or 2 digits).
JAVA_PATTERNS = {
    "%Y": "yyyy",
    "%y": "yy",
    "%m": "M",
    "%d": "d",
    "%H": "H",
    "%I": "h",
    "%M": "m",
    "%S": "s",
    "%f": "SSSSSS",
    "%p": "a",
    "%b": "MMM",
    "%B": "MMMM",
    "%j": "D",
    "%z": "XX",
    "%%": "%",
}


def java_pattern(ts_format: str) -> str:
    """Spark's datetime pattern for a strptime format; literal text is quoted.

    >>> java_pattern("%d/%m/%Y %H:%M")
    'd/M/yyyy H:m'
    >>> java_pattern("%Y-%m-%dT%H:%M")
    "yyyy-M-d'T'H:m"

    Raises
    ------
    InputError
        When the format uses a directive Spark has no pattern for.
    """
    out, k = [], 0
    while k < len(ts_format):
        if ts_format[k] == "%":
            directive = ts_format[k : k + 2]
            if directive not in JAVA_PATTERNS:
                raise InputError(
                    f"ts_format {ts_format!r}: {directive!r} is not supported with engine: "
                    f"spark; use {sorted(JAVA_PATTERNS)}"
                )
            out.append(JAVA_PATTERNS[directive])
            k += 2
        else:
            char = ts_format[k]
            out.append(f"'{char}'" if char.isalpha() else "''" if char == "'" else char)
            k += 1
    return "".join(out)


def source_lines(
    table: ir.Table,
    columns: dict[str, str | None],
    *,
    path: Path,
    names: tuple[str, ...] = CANONICAL_COLUMNS,
    section: str = "data.transactions",
    file: int | ir.IntegerColumn,
    others: tuple[str, ...] = (),
) -> ir.Table:
    """Select the mapped source columns of one export under canonical ``names``: as read
    when typed so that no text is needed (see :func:`_typed`), otherwise as text;
    ``file``, the index of the export each line is in (among the source's files); and the
    unmapped columns ``others`` as text (null where the export has no such column), named by
    :func:`_other_names`.

    Raises
    ------
    InputError
        When a mapped column is not in the file; the message suggests the closest name.
    """
    present = list(table.columns)
    selected = {}
    for canonical in names:
        source = columns.get(canonical)
        if source is None:
            selected[canonical] = ibis.null().cast("string")
            continue
        if source not in present:
            close = difflib.get_close_matches(source, present, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; columns are {present}"
            raise InputError(
                f"{path}: column '{source}' ({section}.columns.{canonical}) not found{hint}"
            )
        column = table[source]
        selected[canonical] = column if _typed(column, canonical) else column.cast("string")
    index = ibis.literal(file, FILE_INDEX) if isinstance(file, int) else file.cast(FILE_INDEX)
    kept = {
        name: table[column].cast("string") if column in present else ibis.null("string")
        for name, column in _other_names(others).items()
    }
    return table.select(**selected, **kept, file=index)


def _other_names(others: tuple[str, ...]) -> dict[str, str]:
    """Internal names for unmapped export columns, which cannot clash with canonical ones."""
    return {f"_other_{i}": column for i, column in enumerate(others)}


def _typed(column: ir.Column, canonical: str) -> bool:
    """Whether a source column is parsed without going through text: a timestamp or date
    for ``ts``; integers, doubles or decimals for amounts, quantities, prices and values;
    text for the rest. (A float32 is read as text: its double is not the number shown.)"""
    kind = column.type()
    if canonical == "ts":
        return kind.is_timestamp() or kind.is_date()
    if canonical in NUMERIC_COLUMNS:
        return kind.is_integer() or kind.is_decimal() or kind.is_float64()
    return kind.is_string()


def _text(value: ir.Value) -> ir.StringValue:
    """Text stripped of blanks at either end; a typed value as its text."""
    if not value.type().is_string():
        return value.cast("string")
    padded = value.re_search(f"^[{BLANKS}]|[{BLANKS}]$")
    # Stripping every value costs three times the test for a blank at an end.
    return ibis.cases((padded, value.strip()), else_=value)


def _number(value: ir.Value, decimal_separator: str = ".") -> ir.FloatingValue:
    """A double; null where text does not parse. With ``decimal_separator`` ``,`` text
    reads ``5,95`` as 5.95, and ``1.000`` stays unparsed. Numbers written for people are
    read where no other reading is possible (see :func:`_grouped_number`): ``$1,234.50``,
    ``1.234,5 €``."""
    if value.type().is_numeric():
        return value.cast("float64")
    text = _text(value)
    plain = text
    if decimal_separator != ".":
        # A point there groups thousands (1.000) or is another convention's decimal: the
        # plain reading would take 1.000 for 1.0.
        plain = ibis.cases((text.contains("."), ibis.null("string")), else_=text)
        plain = plain.replace(decimal_separator, ".")
    # Only the text that does not parse as a plain number is matched against patterns.
    return plain.try_cast("float64").coalesce(_grouped_number(text, decimal_separator))


# Signs of money written beside amounts; what an export gives in words ("EUR") is not read.
CURRENCY_SIGNS = "$£€¥₹"
# Digits grouped by thousands with a space, a no-break space or an apostrophe (1'234.5):
# none of them is ever a decimal separator.
SAFE_GROUPING = " \u00a0'"


def _grouped_number(text: ir.StringValue, decimal_separator: str) -> ir.FloatingValue:
    """A number with a currency sign, digits grouped by thousands or an accountant's
    negative (``(12.50)``, ``12.50-``), or null.

    The separator that is not the decimal one (``,`` for ``.``) groups thousands only where
    no decimal reading remains: followed by a decimal part (``1,234.50``) or repeated
    (``1,234,567``). ``1,000`` alone may be a European 1.0 under the wrong setting, and
    stays unparsed (rejected, not misread); ``1.234,5`` under the wrong one too.
    """
    point = re.escape(decimal_separator)
    other = re.escape("," if decimal_separator == "." else ".")
    lead, group = r"\d{1,3}", r"\d{3})"
    number = "|".join(
        (
            rf"{lead}([{SAFE_GROUPING}]{group}+({point}\d+)?",
            rf"{lead}({other}{group}+{point}\d+",
            rf"{lead}({other}{group}{{2,}}",
            rf"\d+({point}\d+)?",  # a sign of money alone: $12.50
        )
    )
    sign, money = "[+-]?", f"[{CURRENCY_SIGNS}]?"
    amount = rf"{money}\s*({number})\s*{money}"
    # Accountants' negatives: in parentheses, (12.50), or with a trailing minus, 12.50-.
    accounting = rf"\(\s*{amount}\s*\)|{amount}\s*-"
    written = text.re_search(rf"^({sign}{money}\s*{sign}({number})\s*{money}|{accounting})$")
    # One pattern and one replacement, both of the text itself: DuckDB computes an expression
    # used twice on every row first, also where the plain reading succeeded (4x the time).
    digits = text.re_replace(rf"[^0-9+\-{point}]|-\s*$", "").replace(decimal_separator, ".")
    negated = ibis.cases((text.startswith("(") | text.endswith("-"), -1.0), else_=1.0)
    return ibis.cases((written, digits.try_cast("float64") * negated), else_=ibis.null("float64"))


def _customer(value: ir.Value) -> ir.StringValue:
    """Trimmed customer id, ``13085.0`` -> ``13085``; null when empty or a placeholder
    such as ``N/A`` (see ``MISSING_IDS``)."""
    customer = _text(value)
    # No back-reference in the replacement: DuckDB spells it \1, Spark $1.
    customer = ibis.cases(
        (customer.re_search(r"^-?\d+\.0+$"), customer.re_replace(r"\.0+$", "")),
        else_=customer,
    )
    missing = (customer == "") | customer.lower().isin(MISSING_IDS)
    return ibis.cases((missing, ibis.null("string")), else_=customer)


def _timestamp(value: ir.Value, ts_format: str | None, *, spark: bool = False) -> ir.TimestampValue:
    """Naive timestamp in the session's time zone (data.*.timezone); null where text does
    not parse. A zoned value is converted into that zone; a naive one is taken as in it.
    Text is read with ``ts_format`` (a strptime format, or numbers: see
    :class:`churn.config.NumberTime`), and an ISO 8601 date (``2021-06-01 ...``) as ISO."""
    if not value.type().is_string():
        return value.cast("timestamp")
    text = _text(value)
    numbers = number_time(ts_format)
    if numbers is not None:
        formatted = _number_time(text.try_cast("float64"), numbers, spark=spark)
    elif not ts_format:
        return _iso_timestamp(text)
    elif spark:
        formatted = _try_to_timestamp(text, java_pattern(ts_format))
    else:
        formatted = _try_strptime(text, ts_format)
    # A typed timestamp of one export reaches here as ISO text when another gives text (see
    # _read_unique): ISO dates, which no format misreads, are taken beside ts_format.
    iso = ibis.cases((text.re_search(ISO_DATE), _iso_timestamp(text)), else_=ibis.null("timestamp"))
    return formatted.coalesce(iso)


def _number_time(
    number: ir.FloatingValue, numbers: NumberTime, *, spark: bool
) -> ir.TimestampValue:
    """A time written as a number (see :class:`churn.config.NumberTime`), naive in the
    session's time zone: a Unix time is an instant, converted into it; a day number is a
    calendar day, taken at its midnight. Null for a day number that is not whole or beyond
    ``MAX_DAY_NUMBER``, and for a Unix time outside ``UNIX_SECONDS``."""
    if numbers.origin is not None:
        whole = (number == number.floor()) & (number.abs() < MAX_DAY_NUMBER)
        days = ibis.cases((whole, number.cast("int64")), else_=ibis.null("int64"))
        return (ibis.date(numbers.origin) + days.as_interval("D")).cast("timestamp")
    seconds = number / numbers.per_second
    low, high = UNIX_SECONDS
    micros = ibis.cases(
        ((seconds >= low) & (seconds < high), (number * (1e6 / numbers.per_second)).round()),
        else_=ibis.null("float64"),
    ).cast("int64")
    if spark:
        return _spark_micros(micros)
    return _in_zone("UTC", _utc_micros(micros)).cast("timestamp")


def _offset_joined(text: ir.StringValue) -> ir.StringValue:
    """``text`` with the blanks before a numeric offset at its end removed, as in Shopify's
    ``2021-06-01 10:00:00 -0400``, which the engines do not parse with the blank."""
    # No back-reference in a replacement (DuckDB spells it \1, Spark $1): extract and join.
    spaced = r"^(.*\d)\s+([+-]\d\d(:?\d\d)?)$"
    joined = text.re_extract(spaced, 1).concat(text.re_extract(spaced, 2))
    return ibis.cases((text.re_search(spaced), joined), else_=text)


def _iso_timestamp(text: ir.StringValue) -> ir.TimestampValue:
    """An ISO 8601 text as a naive timestamp in the session's time zone; null where it does
    not parse."""
    # Only a time with an offset or zone needs the zoned type, which parses 3x slower;
    # a naive cast drops the offset, so it is kept for times that have none.
    zoned = _offset_joined(text).try_cast(dt.Timestamp(timezone="UTC")).cast("timestamp")
    naive = text.try_cast("timestamp")
    return ibis.cases((text.re_search(ZONED_TIME), zoned), else_=naive.coalesce(zoned))


def parse_lines(
    raw: ir.Table,
    *,
    ts_format: str | None,
    run_at: datetime,
    return_order_prefix: str | None,
    currency_rates: dict[str, float] | None = None,
    decimal_separator: str = ".",
    excluded_statuses: tuple[str, ...] = (),
) -> ir.Table:
    """Parse text lines into typed canonical columns plus a ``reason`` (null when usable).

    A line whose status, in lower case, is one of ``excluded_statuses`` (lower case, see
    :meth:`TransactionSource.statuses_left_out`) is no purchase: rejected as
    ``excluded_status`` before any other check.

    A time before ``EARLIEST_TS`` or more than ``FUTURE_SLACK`` after ``run_at`` (the
    moment of the run, naive UTC) is implausible and rejected. Numbers given as text use
    ``decimal_separator``.

    With ``currency_rates`` (reporting-currency units per unit of each upper-case code, see
    :meth:`TransactionSource.conversion_rates`) amounts are converted into the reporting
    currency; a line without a currency, or with one not in the table, is rejected. The
    original text stays beside them as ``source_<column>`` for the rejects file, and the
    normalised code as ``currency``.
    """
    raw = raw.rename({f"source_{c}": c for c in CANONICAL_COLUMNS})
    customer = _customer(raw.source_customer_id)
    ts = _timestamp(raw.source_ts, ts_format, spark=is_spark(raw.get_backend()))
    quantity = _number(raw.source_quantity, decimal_separator)
    unit_price = _number(raw.source_unit_price, decimal_separator)
    amount = _number(raw.source_amount, decimal_separator).coalesce(quantity * unit_price)
    # The quantity's sign tells a return; an export of line totals alone has only the amount's.
    signed = ibis.ifelse(quantity.isnull(), amount < 0, quantity < 0).fill_null(False)
    prefixed = ibis.literal(False)
    if return_order_prefix:
        prefixed = raw.source_order_id.startswith(return_order_prefix).fill_null(False)
    is_return = signed | prefixed
    order_id = _text(raw.source_order_id).coalesce(customer.concat("@", _text(raw.source_ts)))
    currency = _text(raw.source_currency).upper()
    currency = ibis.cases((currency == "", ibis.null("string")), else_=currency)
    checks = []
    if excluded_statuses:
        excluded = _text(raw.source_status).lower().isin(excluded_statuses).fill_null(False)
        checks.append((excluded, "excluded_status"))
    checks += [
        (customer.isnull(), "missing_customer_id"),
        (ts.isnull(), "unparseable_ts"),
        (_implausible(ts, run_at), "implausible_ts"),
        (amount.isnull() | amount.isnan() | amount.isinf(), "non_finite_amount"),
        # A quantity given but not a number would hide a return ("-1,000") as a purchase.
        (_given(raw.source_quantity) & ~_finite(quantity), "non_finite_quantity"),
    ]
    if currency_rates:
        rate = ibis.cases(
            *[(currency == code, value) for code, value in currency_rates.items()],
            else_=ibis.null("float64"),
        )
        checks += [(currency.isnull(), "missing_currency"), (rate.isnull(), "unknown_currency")]
        amount = amount * rate
    reason = ibis.cases(*checks, else_=ibis.null("string"))
    return raw.mutate(
        customer_id=customer,
        order_id=order_id,
        ts=ts,
        # A return reduces spend whatever sign the export gave its line total.
        amount=ibis.cases((is_return, -amount.abs()), else_=amount),
        quantity=quantity,
        product_id=_text(raw.source_product_id),
        channel=_text(raw.source_channel),
        country=_text(raw.source_country),
        currency=currency,
        is_return=is_return,
        # A return by its order id alone: see _check_return_prefix.
        prefix_only_return=prefixed & ~signed,
        reason=reason,
    )


def _given(value: ir.Value) -> ir.BooleanValue:
    """Whether a source value is there: not null, and not empty text."""
    if not value.type().is_string():
        return value.notnull()
    return value.notnull() & (_text(value) != "")


def _finite(number: ir.FloatingValue) -> ir.BooleanValue:
    """Whether a number is there and neither NaN nor infinite."""
    return number.notnull() & ~number.isnan() & ~number.isinf()


def _implausible(ts: ir.TimestampValue, run_at: datetime) -> ir.BooleanValue:
    """Whether a time lies before ``EARLIEST_TS`` or over ``FUTURE_SLACK`` after ``run_at``."""
    return (ts < ibis.literal(EARLIEST_TS)) | (ts > ibis.literal(run_at + FUTURE_SLACK))


def canonical(parsed: ir.Table) -> ir.Table:
    """The kept lines of :func:`parse_lines`, in the canonical schema."""
    return parsed.filter(parsed.reason.isnull()).select(*LINE_COLUMNS)


def match_returns(lines: ir.Table) -> ir.Table:
    """Add ``matched_order_id`` to canonical lines: for a return, the order of the same
    customer's latest purchase of the same product at or before the return; null for
    purchases and for returns without such a purchase."""
    # The returns are kept as a table (identical lines numbered apart): engines then know
    # they are few and build the joins' hash tables on them, not on the purchases.
    returns = lines.filter(lines.is_return).mutate(_line=ibis.row_number())
    returns = materialise(lines.get_backend(), ibis.util.gen_name("returns"), returns)
    bought = lines.filter(~lines.is_return, lines.product_id.notnull())
    # Only purchases of a product its buyer returned can match.
    bought = bought.semi_join(returns, ["customer_id", "product_id"])
    bought = bought.select(
        "customer_id", "product_id", bought_ts=bought.ts, matched_order_id=bought.order_id
    )
    # Every earlier purchase of the product, then the latest one (ties: the greatest order
    # id). Spark has no as-of join, so this is a join and a max that every engine runs.
    pairs = returns.left_join(
        bought,
        [
            returns.customer_id == bought.customer_id,
            returns.product_id == bought.product_id,
            returns.ts >= bought.bought_ts,
        ],
    )
    latest = pairs.bought_ts.cast("string").concat("|", pairs.matched_order_id).max()
    matched = pairs.group_by("_line", *lines.columns).agg(_latest=latest)
    matched = matched.mutate(
        matched_order_id=matched._latest.re_extract(r"\|(.*)$", 1).nullif("")
    ).select(*lines.columns, "matched_order_id")
    purchases = lines.filter(~lines.is_return).mutate(matched_order_id=ibis.null("string"))
    return ibis.union(purchases, matched)


def return_matches(lines: ir.Table) -> dict[str, int]:
    """Return lines, and how many :func:`match_returns` linked to a purchase order."""
    returns = lines.filter(lines.is_return)
    counts = returns.agg(
        lines=returns.count(), matched=returns.matched_order_id.notnull().sum()
    ).execute()
    n, matched = int(counts["lines"].iloc[0]), int(counts["matched"].fillna(0).iloc[0])
    return {"lines": n, "matched": matched, "unmatched": n - matched}


def sources_of_rejects(parsed: ir.Table) -> ir.Table:
    """:func:`parse_lines` (or :func:`parse_events`) with the ``source_*`` columns emptied
    (null) on kept lines: only rejected lines need their original text, and the table the
    stage keeps is then little wider than the canonical one."""
    rejected = parsed.reason.notnull()
    return parsed.mutate(
        **{
            c: ibis.cases((rejected, parsed[c]), else_=ibis.null(parsed[c].type()))
            for c in parsed.columns
            if c.startswith("source_")
        }
    )


def rejects(parsed: ir.Table, columns: tuple[str, ...] = CANONICAL_COLUMNS) -> ir.Table:
    """The rejected lines of :func:`parse_lines` (or :func:`parse_events`, with its
    ``columns``): their original values as text, and the reason."""
    rejected = parsed.filter(parsed.reason.notnull())
    return rejected.select(
        **{f"source_{c}": rejected[f"source_{c}"].cast("string") for c in columns},
        reason=rejected.reason,
    )


def parse_events(
    raw: ir.Table,
    *,
    ts_format: str | None,
    families: dict[str, tuple[str, ...]],
    run_at: datetime,
    decimal_separator: str = ".",
) -> ir.Table:
    """Parse engagement events: customer, time, type, family (``other`` if unmapped), value;
    times are checked against ``run_at`` and values read with ``decimal_separator`` as in
    :func:`parse_lines`."""
    raw = raw.rename({f"source_{c}": c for c in EVENT_COLUMNS})
    customer = _customer(raw.source_customer_id)
    ts = _timestamp(raw.source_ts, ts_format, spark=is_spark(raw.get_backend()))
    event_type = _text(raw.source_event_type)
    family = ibis.cases(
        *[(event_type.isin(types), name) for name, types in families.items()], else_="other"
    )
    reason = ibis.cases(
        (customer.isnull(), "missing_customer_id"),
        (ts.isnull(), "unparseable_ts"),
        (_implausible(ts, run_at), "implausible_ts"),
        (event_type.isnull() | (event_type == ""), "missing_event_type"),
        else_=ibis.null("string"),
    )
    return raw.mutate(
        customer_id=customer,
        ts=ts,
        event_type=event_type,
        family=family,
        value=_number(raw.source_value, decimal_separator),
        reason=reason,
    )


def _read_unique(
    con: ibis.BaseBackend,
    source: TransactionSource | EventSource,
    *,
    names: tuple[str, ...],
    section: str,
    keep_repeats: bool = False,
) -> tuple[ir.Table, dict[str, int], list[Path]]:
    """All exports of one source, exact duplicate lines removed (an expression the caller
    computes once), each line with the index of the ``file`` it came from (the first when
    several hold it); rows per file. A column the exports type differently is read as text.

    Within an export, lines equal in every column, mapped or not, are one line (an order's
    two lines that differ only in an unmapped product column stay two); with
    ``keep_repeats`` a line an export repeats is kept as often as it repeats. Across
    exports, a line of the mapped columns is kept as often as the export holding it most
    often has it: overlapping exports count their shared lines once, even when an unmapped
    column (an export date, a row number) differs between them."""
    files = expand_inputs(source.path, section=section, declared_format=source.format)
    per_file, tables, kinds = {}, [], set()
    for path in files:
        fmt = file_format(path, source.format, section=section)
        table = read_table(
            con,
            path,
            fmt,
            delimiter=source.csv_delimiter,
            encoding=source.csv_encoding,
            section=section,
        )
        kinds.add((fmt, table.schema()))
        with reading(con, [path], hint=_read_hint(source, [path], section=section)):
            per_file[_display(path)] = int(table.count().execute())
        tables.append(table)
    mapped_sources = {source.columns.get(c) for c in names}
    others = tuple(
        dict.fromkeys(c for table in tables for c in table.columns if c not in mapped_sources)
    )
    frames = [
        source_lines(
            table,
            source.columns,
            path=path,
            names=names,
            section=section,
            file=index,
            others=others,
        )
        for index, (path, table) in enumerate(zip(files, tables, strict=True))
    ]
    if sum(per_file.values()) == 0:
        raise InputError(f"{', '.join(map(str, files))}: input holds no rows")
    if len(files) > 1 and len(kinds) == 1 and fmt == "parquet" and not is_spark(con):
        # Parquet exports of one schema are read as one table: DuckDB then scans the files
        # side by side, where it scans a union's one after another (a distinct of 99M lines
        # in 20 files: 32 s against 48 s).
        table = _read_parquet_indexed(con, files)
        lines = source_lines(
            table,
            source.columns,
            path=files[0],
            names=names,
            section=section,
            file=table[FILE_COLUMN],
            others=others,
        )
        frames = [lines]
    mixed = [c for c in names if len({frame[c].type() for frame in frames}) > 1]
    frames = [frame.mutate(**{c: frame[c].cast("string") for c in mixed}) for frame in frames]
    # Groupings over every export at once (Ibis nests a distinct union pairwise, which
    # hashes each line once per level), on the mapped columns: the canonical columns left
    # unmapped are null throughout.
    mapped = [c for c in names if source.columns.get(c) is not None]
    lines = ibis.union(*[frame.select(*mapped, *_other_names(others), "file") for frame in frames])
    if keep_repeats or others:
        if not keep_repeats:
            lines = lines.distinct()
        copies = lines.group_by([*mapped, "file"]).agg(_copies=lines.count())
        unique = copies.group_by(mapped).agg(file=copies.file.min(), _copies=copies._copies.max())
        unique = unique.mutate(_copy=ibis.range(unique._copies)).unnest("_copy")
    else:  # each line once: one grouping
        unique = lines.group_by(mapped).agg(file=lines.file.min())
    unmapped = {c: ibis.null(frames[0][c].type()) for c in names if c not in mapped}
    unique = unique.mutate(**unmapped).select(*names, "file")
    return unique, per_file, files


def _read_parquet_indexed(con: ibis.BaseBackend, files: list[Path]) -> ir.Table:
    """Parquet ``files`` read as one table on DuckDB, with each line's index in ``files`` as
    ``FILE_COLUMN`` (DuckDB's ``file_index``)."""
    listed = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
    return con.sql(f"SELECT *, file_index AS {FILE_COLUMN} FROM read_parquet([{listed}])")


def _read_hint(source: TransactionSource | EventSource, files: list[Path], *, section: str) -> str:
    """What to check when the engine cannot read ``files`` of ``source``."""
    if any(file_format(path, source.format, section=section) == "csv" for path in files):
        return csv_hint(section, source.csv_delimiter, source.csv_encoding)
    return f"re-export the file, or leave it out of {section}.path in params.yaml"


def run(data: DataSettings, paths: Paths, *, engine: Engine | None = None) -> IngestSummary:
    """Read the exports, deduplicate, parse, quarantine, and write tables, rejects and report.

    Nothing is written unless both sources (transactions, and events when present) pass.
    Row-level work runs on ``engine`` (DuckDB by default).
    """
    source, events = data.transactions, data.events
    con = connect(engine, timezone=source.timezone)
    # Without order ids, one customer's two lines of the same time and amount in an export
    # may well be two purchases (two of the same item, or a day's two visits where exports
    # give only the date): only overlapping exports' shared copies are duplicates.
    unique, per_file, files = _read_unique(
        con,
        source,
        names=CANONICAL_COLUMNS,
        section="data.transactions",
        keep_repeats=not source.columns.get("order_id"),
    )
    rates, excluded = source.conversion_rates(), source.statuses_left_out()
    run_at = datetime.now(UTC).replace(tzinfo=None)
    parsed = parse_lines(
        unique,
        ts_format=source.ts_format,
        run_at=run_at,
        return_order_prefix=source.return_order_prefix,
        currency_rates=rates,
        excluded_statuses=excluded,
        decimal_separator=source.decimal_separator,
    )
    reasons = (
        *REJECT_REASONS,
        *(CURRENCY_REASONS if rates else ()),
        *(STATUS_REASONS if excluded else ()),
    )
    # The first queries over every line: where a lazy engine meets a bad line (Spark fills
    # its cache when the summary reads it).
    with reading(con, files, hint=_read_hint(source, files, section="data.transactions")):
        parsed = materialise(con, "parsed_lines", sources_of_rejects(parsed))
        by_file = _reasons_by_file(parsed)
        summary = _summarise(parsed, by_file, per_file=per_file, reasons=reasons)
    _check_usable(parsed, summary, by_file, files=files, source=source, section="data.transactions")
    if source.return_order_prefix:
        _check_return_prefix(
            parsed, summary.rows_kept, files=files, prefix=source.return_order_prefix
        )
    has_events = bool(
        expand_inputs(
            events.path, allow_empty=True, section="data.events", declared_format=events.format
        )
    )
    event_tables = _ingest_events(events, engine, run_at=run_at) if has_events else None
    lines = canonical(parsed)
    if source.columns.get("order_id"):
        lines = match_returns(lines)
    else:  # without order ids there is no order to link a return to
        lines = lines.mutate(matched_order_id=ibis.null("string"))
    write_parquet(lines, paths.transactions)
    write_parquet(rejects(parsed), paths.rejects)
    if event_tables is None:
        write_parquet(EMPTY_EVENTS, paths.events)
        write_parquet(EMPTY_EVENT_REJECTS, paths.event_rejects)
        report = _report(summary)
    else:
        kept, rejected, event_summary = event_tables
        write_parquet(kept, paths.events)
        write_parquet(rejected, paths.event_rejects)
        report = {**_report(summary), "events": _report(event_summary)}
    report["returns"] = return_matches(con.read_parquet(paths.transactions))
    if rates:
        report["currency"] = currency_report(parsed, source.reporting_currency, rates)
    write_json(report, paths.ingest_report)
    return summary


EMPTY_EVENTS = pd.DataFrame(
    {
        "customer_id": pd.Series(dtype="string"),
        "ts": pd.Series(dtype="datetime64[us]"),
        "event_type": pd.Series(dtype="string"),
        "family": pd.Series(dtype="string"),
        "value": pd.Series(dtype="float64"),
    }
)


EMPTY_EVENT_REJECTS = pd.DataFrame(
    {f"source_{c}": pd.Series(dtype="string") for c in (*EVENT_COLUMNS, "reason")}
).rename(columns={"source_reason": "reason"})


def _ingest_events(
    source: EventSource, engine: Engine | None, *, run_at: datetime
) -> tuple[ir.Table, ir.Table, IngestSummary]:
    con = connect(engine, timezone=source.timezone)
    unique, per_file, files = _read_unique(con, source, names=EVENT_COLUMNS, section="data.events")
    parsed = parse_events(
        unique,
        ts_format=source.ts_format,
        families=source.families,
        run_at=run_at,
        decimal_separator=source.decimal_separator,
    )
    with reading(con, files, hint=_read_hint(source, files, section="data.events")):
        parsed = materialise(con, "parsed_events", sources_of_rejects(parsed))
        by_file = _reasons_by_file(parsed)
        summary = _summarise(parsed, by_file, per_file=per_file, reasons=EVENT_REJECT_REASONS)
    _check_usable(parsed, summary, by_file, files=files, source=source, section="data.events")
    kept = parsed.filter(parsed.reason.isnull()).select(
        "customer_id", "ts", "event_type", "family", "value"
    )
    return kept, rejects(parsed, EVENT_COLUMNS), summary


def currency_report(
    parsed: ir.Table, reporting_currency: str | None, rates: dict[str, float]
) -> dict[str, Any]:
    """Kept lines and their amount per source currency, and the currencies rejected for
    want of a rate, with their line counts."""
    by_code = parsed.group_by("currency", "reason").agg(
        lines=parsed.count(), amount=parsed.amount.sum()
    )
    rows = by_code.execute().itertuples(index=False)
    kept, unknown = {}, {}
    for code, reason, lines, amount in sorted(rows, key=lambda r: str(r[0])):
        if pd.isna(reason):
            kept[code] = {"lines": int(lines), "amount": round(float(amount), 2)}
        elif reason == "unknown_currency":
            unknown[code] = int(lines)
    return {
        "reporting_currency": reporting_currency,
        "rates": rates,
        "kept_by_currency": kept,
        "rejected_unknown_currencies": unknown,
    }


def _check_usable(
    parsed: ir.Table,
    summary: IngestSummary,
    by_file: dict[int, dict[str, int]],
    *,
    files: list[Path],
    source: TransactionSource | EventSource,
    section: str,
) -> None:
    """Stop when nothing is usable, or when most rows of a file fail the same check: a wrong
    setting (a date format, a decimal separator, a column) rather than bad rows. The files
    that fail it are named: one export in another date format is not hidden by the others.
    ``by_file`` is :func:`_reasons_by_file` of ``parsed``."""
    names = ", ".join(map(str, files))
    for reason in MAJORITY_REASONS:
        failing = [k for k in range(len(files)) if _mostly(by_file.get(k, {}), reason)]
        if failing:
            bad = sum(by_file[k].get(reason, 0) for k in failing)
            total = sum(sum(by_file[k].values()) for k in failing)
            examples = parsed.filter(parsed.file.isin(failing))
            cause = _mostly_rejected(examples, reason, source=source, section=section)
            failed = ", ".join(str(files[k]) for k in failing)
            raise InputError(f"{failed}: {bad} of {total} rows {cause}")
    if summary.rows_kept == 0:
        by_reason = summary.rejected_by_reason
        dominant = max(by_reason, key=by_reason.__getitem__)
        removed = summary.duplicates_removed
        duplicates = f" (and {removed} exact duplicates removed)" if removed else ""
        raise InputError(
            f"{names}: all {summary.rows_rejected} rows rejected{duplicates}: {by_reason}; "
            f"most are {dominant}: check {REASON_SETTINGS[dominant].format(section=section)} "
            "in params.yaml"
        )


def _check_return_prefix(parsed: ir.Table, lines: int, *, files: list[Path], prefix: str) -> None:
    """Stop when the return prefix alone makes most of the ``lines`` kept returns: their
    quantity (or amount) says purchase, and their order ids start with the prefix by another
    convention (``CA-2016-152156``, an order from California), not as cancellations."""
    kept = parsed.filter(parsed.reason.isnull())
    flipped = int(kept.prefix_only_return.sum().execute() or 0)
    if flipped * 2 <= lines:
        return
    flipped_ids = kept.filter(kept.prefix_only_return).select("order_id").distinct()
    examples = flipped_ids.order_by("order_id").limit(3).to_pyarrow()["order_id"].to_pylist()
    raise InputError(
        f"{', '.join(map(str, files))}: {flipped} of {lines} lines would be returns only because "
        f"their order id starts with {prefix!r} (data.transactions.return_order_prefix), e.g. "
        f"{examples}; their quantity (or amount) is positive. If such order ids are not "
        "returns in this export, set data.transactions.return_order_prefix: null in params.yaml"
    )


def _reasons_by_file(parsed: ir.Table) -> dict[int, dict[str, int]]:
    """Lines per file index of :func:`parse_lines` (or :func:`parse_events`) by reason,
    ``kept`` for the kept ones."""
    counts = parsed.group_by("file", reason=parsed.reason.fill_null("kept")).agg(n=parsed.count())
    by_file: dict[int, dict[str, int]] = {}
    for file, reason, n in counts.execute().itertuples(index=False, name=None):
        by_file.setdefault(int(file), {})[reason] = int(n)
    return by_file


def _mostly(counts: dict[str, int], reason: str) -> bool:
    """Whether more than half the lines counted by reason have ``reason``.

    >>> _mostly({"kept": 2, "unparseable_ts": 3}, "unparseable_ts")
    True
    >>> _mostly({"kept": 2, "unparseable_ts": 2}, "unparseable_ts")
    False
    """
    return counts.get(reason, 0) * 2 > sum(counts.values())


# What to check in params.yaml when most rows are rejected for a reason.
REASON_SETTINGS = {
    "missing_customer_id": "{section}.columns.customer_id",
    "unparseable_ts": "{section}.ts_format and {section}.columns.ts",
    "implausible_ts": "{section}.ts_format",
    "non_finite_amount": "{section}.decimal_separator and {section}.columns (amount, quantity, "
    "unit_price)",
    "non_finite_quantity": "{section}.decimal_separator and {section}.columns.quantity",
    "missing_currency": "{section}.columns.currency",
    "unknown_currency": "{section}.currency_rates",
    "excluded_status": "{section}.excluded_statuses and {section}.columns.status",
    "missing_event_type": "{section}.columns.event_type",
}
AMOUNT_COLUMNS = ("amount", "quantity", "unit_price")
# Reasons that, for most rows, point at a wrong setting rather than at bad rows.
MAJORITY_REASONS = ("unparseable_ts", "implausible_ts", "non_finite_amount", "non_finite_quantity")


def _mostly_rejected(
    parsed: ir.Table, reason: str, *, source: TransactionSource | EventSource, section: str
) -> str:
    """Why most rows were rejected for ``reason``, with examples of their source text and
    the setting to change."""
    failed = parsed.filter(parsed.reason == reason).limit(3)
    if reason in ("non_finite_amount", "non_finite_quantity"):
        what = reason.removeprefix("non_finite_")
        numbers = AMOUNT_COLUMNS if what == "amount" else ("quantity",)
        mapped = [c for c in numbers if source.columns.get(c)]
        examples = failed.select(**{c: failed[f"source_{c}"].cast("string") for c in mapped})
        return (
            f"have no numeric {what} ({', '.join(mapped)}), e.g. "
            f"{examples.to_pyarrow().to_pylist()}; if the export writes decimals with a comma "
            f'(5,95), set {section}.decimal_separator: "," (now {source.decimal_separator!r}), '
            f"else check {section}.columns in params.yaml"
        )
    examples = failed.select(ts=failed.source_ts.cast("string")).to_pyarrow()["ts"].to_pylist()
    tried = f"ts_format {source.ts_format!r}" if source.ts_format else "ISO 8601 (ts_format: null)"
    if reason == "unparseable_ts":
        numbers = number_time(source.ts_format)
        if numbers is not None and numbers.per_second:
            return (
                f"have no Unix time in the unit of {tried} (one between 1973 and the year "
                f"5138), e.g. {examples}; check the unit in {section}.ts_format: unix_s "
                "counts seconds, unix_ms milliseconds, unix_us microseconds"
            )
        if numbers is not None:
            return (
                f"have no whole number of days for {tried}, e.g. {examples}; check "
                f"{section}.columns.ts and {section}.ts_format in params.yaml"
            )
        return (
            f"have a date that does not parse with {tried}, e.g. {examples}; set "
            f'{section}.ts_format in params.yaml (e.g. "%d/%m/%Y %H:%M", or unix_s for '
            "Unix time)"
        )
    return (
        f"have a date before {EARLIEST_TS:%Y-%m-%d} or more than a day after now (UTC) when "
        f"read with {tried}, "
        f"e.g. {examples}; check {section}.ts_format in params.yaml (%y reads a two-digit "
        "year, %Y a four-digit one)"
    )


def _summarise(
    parsed: ir.Table,
    by_file: dict[int, dict[str, int]],
    *,
    per_file: dict[str, int],
    reasons: tuple[str, ...],
) -> IngestSummary:
    """The counts of :func:`_reasons_by_file` over all files, with the kept lines' customers
    and time span."""
    by_reason = sum(map(collections.Counter, by_file.values()), collections.Counter())
    kept = parsed.filter(parsed.reason.isnull())
    stats = (
        kept.agg(
            customers=kept.customer_id.nunique(), first_ts=kept.ts.min(), last_ts=kept.ts.max()
        )
        .execute()
        .iloc[0]
    )
    rows_read = sum(per_file.values())
    rejected = {r: int(by_reason.get(r, 0)) for r in reasons}
    return IngestSummary(
        rows_read=rows_read,
        rows_kept=int(by_reason.get("kept", 0)),
        rows_rejected=sum(rejected.values()),
        duplicates_removed=rows_read - sum(by_reason.values()),
        rejected_by_reason=rejected,
        customers=int(stats["customers"]),
        first_ts=None if stats["first_ts"] is None else str(stats["first_ts"]),
        last_ts=None if stats["last_ts"] is None else str(stats["last_ts"]),
        files=per_file,
    )


def _report(summary: IngestSummary) -> dict[str, Any]:
    return {
        "rows_read": summary.rows_read,
        "rows_kept": summary.rows_kept,
        "rows_rejected": summary.rows_rejected,
        "duplicates_removed": summary.duplicates_removed,
        "rejected_by_reason": summary.rejected_by_reason,
        "customers": summary.customers,
        "date_range": {"first": summary.first_ts, "last": summary.last_ts},
        "files": summary.files,
        "reconciles": summary.rows_read
        == summary.rows_kept + summary.rows_rejected + summary.duplicates_removed,
    }


def _display(path: Path) -> str:
    """``path`` relative to the working directory when inside it, so reports are portable."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
