"""Population stability: how far a scoring population has moved from the training one.

A *profile* summarises a reference sample as quantile bin edges and the share of values in
each bin, plus the share of missing values; :func:`psi` compares a new sample against it.
Models carry profiles of their validation snapshot, so any scoring job can check drift.
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
    return {"edges": inner.tolist(), "shares": _shares(values, inner).tolist()}


def psi(reference: dict[str, list[float]], values: np.ndarray) -> float:
    """Population stability index of ``values`` against a :func:`profile`.

    ``sum((actual - expected) * ln(actual / expected))`` over the bins; 0 means no shift.

    >>> ref = profile(np.arange(100.0), bins=4)
    >>> round(psi(ref, np.arange(100.0)), 6)
    0.0
    """
    return psi_of_counts(reference, bin_counts(reference, values))


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


def psi_of_counts(reference: dict[str, list[float]], counts: np.ndarray) -> float:
    """:func:`psi` of a population given by its :func:`bin_counts`."""
    expected = np.clip(np.asarray(reference["shares"]), EPSILON, None)
    actual = np.clip(counts / max(int(counts.sum()), 1), EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def drift_report(
    references: dict[str, dict[str, list[float]]],
    current: dict[str, np.ndarray],
    *,
    warn_psi: float,
    fail_psi: float,
    exempt: tuple[str, ...] = (),
) -> dict[str, Any]:
    """PSI and status (``ok``, ``warn``, ``fail``) of every profiled column.

    Exempt columns (those that move with the calendar by construction) warn but never fail.
    """
    return drift_status(
        {name: psi(reference, current[name]) for name, reference in references.items()},
        warn_psi=warn_psi,
        fail_psi=fail_psi,
        exempt=exempt,
    )


def drift_status(
    psis: dict[str, float], *, warn_psi: float, fail_psi: float, exempt: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The drift report of columns with known PSI: status per column and overall."""
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


def _shares(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    missing = np.isnan(values)
    counts = np.bincount(
        np.searchsorted(inner_edges, values[~missing], side="right"), minlength=len(inner_edges) + 1
    )
    return np.append(counts, missing.sum()) / max(len(values), 1)
