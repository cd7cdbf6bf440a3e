"""Synthetic transaction exports of a given size, written as Parquet in chunks."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from churn.synth import SynthSpec, generate

MONTHS = 36  # three years: room for six cutoffs a horizon apart plus a year of history
CHUNK_ROWS = 5_000_000  # rows generated at a time; bounds the generator's memory
PROBE_CUSTOMERS = 5_000


def rows_per_customer(seed: int) -> float:
    """Transaction lines per customer the generator produces over :data:`MONTHS`."""
    probe = generate(SynthSpec(n_customers=PROBE_CUSTOMERS, months=MONTHS, seed=seed))
    return len(probe.transactions) / PROBE_CUSTOMERS


def write_transactions(rows: int, out_dir: Path, *, seed: int = 0) -> dict[str, int]:
    """Write about ``rows`` transaction lines as ``out_dir/transactions-<k>.parquet``.

    Each chunk is an independent population (its own seed); customer and order ids carry the
    chunk number so they never collide. Returns rows, customers and files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    per_customer = rows_per_customer(seed)
    n_chunks = max(1, math.ceil(rows / CHUNK_ROWS))
    customers = round(rows / per_customer / n_chunks)
    written = 0
    for k in range(n_chunks):
        tx = generate(SynthSpec(n_customers=customers, months=MONTHS, seed=seed + k)).transactions
        if n_chunks > 1:
            tx["customer_id"] = f"B{k:03d}" + tx["customer_id"]
            tx["order_id"] = tx["order_id"].str.replace("O", f"O{k:03d}-", n=1, regex=False)
        table = pa.Table.from_pandas(tx, preserve_index=False)
        pq.write_table(table, out_dir / f"transactions-{k:03d}.parquet", row_group_size=1 << 20)
        written += table.num_rows
        del tx, table
    return {"rows": written, "customers": customers * n_chunks, "files": n_chunks}
