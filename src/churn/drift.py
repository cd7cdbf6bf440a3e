"""Population stability: how far a scoring population has moved from the training one.

A *profile* summarises a reference sample as quantile bin edges and the share of values in
each bin, plus the share of missing values; :func:`psi` compares a new sample's
:func:`bin_counts` against it. Models carry profiles of their validation snapshot, so any
scoring job can check drift.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from churn import ChurnError

EPSILON = 1e-4  # floor on bin shares, so an empty bin gives a large but finite PSI


class DriftError(ChurnError):
    """The scoring population moved further than ``drift.fail_psi`` allows."""

    exit_code = 4


def profile(values: np.ndarray, *, bins: int = 10) -> dict[str, list[float]]:
    """Quantile edges of ``values`` and the share of values in each bin, missing last.

    >>> profile(np.array([1.0, 2.0, 3.0, 4.0, np.nan]), bins=2)
    {'edges': [2.5], 'shares': [0.4, 0.4, 0.2]}
    """
    values = np.asarray(values, dtype="float64")
    present = values[~np.isnan(values)]
    inner = (
        np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1]))
        if len(present)
        else np.array([])
    )
    shares = bin_counts({"edges": inner.tolist()}, values) / max(len(values), 1)
    return {"edges": inner.tolist(), "shares": shares.tolist()}


def bin_counts(reference: dict[str, list[float]], values: np.ndarray) -> np.ndarray:
    """How many ``values`` fall in each bin of a :func:`profile`, missing last; counts of
    batches add up to those of the whole population.

    >>> bin_counts({"edges": [2.5], "shares": []}, np.array([1.0, 3.0, 4.0, np.nan])).tolist()
    [1, 2, 1]
    """
    values = np.asarray(values, dtype="float64")
    missing = np.isnan(values)
    inner = np.asarray(reference["edges"], dtype="float64")
    counts = np.bincount(
        np.searchsorted(inner, values[~missing], side="right"), minlength=len(inner) + 1
    )
    return np.append(counts, missing.sum())


def psi(reference: dict[str, list[float]], counts: np.ndarray) -> float:
    """Population stability index against a :func:`profile` of a population given by its
    :func:`bin_counts`.

    ``sum((actual - expected) * ln(actual / expected))`` over the bins; 0 means no shift.

    >>> ref = profile(np.arange(100.0), bins=4)
    >>> round(psi(ref, bin_counts(ref, np.arange(100.0))), 6)
    0.0
    """
    expected = np.clip(np.asarray(reference["shares"]), EPSILON, None)
    actual = np.clip(counts / max(int(counts.sum()), 1), EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def drift_status(
    psis: dict[str, float], *, warn_psi: float, fail_psi: float, exempt: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The drift report of columns with known PSI: status (``ok``, ``warn``, ``fail``) per
    column and overall. Exempt columns (those that move with the calendar by construction)
    warn but never fail."""
    columns = {}
    for name, value in psis.items():
        status = "fail" if value > fail_psi else "warn" if value > warn_psi else "ok"
        if status == "fail" and name in exempt:
            status = "warn"
        columns[name] = {"psi": round(value, 6), "status": status}
    worst = max(
        (c["status"] for c in columns.values()), key=("ok", "warn", "fail").index, default="ok"
    )
    return {
        "status": worst,
        "warn_psi": warn_psi,
        "fail_psi": fail_psi,
        "exempt": list(exempt),
        "columns": columns,
    }
