"""Benchmark of the synthetic generator: seconds to generate about 10 million transactions.

A pilot run measures transaction lines per customer; the timed runs use the customer count
that yields about ``--rows`` lines. The median of ``--repeats`` runs of
``churn.synth.generate`` (in memory, no file writing) is printed and written as JSON::

    python benchmarks/bench_synth.py --rows 10000000 --out reports/bench_synth.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from churn.synth import SynthSpec, generate

PILOT_CUSTOMERS = 20_000


def customers_for(rows: int, *, months: int, seed: int) -> int:
    """Customers whose simulation yields about ``rows`` transaction lines."""
    pilot = generate(SynthSpec(n_customers=PILOT_CUSTOMERS, months=months, seed=seed))
    per_customer = len(pilot.transactions) / PILOT_CUSTOMERS
    return max(1, round(rows / per_customer))


def bench(rows: int, *, months: int, repeats: int, seed: int) -> dict[str, float | int]:
    """Time ``repeats`` generations of about ``rows`` lines; the median wall-clock seconds,
    its throughput, and the median CPU seconds."""
    spec = SynthSpec(n_customers=customers_for(rows, months=months, seed=seed), months=months)
    seconds, cpu, lines, events = [], [], 0, 0
    for run in range(repeats):
        spec = SynthSpec(n_customers=spec.n_customers, months=months, seed=seed + run)
        start, start_cpu = time.perf_counter(), time.process_time()
        data = generate(spec)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        lines, events = len(data.transactions), len(data.events)
        del data
    median = statistics.median(seconds)
    return {
        "rows": lines,
        "events": events,
        "customers": spec.n_customers,
        "months": months,
        "repeats": repeats,
        "seconds": [round(s, 3) for s in seconds],
        "seconds_median": round(median, 3),
        "rows_per_s": round(lines / median),
        # CPU seconds of this process: what the wall clock would be on an idle machine
        "cpu_seconds_median": round(statistics.median(cpu), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="target transaction lines")
    parser.add_argument("--months", type=int, default=36, help="window length in months")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = bench(args.rows, months=args.months, repeats=args.repeats, seed=args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
