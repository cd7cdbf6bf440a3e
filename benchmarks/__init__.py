"""Benchmarks of the churn pipeline at 1M, 10M and (opt-in) 100M synthetic transactions.

``python -m benchmarks.run`` (or ``make bench`` / ``churn bench``) writes ``reports/bench.json``.
The pandas and lifetimes-style references live here, outside the package, on purpose: they
are yardsticks, not part of the pipeline.
"""
