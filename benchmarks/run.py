"""Benchmark harness: synthetic data at several sizes, the pipeline stage by stage, references.

For each size it writes synthetic transactions as Parquet into a temporary work folder with
its own ``params.yaml`` (the repository's, pointed at the generated data), then runs every
step in a fresh process ``--repeats`` times: ingest, features, train and score through the
real CLI, model inference alone, the features' Ibis expressions alone, and the pandas and
lifetimes-style references. Seconds are timed inside the process after imports; peak RSS is
the process's own (``wait4``). Medians go to ``reports/bench.json`` with the targets.

    python -m benchmarks.run                 # 1M and 10M rows, 3 repeats
    python -m benchmarks.run --100m          # also 100M rows
    python -m benchmarks.run --sizes 20000 --repeats 1 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (1_000_000, 10_000_000)
HUNDRED_MILLION = 100_000_000
PIPELINE = ("ingest", "features", "train", "score")
REFERENCES = (
    "features_rowlevel",
    "pandas_ref",
    "pandas_ref_rowlevel",
    "lifetimes_ref",
    "inference",
)
TARGETS = {
    "features_s_max": 10.0,
    "features_peak_rss_mb_max": 2048.0,
    "speedup_vs_pandas_min": 5.0,
    "score_customers_per_s_min": 500_000.0,
    "pipeline_100m_s_max": 600.0,
    "pipeline_100m_peak_rss_mb_max": 12 * 1024.0,
}
TARGET_SIZE = "10000000"
# The pandas and lifetimes-style references hold the whole table in pandas (about 0.4 GB per
# million rows): above this size they would not fit in memory, and only the pipeline runs.
REFERENCE_MAX_ROWS = 10_000_000
TIME = "/usr/bin/time"  # GNU time: the peak RSS of exactly one command


def bench_params(data_dir: Path, work: Path, *, btyd_fit_customers: int | None) -> dict[str, Any]:
    """The repository's params with inputs and outputs in ``work``; data from ``data_dir``;
    BTYD models fitted on at most ``btyd_fit_customers`` per cutoff when given (below ten
    repeat buyers the fits are skipped and their columns left missing)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if btyd_fit_customers is not None:
        params["features"]["btyd_fit_customers"] = btyd_fit_customers
    source = params["data"]["transactions"]
    source.update(path=str(data_dir), format="parquet", ts_format=None)
    source["columns"] = {
        "customer_id": "customer_id",
        "ts": "ts",
        "order_id": "order_id",
        "amount": None,
        "quantity": "quantity",
        "unit_price": "unit_price",
        "product_id": "product_id",
        "channel": None,
    }
    params["data"]["events"]["path"] = str(work / "no_events")
    (work / "no_events").mkdir(parents=True, exist_ok=True)
    return params


def run_step(step: str, params: Path, log: Path) -> dict[str, float]:
    """Run one step in a fresh process; its measures plus wall seconds and peak RSS (MB).

    The step runs under ``/usr/bin/time``, which starts it from a small process: the peak
    RSS a child reports after being forked from this harness (which holds the generated data
    for a while) would otherwise start at the harness's own size.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{params.parent / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    peak = params.parent / f".{step}.maxrss"
    command = [sys.executable, "-m", "benchmarks.stage", step, str(params)]
    start = time.perf_counter()
    with log.open("a") as err:
        err.write(f"--- {step}\n")
        err.flush()
        proc = subprocess.run(
            [TIME, "-f", "%M", "-o", str(peak), *command],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=params.parent,
            env=env,
            check=False,
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step {step} failed (exit {proc.returncode}); see {log}")
    measures = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    peak_kb = int(peak.read_text().split()[-1])
    return {**measures, "wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def bench_size(
    rows: int, repeats: int, scratch: Path, log: Path, *, btyd_fit_customers: int | None
) -> dict[str, Any]:
    """All steps at one size, ``repeats`` times each; medians per measure."""
    from benchmarks.data import write_transactions

    work = scratch / f"rows_{rows}"
    generated = write_transactions(rows, work / "raw")
    params = work / "params.yaml"
    chosen = bench_params(work / "raw", work, btyd_fit_customers=btyd_fit_customers)
    params.write_text(yaml.safe_dump(chosen, sort_keys=False))
    references = REFERENCES if rows <= REFERENCE_MAX_ROWS else ("inference",)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in (*PIPELINE, *references)}
    try:
        for _ in range(repeats):
            for step in runs:
                runs[step].append(run_step(step, params, log))
    except RuntimeError as exc:
        # The steps that finished keep their figures: at 100M they took most of an hour.
        med = _medians({s: rs for s, rs in runs.items() if rs})
        return {**stage_figures(med, generated["rows"]), "failed": str(exc), "repeats": repeats}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**size_figures(_medians(runs), generated), "repeats": repeats}


def _medians(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}


def stage_figures(med: dict[str, dict[str, float]], rows: int) -> dict[str, Any]:
    """Seconds, wall seconds and peak RSS of each pipeline stage that ``med`` has."""
    out: dict[str, Any] = {"rows": rows}
    for step in PIPELINE:
        if step in med:
            out[f"{step}_s"] = med[step]["seconds"]
            out[f"{step}_wall_s"] = med[step]["wall_s"]
            out[f"{step}_peak_rss_mb"] = med[step]["peak_rss_mb"]
    return out


def size_figures(med: dict[str, dict[str, float]], generated: dict[str, int]) -> dict[str, Any]:
    """The figures of one size from the median measures of each step; the reference
    figures only where the references ran."""
    rows = generated["rows"]
    out = {**stage_figures(med, rows), "synthetic_customers": generated["customers"]}
    out["features_rows_per_s"] = rows / med["features"]["seconds"]
    out["ingest_rows_per_s"] = rows / med["ingest"]["seconds"]
    out["pipeline_s"] = sum(med[s]["wall_s"] for s in PIPELINE)
    out["pipeline_rows_per_s"] = rows / out["pipeline_s"]
    out["pipeline_peak_rss_mb"] = max(med[s]["peak_rss_mb"] for s in PIPELINE)
    inference = med["inference"]
    out["score_customers"] = int(inference["customers"])
    out["score_customers_per_s"] = inference["customers"] / inference["seconds"]
    out["score_first_call_s"] = inference["first_seconds"]
    if "pandas_ref" not in med:
        return out
    for step, key in (
        ("features_rowlevel", "features_rowlevel"),
        ("pandas_ref", "pandas_ref"),
        ("pandas_ref_rowlevel", "pandas_ref_rowlevel"),
        ("lifetimes_ref", "lifetimes_style_ref"),
    ):
        out[f"{key}_s"] = med[step]["seconds"]
        out[f"{key}_peak_rss_mb"] = med[step]["peak_rss_mb"]
    out["speedup_vs_pandas"] = out["pandas_ref_s"] / out["features_s"]
    out["speedup_vs_pandas_rowlevel"] = out["pandas_ref_rowlevel_s"] / out["features_rowlevel_s"]
    out["speedup_vs_lifetimes_style"] = out["lifetimes_style_ref_s"] / out["features_s"]
    return out


def targets(sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each target of the scale issue, its measured figure and whether it is met; a size
    with a failed step has none."""
    out: dict[str, Any] = {}
    sizes = {size: figures for size, figures in sizes.items() if "failed" not in figures}
    at = sizes.get(TARGET_SIZE)
    if at is not None:
        checks = (
            ("features_s", at["features_s"], "<=", TARGETS["features_s_max"]),
            (
                "features_peak_rss_mb",
                at["features_peak_rss_mb"],
                "<=",
                TARGETS["features_peak_rss_mb_max"],
            ),
            ("speedup_vs_pandas", at["speedup_vs_pandas"], ">=", TARGETS["speedup_vs_pandas_min"]),
        )
        for name, value, op, bound in checks:
            out[f"10m_{name}"] = _check(value, op, bound)
    for size, figures in sizes.items():
        out[f"{size}_score_customers_per_s"] = _check(
            figures["score_customers_per_s"], ">=", TARGETS["score_customers_per_s_min"]
        )
    big = sizes.get(str(HUNDRED_MILLION))
    if big is not None:
        out["100m_pipeline_s"] = _check(big["pipeline_s"], "<=", TARGETS["pipeline_100m_s_max"])
        out["100m_pipeline_peak_rss_mb"] = _check(
            big["pipeline_peak_rss_mb"], "<=", TARGETS["pipeline_100m_peak_rss_mb_max"]
        )
    return out


def _check(value: float, op: str, bound: float) -> dict[str, Any]:
    passed = value <= bound if op == "<=" else value >= bound
    return {"value": value, "target": f"{op} {bound:g}", "pass": bool(passed)}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import duckdb
    import lightgbm
    import pandas

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "pandas": pandas.__version__,
        "lightgbm": lightgbm.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write and return the report."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--100m", dest="hundred_m", action="store_true", help="add 100M rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs per step; medians reported")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    parser.add_argument(
        "--btyd-fit-customers",
        type=int,
        default=None,
        help="features.btyd_fit_customers for the run (default: params.yaml's); 1 skips "
        "the BTYD fits, to time the row-level engine alone",
    )
    parser.add_argument("--keep", action="store_true", help="keep the other sizes already in --out")
    parser.add_argument("--scratch", type=Path, default=None, help="work folder (default: tmp)")
    args = parser.parse_args(argv)
    sizes = [*args.sizes, *([HUNDRED_MILLION] if args.hundred_m else [])]
    report: dict[str, Any] = {
        "machine": machine(),
        "repeats": args.repeats,
        "btyd_fit_customers": args.btyd_fit_customers,
        "sizes": {},
    }
    if args.keep and args.out.is_file():
        report["sizes"] = json.loads(args.out.read_text()).get("sizes", {})
    scratch = Path(tempfile.mkdtemp(prefix="churn-bench-", dir=args.scratch))
    log = args.out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    failed = None
    try:
        for rows in sizes:
            print(f"bench: {rows:,} rows ...", file=sys.stderr, flush=True)
            figures = bench_size(
                rows, args.repeats, scratch, log, btyd_fit_customers=args.btyd_fit_customers
            )
            report["sizes"][str(rows)] = figures
            report["targets"] = targets(report["sizes"])
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            if "failed" in figures:  # larger sizes would fail the same way
                failed = f"{rows:,} rows: {figures['failed']}"
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["notes"] = NOTES
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        sys.exit(f"bench: {failed}; the steps that finished are in {args.out}")
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return report


NOTES = {
    "timing": "seconds are timed inside a fresh process after imports; *_wall_s include "
    "interpreter start and imports; peak RSS is each process's own maximum resident set",
    "features_s": "the features stage: train (4 cutoffs), test and scoring snapshots = 6 "
    "cutoffs, with RFM scores and BTYD fits per cutoff, written to Parquet",
    "features_rowlevel_s": "the same 6 snapshots' Ibis expressions executed to Arrow, without "
    "the pandas snapshot-level steps (RFM scores, BTYD fits)",
    "pandas_ref_s": "benchmarks/references.py: the same features at the same 6 cutoffs in "
    "pandas from the canonical Parquet (the RFM and BTYD steps reuse the stage's code)",
    "lifetimes_style_ref_s": "summary_data_from_transaction_data semantics (daily, with "
    "monetary value) at one cutoff, re-implemented as lifetimes does it",
    "score_customers_per_s": "model inference only (the compiled booster plus calibration) "
    "on the scoring snapshot, after a first call that compiles the booster or loads it from "
    "the machine's cache (score_first_call_s)",
    "pipeline_s": "ingest + features + train + score, wall seconds of the four processes",
    "references": "run up to 10M rows: above that the pandas references would not fit in "
    "memory (about 0.4 GB per million rows), and a size has only the pipeline and inference",
    "btyd": "features include the per-cutoff BG/NBD and Gamma-Gamma fits on at most "
    "features.btyd_fit_customers customers (btyd_fit_customers in this report; null = "
    "params.yaml's); below ten repeat buyers they are skipped and their columns missing",
    "noise": "other jobs share the machine; medians of the repeats",
}


if __name__ == "__main__":
    main()
