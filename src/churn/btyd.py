"""Buy-till-you-die models: BG/NBD, Pareto/NBD and Gamma-Gamma as pure numpy/scipy functions.

Every function works on whole arrays of customers, summarised as in the papers by ``x`` (repeat
purchases in the calibration period), ``t_x`` (time of the last purchase, counted from the
first) and ``T`` (time from the first purchase to the end of calibration), all in one time unit.
Horizons are in the same unit. :func:`rfm_summary` builds these arrays from transactions.

Fits maximise the likelihood over log-parameters with times divided by a scale (by default the
largest ``T``), then map the scale parameters back; the log-likelihood reported is recomputed in
the original units with every constant term kept, so it matches the published values.

References
----------
Schmittlein, Morrison & Colombo (1987), "Counting your customers: who are they and what will they
do next?", Management Science 33(1).
Fader, Hardie & Lee (2005a), "'Counting your customers' the easy way: an alternative to the
Pareto/NBD model", Marketing Science 24(2).
Fader, Hardie & Lee (2005b), "RFM and CLV: using iso-value curves for customer base analysis",
Journal of Marketing Research 42(4); and the note "The Gamma-Gamma model of monetary value" (2013).
Fader & Hardie (2005), "A note on deriving the Pareto/NBD model and related expressions".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields, replace
from typing import Generic, TypeVar

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import linalg, optimize, special

from churn import ChurnError

FloatArray = NDArray[np.float64]

# Fits run on log-parameters in scaled units; a parameter that runs out to this box is not
# identified by the data, which we report instead of returning it, unless the edge stands
# for a limit the model contains (Pareto/NBD without dropout: see fit_pareto_nbd).
_LOG_BOUND = float(np.log(1e6))
_AT_EDGE = 1e-3  # a fitted parameter this close to a bound of its box is on it
# scipy's hyp2f1 is accurate for the 2F1s used here up to this argument (checked against
# series and quadrature); beyond it, and near removable 0/0 points of the closed forms, the
# integrals behind them are computed by tanh-sinh quadrature instead.
_HYP2F1_Z_MAX = 0.9
# The Pareto/NBD closed form adds s log(beta) to terms it nearly cancels: beyond this size the
# sum loses more than ~1e-11, and the quadrature, which has no such terms, is used instead.
_CANCELLING_MAX = 1e5
_NEAR_POLE = 1e-3
_GAUSS_JACOBI_MIN_A = 10.0  # BG/NBD a from which E[f(p)] uses Gauss-Jacobi nodes
_QUADRATURE_ROWS = 4096  # customers per quadrature batch: ~50 MB per rows x nodes array


@dataclass(frozen=True)
class _QuadratureRule:
    """Tanh-sinh nodes on (0, 1): w = expit(u) with u = pi sinh(t), and log(step dw/dt)."""

    u: FloatArray
    w: FloatArray
    log_dw: FloatArray


def _tanh_sinh_rule(*, step: float, t_max: float) -> _QuadratureRule:
    t = np.arange(-t_max, t_max + step / 2, step)
    u = np.pi * np.sinh(t)
    log_dw = np.log(step * np.pi * np.cosh(t)) - np.logaddexp(0.0, -u) - np.logaddexp(0.0, u)
    return _QuadratureRule(u, special.expit(u), log_dw)


# The Pareto/NBD integrand is smooth at both ends (225 nodes, relative error ~1e-9 even where
# a step of 1/16 is off by 2e-5: mean lifetimes far shorter than T). The BG/NBD one over p can
# have integrable end singularities and sharp features for tiny a or b, so its rule reaches
# 1e-275 from the ends, with a finer step (769 nodes, ~1e-8 in the worst cases).
_TANH_SINH = _tanh_sinh_rule(step=1.0 / 32.0, t_max=3.5)
_TANH_SINH_FINE = _tanh_sinh_rule(step=1.0 / 64.0, t_max=6.0)


class BTYDFitError(ChurnError, ValueError):
    """Maximum likelihood found no interior optimum for a buy-till-you-die model."""


@dataclass(frozen=True)
class BTYDParams:
    """Base of the parameter sets: every parameter is a positive finite number."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(
                    f"{type(self).__name__}.{field.name} must be positive and finite, got {value!r}"
                )

    def as_tuple(self) -> tuple[float, ...]:
        """The parameters in declaration order, as plain floats."""
        return tuple(float(v) for v in astuple(self))


@dataclass(frozen=True)
class BGNBDParams(BTYDParams):
    """BG/NBD: purchase rates ~ Gamma(r, alpha); dropout probabilities ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float


@dataclass(frozen=True)
class ParetoNBDParams(BTYDParams):
    """Pareto/NBD: purchase rates ~ Gamma(r, alpha); dropout rates ~ Gamma(s, beta)."""

    r: float
    alpha: float
    s: float
    beta: float


@dataclass(frozen=True)
class GammaGammaParams(BTYDParams):
    """Gamma-Gamma: spend ~ Gamma(p, nu) per purchase, with nu ~ Gamma(q, gamma) per customer."""

    p: float
    q: float
    gamma: float


P = TypeVar("P", bound=BTYDParams)


@dataclass(frozen=True)
class BTYDFit(Generic[P]):
    """A maximum-likelihood fit.

    Attributes
    ----------
    params : BGNBDParams, ParetoNBDParams or GammaGammaParams
        The estimates, scale parameters in the units of the data.
    log_likelihood : float
        Total over customers at ``params``, in the units of the data, constants included.
    converged : bool
        Whether the optimiser reported success (always true: failures raise).
    iterations : int
        Iterations of the optimiser that converged.
    method : str
        That optimiser: ``"L-BFGS-B"`` (finite differences) or ``"Nelder-Mead"``; for
        BG/NBD in its one-dropout limit, ``"L-BFGS-B, analytic gradient"`` or
        ``"Nelder-Mead"`` followed by ``", one dropout probability"``; for Pareto/NBD at or
        within 1 / s = 1e-6 of its limit (s = 1e6 stands for it), the optimiser followed by
        ``", one dropout rate"``, and at its limit without dropout (s / beta = 1e-6 per
        largest T stands for it) by ``", no dropout"``.
    n_customers : int
        Customers in the likelihood.
    """

    params: P
    log_likelihood: float
    converged: bool
    iterations: int
    method: str
    n_customers: int


# --------------------------------------------------------------------------- input contract


def _as_float_array(values: ArrayLike, name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        index = int(np.flatnonzero(bad.ravel())[0])
        value = float(array.ravel()[index])
        raise ValueError(f"{name} must be finite, got {value!r} at position {index}")
    return array


def _first_violation(mask: FloatArray, values: FloatArray, name: str, expected: str) -> None:
    if mask.any():
        index = int(np.flatnonzero(mask.ravel())[0])
        raise ValueError(
            f"{name} must be {expected}, got {float(values.ravel()[index])!r} at position {index}"
        )


def _rfm_arrays(
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803 - the papers' name
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Validated float arrays broadcast to one shape."""
    xs, txs, ts = np.broadcast_arrays(
        _as_float_array(x, "x"), _as_float_array(t_x, "t_x"), _as_float_array(T, "T")
    )
    _first_violation(xs < 0, xs, "x", ">= 0")
    _first_violation(txs < 0, txs, "t_x", ">= 0")
    _first_violation(txs > ts, txs, "t_x", "<= T")
    _first_violation((xs == 0) & (txs > 0), txs, "t_x", "0 where x == 0")
    return xs, txs, ts


def _horizon_array(horizon: ArrayLike) -> FloatArray:
    array = _as_float_array(horizon, "horizon")
    _first_violation(array < 0, array, "horizon", ">= 0")
    return array


def _monetary_arrays(x: ArrayLike, monetary: ArrayLike) -> tuple[FloatArray, FloatArray]:
    xs = _as_float_array(x, "x")
    ms = np.asarray(monetary, dtype=np.float64)
    xs, ms = np.broadcast_arrays(xs, ms)
    _first_violation(xs < 0, xs, "x", ">= 0")
    buyers = xs > 0
    _first_violation(buyers & ~(np.isfinite(ms) & (ms > 0)), ms, "monetary", "> 0 where x > 0")
    return xs, np.where(buyers, ms, 0.0)


# --------------------------------------------------------------------------- BG/NBD


@dataclass(frozen=True)
class _Distinct:
    """An array as its distinct ``values`` and each element's index ``at`` into them (``None``:
    the values are the array). A fit evaluates the likelihood hundreds of times on the same
    customers: its transcendental terms are then computed once per distinct value."""

    values: FloatArray
    at: NDArray[np.intp] | None = None

    @classmethod
    def of(cls, array: FloatArray) -> _Distinct:
        values, at = np.unique(array, return_inverse=True)
        return cls(values, at.ravel())

    def map(self, f: Callable[[FloatArray], FloatArray]) -> FloatArray:
        """``f`` of every element, computed on the distinct values."""
        out = f(self.values)
        return out if self.at is None else out[self.at]

    @property
    def full(self) -> FloatArray:
        return self.map(lambda v: v)


def _bgnbd_terms(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: _Distinct,
    t_x: _Distinct,
    T: _Distinct,  # noqa: N803
) -> tuple[FloatArray, FloatArray]:
    """Log of the 'alive at T' and 'dropped out after t_x' parts of the BG/NBD likelihood,
    without the factor common to both."""
    # for x = 0 the term is -inf; any value of the log keeps the arithmetic finite
    log_odds = x.map(lambda v: np.log(a) - np.log(b + np.maximum(v, 1.0) - 1.0))
    return _alive_and_dropped(r, alpha, log_odds, x, t_x, T)


def _alive_and_dropped(
    r: float,
    alpha: float,
    log_odds: FloatArray | float,
    x: _Distinct,
    t_x: _Distinct,
    T: _Distinct,  # noqa: N803
) -> tuple[FloatArray, FloatArray]:
    """The two parts of :func:`_bgnbd_terms`, given the log odds of having dropped out right
    after the last purchase (a / (b + x - 1); p / (1 - p) at the one-dropout limit)."""
    r_x = r + x.full
    alive = -r_x * T.map(lambda v: np.log(alpha + v))
    dropped = log_odds - r_x * t_x.map(lambda v: np.log(alpha + v))
    return alive, np.where(x.map(lambda v: v > 0), dropped, -np.inf)


def _bgnbd_common(r: float, alpha: float, a: float, b: float, x: _Distinct) -> FloatArray:
    """The log of the factor of the BG/NBD likelihood common to both of its parts."""
    return x.map(
        lambda v: (
            special.gammaln(r + v)
            - special.gammaln(r)
            + r * np.log(alpha)
            + special.betaln(a, b + v)
            - special.betaln(a, b)
        )
    )


def _bgnbd_ll(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: _Distinct,
    t_x: _Distinct,
    T: _Distinct,  # noqa: N803
) -> FloatArray:
    alive, dropped = _bgnbd_terms(r, alpha, a, b, x, t_x, T)
    return _bgnbd_common(r, alpha, a, b, x) + np.logaddexp(alive, dropped)


def _bgnbd_shares(alive: FloatArray, dropped: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The log-sum of the two parts of the likelihood, and the share of 'dropped out after
    t_x' in it (0 where x = 0)."""
    total = np.logaddexp(alive, dropped)
    return total, np.exp(dropped - total)


def _bgnbd_rate_gradient(
    r: float,
    alpha: float,
    dropped_share: FloatArray,
    x: _Distinct,
    t_x: _Distinct,
    T: _Distinct,  # noqa: N803
) -> tuple[FloatArray, FloatArray]:
    """Per-customer derivatives of the BG/NBD log-likelihood in ``r`` and ``alpha``, which the
    general model and its one-dropout limit share."""
    w, r_x = dropped_share, r + x.full
    d_r = (
        x.map(lambda v: special.digamma(r + v) - special.digamma(r))
        + np.log(alpha)
        - (1 - w) * T.map(lambda v: np.log(alpha + v))
        - w * t_x.map(lambda v: np.log(alpha + v))
    )
    d_alpha = r / alpha - r_x * (
        (1 - w) * T.map(lambda v: 1 / (alpha + v)) + w * t_x.map(lambda v: 1 / (alpha + v))
    )
    return d_r, d_alpha


def _bgnbd_mean_ll(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: _Distinct,
    t_x: _Distinct,
    T: _Distinct,  # noqa: N803
) -> tuple[float, FloatArray]:
    """The mean of :func:`_bgnbd_ll` over the customers, and its gradient in (r, alpha, a, b)."""
    total, w = _bgnbd_shares(*_bgnbd_terms(r, alpha, a, b, x, t_x, T))
    d_r, d_alpha = _bgnbd_rate_gradient(r, alpha, w, x, t_x, T)
    d_a = x.map(lambda v: special.digamma(a + b) - special.digamma(a + b + v)) + w / a
    d_b = x.map(
        lambda v: (
            special.digamma(b + v)
            - special.digamma(a + b + v)
            - special.digamma(b)
            + special.digamma(a + b)
        )
    ) - w / (b + np.maximum(x.full, 1.0) - 1.0)
    value = np.mean(_bgnbd_common(r, alpha, a, b, x) + total)
    return float(value), np.array([np.mean(d) for d in (d_r, d_alpha, d_a, d_b)])


def _one_dropout_mean_ll(
    r: float,
    alpha: float,
    p: float,
    x: _Distinct,
    t_x: _Distinct,
    T: _Distinct,  # noqa: N803
) -> tuple[float, FloatArray]:
    """The BG/NBD log-likelihood in its limit a + b -> infinity at a / (a + b) = p (every
    customer drops out after a purchase with the same probability ``p``): its mean over the
    customers, and its gradient in (r, alpha, p)."""
    common = x.map(
        lambda v: special.gammaln(r + v) - special.gammaln(r) + r * np.log(alpha) + v * np.log1p(-p)
    )
    total, w = _bgnbd_shares(*_alive_and_dropped(r, alpha, np.log(p) - np.log1p(-p), x, t_x, T))
    d_r, d_alpha = _bgnbd_rate_gradient(r, alpha, w, x, t_x, T)
    d_p = w / (p * (1 - p)) - x.full / (1 - p)
    value = np.mean(common + total)
    return float(value), np.array([np.mean(d) for d in (d_r, d_alpha, d_p)])


def bgnbd_log_likelihood(
    params: BGNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
) -> FloatArray:
    """Per-customer BG/NBD log-likelihood (Fader, Hardie & Lee 2005a, eq. 6).

    Parameters
    ----------
    params : BGNBDParams
        Model parameters, ``alpha`` in the time unit of ``t_x`` and ``T``.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.

    Returns
    -------
    numpy.ndarray
        Log-likelihood of each customer's (x, t_x, T), all constants kept.

    Raises
    ------
    ValueError
        If an input is not finite, negative, or ``t_x > T``.

    Examples
    --------
    >>> p = BGNBDParams(r=0.2426, alpha=4.4136, a=0.7929, b=2.4259)
    >>> bgnbd_log_likelihood(p, [0, 2], [0.0, 30.43], [38.86, 38.86]).round(4)
    array([-0.5538, -9.4597])
    """
    return _bgnbd_ll(*params.as_tuple(), *map(_Distinct, _rfm_arrays(x, t_x, T)))


def bgnbd_probability_alive(
    params: BGNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
) -> FloatArray:
    """P(the customer is still active at T | x, t_x, T) under BG/NBD (FHL 2005a, eq. 13).

    A customer without repeat purchases cannot have dropped out in BG/NBD, so gets 1.

    Parameters
    ----------
    params : BGNBDParams
        Model parameters.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.

    Returns
    -------
    numpy.ndarray
        Probabilities in [0, 1].
    """
    alive, dropped = _bgnbd_terms(*params.as_tuple(), *map(_Distinct, _rfm_arrays(x, t_x, T)))
    return np.exp(alive - np.logaddexp(alive, dropped))


def _bgnbd_expected_closed_form(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: FloatArray,
    T: FloatArray,  # noqa: N803
    horizon: FloatArray,
) -> FloatArray:
    """E[purchases in (T, T + horizon] | alive at T] by FHL (2005a, eq. 10), with Euler's
    transformation of its 2F1 so that it stays bounded for large x."""
    c = a + b + x - 1.0
    one_minus_z = (alpha + T) / (alpha + T + horizon)
    hyp = special.hyp2f1(a + b - 1.0 - r, a - 1.0, c, 1.0 - one_minus_z)
    log_power = (a - 1.0) * np.log(one_minus_z)
    positive = hyp > 0  # 2F1 can be negative when c is near 0 (x = 0, a + b near 1)
    bracket = np.where(
        positive,
        -np.expm1(log_power + np.log(np.where(positive, hyp, 1.0))),  # precise for short horizons
        1.0 - np.exp(log_power) * hyp,
    )
    return c / (a - 1.0) * bracket


def _beta_pieces(a: float, b: FloatArray) -> tuple[tuple[FloatArray, FloatArray, FloatArray], ...]:
    """Quadrature of E[f(p)], p ~ Beta(a, b), split at the mean m into (0, m) and (m, 1).

    On (0, m), p = m v^(1/a), so p^(a-1) dp = m^a / a dv; on (m, 1), 1 - p = (1 - m) v^(1/b):
    the density's end singularities are absorbed, and nodes cluster at 0, m and 1. Returns,
    per piece, (log p, log of the rest of the density, log weight incl. Jacobian), with the
    nodes on the last axis; log p is exact even where p underflows.
    """
    log_v = -np.logaddexp(0.0, -_TANH_SINH_FINE.u)
    mean = a / (a + b)
    log_norm = _TANH_SINH_FINE.log_dw - special.betaln(a, b)
    lower_log_p = np.log(mean) + log_v / a
    lower_log_q = np.log((1.0 - mean) - mean * np.expm1(log_v / a))
    upper_log_p = np.log(mean - (1.0 - mean) * np.expm1(log_v / b))
    return (
        (lower_log_p, (b - 1.0) * lower_log_q, log_norm + a * np.log(mean) - np.log(a)),
        (upper_log_p, (a - 1.0) * upper_log_p, log_norm + b * np.log1p(-mean) - np.log(b)),
    )


def _log_bgnbd_purchases_given_p(log_p: FloatArray, m: FloatArray, log_k: FloatArray) -> FloatArray:
    """log[(1 - (1 + p k)^-m) / p], i.e. log(m k) where p k is too small to matter."""
    log_pk = log_p + log_k
    tiny = np.log1p(m) + log_pk < np.log(1e-8)  # the next term is (m + 1) p k / 2 relative
    pk = np.exp(np.where(tiny, -1.0, log_pk))
    exact = np.log(-np.expm1(-m * np.log1p(pk))) - log_p
    return np.where(tiny, np.log(m) + log_k, exact)


@functools.lru_cache(maxsize=4096)
def _beta_gauss_rule(a: float, b: float, n: int = 32) -> tuple[FloatArray, FloatArray]:
    """Gauss nodes ``p`` and weights for E[f(p)], p ~ Beta(a, b): Golub-Welsch on the Jacobi
    recurrence, with weights normalised to sum to one, so no Beta function is evaluated and
    huge ``a`` and ``b`` stay finite. Cached, read-only: expected purchases over several
    horizons and batches of customers ask for the same rules."""
    alpha, beta = b - 1.0, a - 1.0  # Jacobi weight (1 - t)^alpha (1 + t)^beta, p = (1 + t) / 2
    k = np.arange(1.0, n)
    s = 2.0 * k + alpha + beta
    diagonal = np.empty(n)
    diagonal[0] = (beta - alpha) / (alpha + beta + 2.0)
    diagonal[1:] = (beta - alpha) * (beta + alpha) / (s * (s + 2.0))
    off = 2.0 / s * np.sqrt(k * (k + alpha) * (k + beta) * (k + alpha + beta) / ((s + 1) * (s - 1)))
    t, vectors = linalg.eigh_tridiagonal(diagonal, off)
    nodes, weight = (1.0 + t) / 2.0, vectors[0] ** 2
    weight /= weight.sum()
    nodes.setflags(write=False)
    weight.setflags(write=False)
    return nodes, weight


def _bgnbd_expected_quadrature(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: FloatArray,
    T: FloatArray,  # noqa: N803
    horizon: FloatArray,
) -> FloatArray:
    """The same as E_p[(1 - (1 + p k)^-(r + x)) / p], p ~ Beta(a, b + x), k = horizon /
    (alpha + T), by tanh-sinh quadrature; by Gauss-Jacobi when ``a`` is large, where the
    Beta density is a spike that tanh-sinh nodes do not resolve."""
    m = (r + x)[..., None]
    with np.errstate(divide="ignore"):  # horizon 0: log k = -inf, the expectation is 0
        log_k = np.log(horizon / (alpha + T))[..., None]
    if a >= _GAUSS_JACOBI_MIN_A:
        out = np.empty(x.shape)
        for b_x in np.unique(b + x):
            rows = b + x == b_x
            p, weight = _beta_gauss_rule(a, b_x)
            given_p = _log_bgnbd_purchases_given_p(np.log(p), m[rows], log_k[rows])
            out[rows] = np.exp(given_p) @ weight
        return out
    log_terms = [
        special.logsumexp(
            _log_bgnbd_purchases_given_p(log_p, m, log_k) + log_density + log_weight, axis=-1
        )
        for log_p, log_density, log_weight in _beta_pieces(a, (b + x)[..., None])
    ]
    return np.exp(np.logaddexp(*log_terms))


def _distinct_rows(*columns: FloatArray) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """The first row of each distinct combination of ``columns``, and each row's combination
    number (an index into the first)."""
    frame = pd.DataFrame(dict(enumerate(columns)))
    codes = frame.groupby(list(frame.columns), sort=False, dropna=False).ngroup().to_numpy()
    first = np.unique(codes, return_index=True)[1]
    return first, codes


def _bgnbd_expected_given_alive(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: FloatArray,
    T: FloatArray,  # noqa: N803
    horizon: FloatArray,
) -> FloatArray:
    """Closed form where scipy's 2F1 is reliable (z <= 0.9, away from the 0/0 points a = 1
    and c = 0); quadrature elsewhere, and wherever the closed form is not finite; once per
    distinct (x, T, horizon). At the fit's one-dropout limit (a + b >= 1e6, dropout
    probability p = a / (a + b) for everyone) the 2F1 tends to (1 - (1 - p) z)^-(r + x), and
    the expectation is (1 - ((alpha + T) / (alpha + T + p horizon))^(r + x)) / p."""
    if _is_one_dropout(a, b):
        p = a / (a + b)
        shrink = np.log(alpha + T) - np.log(alpha + T + p * horizon)
        return -np.expm1((r + x) * shrink) / p
    x, T, horizon = np.broadcast_arrays(x, T, horizon)  # noqa: N806
    shape = x.shape
    first, codes = _distinct_rows(x.ravel(), T.ravel(), horizon.ravel())
    x, T, horizon = x.ravel()[first], T.ravel()[first], horizon.ravel()[first]  # noqa: N806
    c = a + b + x - 1.0
    z_ok = horizon * (1.0 - _HYP2F1_Z_MAX) <= _HYP2F1_Z_MAX * (alpha + T)
    easy = z_ok & (abs(a - 1.0) >= _NEAR_POLE) & (np.abs(c) >= _NEAR_POLE)
    args = (r, alpha, a, b)
    out = np.empty(x.shape)
    with np.errstate(all="ignore"):
        out[easy] = _bgnbd_expected_closed_form(*args, x[easy], T[easy], horizon[easy])
    redo = np.flatnonzero(~easy | ~np.isfinite(out))
    # The quadrature holds rows x nodes arrays: a bounded number of rows at a time.
    for start in range(0, redo.size, _QUADRATURE_ROWS):
        rows = redo[start : start + _QUADRATURE_ROWS]
        out[rows] = _bgnbd_expected_quadrature(*args, x[rows], T[rows], horizon[rows])
    return out[codes].reshape(shape)


def bgnbd_expected_purchases(
    params: BGNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    horizon: ArrayLike,
) -> FloatArray:
    """Expected number of purchases in (T, T + horizon] given x, t_x, T (FHL 2005a, eq. 10).

    Parameters
    ----------
    params : BGNBDParams
        Model parameters.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.
    horizon : array_like
        Length of the prediction window, in the same unit as ``T``; broadcasts with the others.

    Returns
    -------
    numpy.ndarray
        Non-negative expected counts.
    """
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    hs = _horizon_array(horizon)
    alive = bgnbd_probability_alive(params, xs, txs, ts)
    given_alive = _bgnbd_expected_given_alive(*params.as_tuple(), xs, ts, hs)
    return np.maximum(alive * given_alive, 0.0)


def bgnbd_probability_no_purchase(
    params: BGNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    horizon: ArrayLike,
) -> FloatArray:
    """P(no purchase in (T, T + horizon] | x, t_x, T) under BG/NBD.

    ``1 - P(alive) + P(alive) * ((alpha + T) / (alpha + T + horizon)) ** (r + x)``.

    Parameters
    ----------
    params : BGNBDParams
        Model parameters.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.
    horizon : array_like
        Length of the window, same unit as ``T``.

    Returns
    -------
    numpy.ndarray
        Probabilities in [0, 1]; 1 at ``horizon = 0``, decreasing in ``horizon``.
    """
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    hs = _horizon_array(horizon)
    alive = bgnbd_probability_alive(params, xs, txs, ts)
    log_quiet = -(params.r + xs) * np.log1p(hs / (params.alpha + ts))
    return np.clip(1.0 + alive * np.expm1(log_quiet), 0.0, 1.0)


# --------------------------------------------------------------------------- Pareto/NBD


def _log_tail_term(
    n: FloatArray, upper: FloatArray, small: float, big: float, tau: FloatArray
) -> FloatArray:
    """log[2F1(n, b'; n + 1; z) / (big + tau)^n] with n = r + s + x, z = (big - small) /
    (big + tau) and b' = n + 1 - upper, through Euler's transformation
    2F1(n, b'; n + 1; z) = (1 - z)^(1 - b') 2F1(1, upper; n + 1; z), whose series has
    coefficients <= 1 (upper < n + 1) and so cannot overflow."""
    z = (big - small) / (big + tau)
    b_prime = n + 1.0 - upper
    log_hyp = np.log(special.hyp2f1(1.0, upper, n + 1.0, z))
    return (1.0 - b_prime) * np.log((small + tau) / (big + tau)) + log_hyp - n * np.log(big + tau)


def _pareto_log_death_closed_form(
    r: float,
    alpha: float,
    s: float,
    beta: float,
    x: FloatArray,
    t_x: FloatArray,
    T: FloatArray,  # noqa: N803
) -> FloatArray:
    """log(A0 / (r + s + x)) of Fader & Hardie (2005), with the 2F1 taken on max(alpha, beta)
    so that z is in [0, 1)."""
    if alpha >= beta:
        small, big, upper = beta, alpha, r + x
    else:
        small, big, upper = alpha, beta, np.full_like(x, s + 1.0)
    n = r + s + x
    at_last = _log_tail_term(n, upper, small, big, t_x)
    at_end = _log_tail_term(n, upper, small, big, T)
    gap = np.minimum(at_end - at_last, 0.0)  # the integrand is positive: A0 >= 0
    with np.errstate(divide="ignore"):  # t_x == T gives A0 = 0, i.e. log 0 = -inf
        return at_last + np.log(-np.expm1(gap)) - np.log(n)


def _log1p_ratio(y: FloatArray) -> FloatArray:
    """log(1 + y) / y, equal to 1 at y = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y == 0.0, 1.0, np.log1p(y) / np.where(y == 0.0, 1.0, y))


def _log_dropout_survival(mu: float, phi: float, tau: FloatArray) -> FloatArray:
    """log P(still alive at tau) = -s log(1 + tau / beta), written in the mean dropout rate
    mu = s / beta and phi = 1 / s as -mu tau log(1 + phi mu tau) / (phi mu tau): accurate for
    any s, and -mu tau (one dropout rate for everyone) at phi = 0."""
    rate_time = mu * tau
    return -rate_time if phi == 0 else -rate_time * _log1p_ratio(phi * rate_time)


def _pareto_log_death_quadrature(
    r: float,
    alpha: float,
    mu: float,
    phi: float,
    x: FloatArray,
    t_x: FloatArray,
    T: FloatArray,  # noqa: N803
) -> FloatArray:
    """log of the integral over death times tau in (t_x, T] of (alpha + tau)^-(r + x) times the
    dropout density mu (1 + phi mu tau)^-(1 + 1/phi), by tanh-sinh quadrature over
    u = log(min(alpha, beta) + tau), in batches of customers.

    In u the log-integrand is concave, with one mode at most; the interval is split there so
    that nodes cluster at the peak as well as at the ends (which resolves the sharp decay after
    t_x for large x).
    """
    n = r + x
    with np.errstate(divide="ignore", invalid="ignore"):  # t_x == T, no mode, mu = 0: inf
        beta = np.divide(1.0, phi * mu) if phi > 0 else np.inf
        shift = min(alpha, beta)
        start = np.log(shift + t_x)
        end = start + np.log1p((T - t_x) / (shift + t_x))
        if alpha <= beta:  # mode where (1 - n) = (1 + phi) mu e^u / (1 + phi mu (e^u - alpha))
            peak = (1.0 - n) * (np.divide(1.0, mu) - alpha * phi) / (1.0 + phi * n)
            mode = np.where(n < 1.0, np.log(np.maximum(peak, 0.0)), -np.inf)
        else:  # the integrand falls from the start
            mode = np.full_like(start, -np.inf)
    split = np.clip(mode, start, end)
    out = np.empty(x.shape)
    for first in range(0, x.size, _QUADRATURE_ROWS):
        rows = slice(first, first + _QUADRATURE_ROWS)
        pieces = []
        for lo, hi in ((start[rows], split[rows]), (split[rows], end[rows])):
            u = lo[:, None] + (hi - lo)[:, None] * _TANH_SINH.w
            level = np.exp(u)  # shift + tau
            tau = np.maximum(level - shift, 0.0)
            log_purchase = u if alpha <= beta else np.log(alpha - shift + level)
            log_f = (1.0 + phi) * _log_dropout_survival(mu, phi, tau) - n[rows, None] * log_purchase
            with np.errstate(divide="ignore"):  # empty piece: log 0 = -inf
                log_weight = _TANH_SINH.log_dw + np.log(hi - lo)[:, None]
            pieces.append(special.logsumexp(log_f + u + log_weight, axis=-1))
        out[rows] = np.logaddexp(*pieces)
    with np.errstate(divide="ignore"):  # mu = 0: nobody drops out
        return np.log(mu) + out


def _pareto_log_death(
    r: float,
    alpha: float,
    mu: float,
    phi: float,
    x: FloatArray,
    t_x: FloatArray,
    T: FloatArray,  # noqa: N803
) -> FloatArray:
    """log of the integral over death times tau in (t_x, T] of
    (alpha + tau)^-(r + x) s beta^s (beta + tau)^-(s + 1): closed form where its 2F1 argument
    is at most 0.9 and s log(beta) is small, quadrature elsewhere (always at phi = 0) and
    wherever the closed form is not finite."""
    x, t_x, T = np.broadcast_arrays(x, t_x, T)  # noqa: N806
    out = np.empty(x.shape)
    redo = np.ones(x.shape, dtype=bool)
    with np.errstate(divide="ignore"):  # mu = 0: beta = inf
        s, beta = np.divide(1.0, phi), np.divide(1.0, phi * mu)
    if phi > 0 and np.isfinite(beta) and s * abs(np.log(beta)) <= _CANCELLING_MAX:
        big, small = max(alpha, beta), min(alpha, beta)
        easy = (big - small) <= _HYP2F1_Z_MAX * (big + t_x)
        with np.errstate(all="ignore"):
            closed = _pareto_log_death_closed_form(r, alpha, s, beta, x[easy], t_x[easy], T[easy])
            out[easy] = np.log(s) + s * np.log(beta) + closed
        redo = ~easy | np.isnan(out) | (out == np.inf)
    out[redo] = _pareto_log_death_quadrature(r, alpha, mu, phi, x[redo], t_x[redo], T[redo])
    return out


def _pareto_rates(params: ParetoNBDParams) -> tuple[float, float, float, float]:
    """(r, alpha, mu, phi): the mean dropout rate mu = s / beta and phi = 1 / s, the squared
    coefficient of variation of dropout rates (0: one rate for everyone)."""
    return params.r, params.alpha, params.s / params.beta, 1.0 / params.s


def _pareto_terms(
    r: float,
    alpha: float,
    mu: float,
    phi: float,
    x: FloatArray,
    t_x: FloatArray,
    T: FloatArray,  # noqa: N803
) -> tuple[FloatArray, FloatArray]:
    """Log of the 'alive at T' and 'died in (t_x, T]' parts of the Pareto/NBD likelihood,
    without the factor Gamma(r + x) alpha^r / Gamma(r) they share."""
    alive = -(r + x) * np.log(alpha + T) + _log_dropout_survival(mu, phi, T)
    died = _pareto_log_death(r, alpha, mu, phi, x, t_x, T)
    return alive, died


def _pareto_ll(
    r: float,
    alpha: float,
    mu: float,
    phi: float,
    x: FloatArray,
    t_x: FloatArray,
    T: FloatArray,  # noqa: N803
) -> FloatArray:
    common = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    return common + np.logaddexp(*_pareto_terms(r, alpha, mu, phi, x, t_x, T))


def pareto_nbd_log_likelihood(
    params: ParetoNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
) -> FloatArray:
    """Per-customer Pareto/NBD log-likelihood (Fader & Hardie 2005 note, eqs. 19-22).

    Parameters
    ----------
    params : ParetoNBDParams
        Model parameters, ``alpha`` and ``beta`` in the time unit of ``t_x`` and ``T``.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.

    Returns
    -------
    numpy.ndarray
        Log-likelihood of each customer's (x, t_x, T), all constants kept.

    Raises
    ------
    ValueError
        If an input is not finite, negative, or ``t_x > T``.

    Examples
    --------
    >>> p = ParetoNBDParams(r=0.5533, alpha=10.578, s=0.6062, beta=11.668)
    >>> pareto_nbd_log_likelihood(p, [0, 2], [0.0, 30.43], [38.86, 38.86]).round(4)
    array([-0.5212, -9.5543])
    """
    return _pareto_ll(*_pareto_rates(params), *_rfm_arrays(x, t_x, T))


def pareto_nbd_probability_alive(
    params: ParetoNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
) -> FloatArray:
    """P(the customer is still active at T | x, t_x, T) under Pareto/NBD.

    Parameters
    ----------
    params : ParetoNBDParams
        Model parameters.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.

    Returns
    -------
    numpy.ndarray
        Probabilities in [0, 1].
    """
    alive, died = _pareto_terms(*_pareto_rates(params), *_rfm_arrays(x, t_x, T))
    return np.exp(alive - np.logaddexp(alive, died))


def _log1p_power_ratio(exponent: float, log_growth: FloatArray) -> FloatArray:
    """(1 - exp(-exponent * log_growth)) / exponent, equal to log_growth at exponent 0."""
    if exponent == 0.0:
        return log_growth
    return -np.expm1(-exponent * log_growth) / exponent


def pareto_nbd_expected_purchases(
    params: ParetoNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    horizon: ArrayLike,
) -> FloatArray:
    """Expected number of purchases in (T, T + horizon] given x, t_x, T under Pareto/NBD.

    ``P(alive) (r + x)(beta + T) / ((alpha + T)(s - 1)) [1 - ((beta + T) / (beta + T +
    horizon)) ** (s - 1)]``, with its limit at ``s = 1``.

    Parameters
    ----------
    params : ParetoNBDParams
        Model parameters.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.
    horizon : array_like
        Length of the prediction window, same unit as ``T``.

    Returns
    -------
    numpy.ndarray
        Non-negative expected counts.
    """
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    hs = _horizon_array(horizon)
    r, alpha, s, beta = params.as_tuple()
    alive = pareto_nbd_probability_alive(params, xs, txs, ts)
    rate = (r + xs) * (beta + ts) / (alpha + ts)
    survival = _log1p_power_ratio(s - 1.0, np.log1p(hs / (beta + ts)))
    return np.maximum(alive * rate * survival, 0.0)


def pareto_nbd_probability_no_purchase(
    params: ParetoNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    horizon: ArrayLike,
) -> FloatArray:
    """P(no purchase in (T, T + horizon] | x, t_x, T) under Pareto/NBD.

    Seeing no purchase in (T, T + horizon] is seeing the history (x, t_x, T + horizon), so the
    probability is ``L(x, t_x, T + horizon) / L(x, t_x, T)``. This equals the n = 0 case of
    Fader & Hardie's conditional PMF (2014 note; pymc-marketing's
    ``ParetoNBDModel.expected_purchase_probability(n_purchases=0)``), and shares the likelihood's
    numerically stable evaluation.

    Parameters
    ----------
    params : ParetoNBDParams
        Model parameters.
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation.
    horizon : array_like
        Length of the window, same unit as ``T``.

    Returns
    -------
    numpy.ndarray
        Probabilities in [0, 1]; 1 at ``horizon = 0``, decreasing in ``horizon``.
    """
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    hs = _horizon_array(horizon)
    xs, txs, ts, hs = np.broadcast_arrays(xs, txs, ts, hs)
    rates = _pareto_rates(params)
    now = np.logaddexp(*_pareto_terms(*rates, xs, txs, ts))
    later = np.logaddexp(*_pareto_terms(*rates, xs, txs, ts + hs))
    return np.exp(np.minimum(later - now, 0.0))


# --------------------------------------------------------------------------- Gamma-Gamma


def _gamma_gamma_ll(p: float, q: float, gamma: float, x: FloatArray, m: FloatArray) -> FloatArray:
    px = p * x
    return (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * np.log(gamma)
        + (px - 1.0) * np.log(m * x)
        + np.log(x)
        - (px + q) * np.log(gamma + m * x)
    )


def _gamma_gamma_mean_ll(
    p: float, q: float, gamma: float, x: FloatArray, m: FloatArray
) -> tuple[float, FloatArray]:
    """The mean of :func:`_gamma_gamma_ll` and its gradient in (p, q, gamma)."""
    px, spent = p * x, gamma + m * x
    log_spent = np.log(spent)
    value = np.mean(_gamma_gamma_ll(p, q, gamma, x, m))
    shared = special.digamma(px + q) - log_spent
    d_p = np.mean(x * (shared - special.digamma(px) + np.log(m * x)))
    d_q = np.mean(shared) - special.digamma(q) + np.log(gamma)
    d_gamma = q / gamma - np.mean((px + q) / spent)
    return float(value), np.array([d_p, d_q, d_gamma])


def gamma_gamma_log_likelihood(
    params: GammaGammaParams, x: ArrayLike, monetary: ArrayLike
) -> FloatArray:
    """Per-customer log density of the mean spend of x repeat purchases (Gamma-Gamma).

    Parameters
    ----------
    params : GammaGammaParams
        Model parameters, ``gamma`` in the currency of ``monetary``.
    x : array_like
        Repeat purchases, all > 0.
    monetary : array_like
        Mean spend per repeat purchase, all > 0.

    Returns
    -------
    numpy.ndarray
        Log-likelihood of each customer's mean spend, all constants kept.

    Raises
    ------
    ValueError
        If some ``x`` is 0 (no spend observed) or a spend is not positive.
    """
    xs, ms = _monetary_arrays(x, monetary)
    _first_violation(xs == 0, xs, "x", "> 0 for the Gamma-Gamma likelihood")
    return _gamma_gamma_ll(*params.as_tuple(), xs, ms)


def gamma_gamma_expected_spend(
    params: GammaGammaParams, x: ArrayLike, monetary: ArrayLike
) -> FloatArray:
    """Expected spend per purchase given x repeat purchases with mean spend ``monetary``.

    ``(gamma + x m) p / (p x + q - 1)``: a weighted mean of the population mean
    ``p gamma / (q - 1)`` and the customer's own mean; customers with ``x = 0`` get the
    population mean and their ``monetary`` is ignored.

    Parameters
    ----------
    params : GammaGammaParams
        Model parameters.
    x : array_like
        Repeat purchases.
    monetary : array_like
        Mean spend per repeat purchase (ignored where ``x = 0``).

    Returns
    -------
    numpy.ndarray
        Expected spend per purchase.

    Raises
    ------
    ValueError
        If ``p x + q <= 1`` for some customer: the expected spend is then infinite.

    Examples
    --------
    >>> p = GammaGammaParams(p=6.25, q=3.74, gamma=15.44)
    >>> gamma_gamma_expected_spend(p, [0, 2], [0.0, 20.0]).round(2)
    array([35.22, 22.74])
    """
    xs, ms = _monetary_arrays(x, monetary)
    p, q, gamma = params.as_tuple()
    denominator = p * xs + q - 1.0
    if np.any(denominator <= 0):
        x_min = float(xs[denominator <= 0].min())
        raise ValueError(
            f"expected spend is infinite where p * x + q <= 1 (p={p:.4g}, q={q:.4g}, x={x_min:g})"
        )
    return (gamma + xs * ms) * p / denominator


def discounted_purchases(
    cumulative: Callable[[float], FloatArray], *, horizon: float, periods: int, rate: float
) -> FloatArray:
    """Expected purchases in ``(T, T + horizon]``, each of ``periods`` equal slices discounted.

    ``cumulative(h)`` gives the expected purchases in ``(T, T + h]``; the purchases of slice
    ``k`` are worth ``(1 + rate) ** (-k / periods)``, ``rate`` being the discount rate over the
    whole horizon (an annual rate for a one-year horizon).

    Examples
    --------
    >>> steady = lambda h: np.array([2.0 * h])  # two purchases per unit of time
    >>> discounted_purchases(steady, horizon=1.0, periods=2, rate=0.0)
    array([2.])
    >>> discounted_purchases(steady, horizon=1.0, periods=1, rate=0.25)
    array([1.6])
    """
    total: FloatArray | float = 0.0
    before: FloatArray | float = 0.0
    for k in range(1, periods + 1):
        upto = cumulative(horizon * k / periods)
        total = total + (upto - before) * (1.0 + rate) ** (-k / periods)
        before = upto
    return np.asarray(total, dtype="float64")


def bgnbd_discounted_purchases(
    params: BGNBDParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    horizon: float,
    periods: int,
    rate: float,
) -> FloatArray:
    """:func:`discounted_purchases` of :func:`bgnbd_expected_purchases`, computed faster:
    P(alive) does not depend on the horizon and is computed once, the expectation given
    alive once per period and distinct (x, T)."""
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    first, codes = _distinct_rows(xs, ts)
    given_alive = discounted_purchases(
        lambda h: _bgnbd_expected_given_alive(*params.as_tuple(), xs[first], ts[first], h),
        horizon=horizon,
        periods=periods,
        rate=rate,
    )
    return np.maximum(bgnbd_probability_alive(params, xs, txs, ts) * given_alive[codes], 0.0)


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class _Optimum:
    """Where an optimiser stopped, in its coordinates (logs of the parameters, mostly)."""

    theta: FloatArray
    iterations: int
    method: str


_WALL = 1e10  # what the optimisers see where the likelihood is not finite


def _penalised(objective: Callable[[FloatArray], float]) -> Callable[[FloatArray], float]:
    """Minimise -mean LL; non-finite values (far outside the data's range) become a wall."""

    def wrapped(theta: FloatArray) -> float:
        with np.errstate(all="ignore"):
            value = -objective(theta)
        return value if np.isfinite(value) else _WALL

    return wrapped


def _penalised_with_gradient(
    objective: Callable[[FloatArray], tuple[float, FloatArray]],
) -> Callable[[FloatArray], tuple[float, FloatArray]]:
    """:func:`_penalised` of a value and its gradient: where either is not finite, the wall
    (with a zero gradient)."""

    def wrapped(theta: FloatArray) -> tuple[float, FloatArray]:
        with np.errstate(all="ignore"):
            value, gradient = objective(theta)
        if np.isfinite(value) and np.all(np.isfinite(gradient)):
            return -value, -gradient
        return _WALL, np.zeros_like(theta)

    return wrapped


_WITH_GRADIENT = "L-BFGS-B, analytic gradient"
# The largest gradient component at which L-BFGS-B stopping abnormally (status 2, mostly a
# failed line search) means the optimum is reached: the likelihood of large a and b is
# precise to ~1e-13 only, so near its maximum no step can lower it any further.
_FLAT = 1e-6


def _minimise(
    objective: Callable[[FloatArray], float] | Callable[[FloatArray], tuple[float, FloatArray]],
    start: FloatArray,
    method: str,
    bounds: Sequence[tuple[float, float]],
) -> optimize.OptimizeResult:
    """Minimise ``objective`` (a value, or a value and its gradient for ``_WITH_GRADIENT``)."""
    if method == "Nelder-Mead":
        options = {"maxiter": 5000, "xatol": 1e-8, "fatol": 1e-12}
    else:
        options = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-8}
    jac = method == _WITH_GRADIENT
    return optimize.minimize(
        objective,
        start,
        method="L-BFGS-B" if jac else method,
        jac=jac,
        bounds=bounds,
        options=options,
    )


def _boundary_names(
    theta: FloatArray,
    names: Sequence[str],
    bounds: Sequence[tuple[float, float]],
    limits: Sequence[str] = (),
) -> list[str]:
    """The parameters at an edge of their box. The lower bound of a parameter in ``limits`` is
    no edge: it stands for a limit the model contains (Pareto/NBD's 1 / s = 0, one dropout
    rate for everyone, and s / beta = 0, nobody drops out)."""
    lower, upper = np.array(bounds).T
    at_limit = np.isin(names, list(limits))
    at_edge = (np.abs(theta - lower) < _AT_EDGE) & ~at_limit | (np.abs(theta - upper) < _AT_EDGE)
    return [name for name, edge in zip(names, at_edge, strict=True) if edge]


def _maximise(
    mean_ll: Callable[[FloatArray], float] | Callable[[FloatArray], tuple[float, FloatArray]],
    starts: Sequence[Sequence[float]],
    *,
    names: Sequence[str],
    model: str,
    to_theta: Callable[[FloatArray], FloatArray] = np.log,
    jac: bool = False,
    bounds: Sequence[tuple[float, float]] | None = None,
    limits: Sequence[str] = (),
) -> _Optimum:
    """Try L-BFGS-B, then Nelder-Mead from where it stopped, from each start in turn;
    ``to_theta`` maps a start to the optimiser's coordinates (default: logs, each within
    ``_LOG_BOUND`` unless ``bounds`` are given). With ``jac``, ``mean_ll`` gives its gradient
    as well, which L-BFGS-B then follows. An optimum may lie on the lower bound of the
    parameters named in ``limits`` (see :func:`_boundary_names`)."""
    bounds = bounds or [(-_LOG_BOUND, _LOG_BOUND)] * len(names)
    value = _penalised((lambda theta: mean_ll(theta)[0]) if jac else mean_ll)
    with_gradient = _penalised_with_gradient(mean_ll) if jac else None
    failures: list[str] = []
    for start in starts:
        x0 = to_theta(np.asarray(start, dtype=np.float64))
        for method in (_WITH_GRADIENT if jac else "L-BFGS-B", "Nelder-Mead"):
            objective = with_gradient if method == _WITH_GRADIENT else value
            result = _minimise(objective, x0, method, bounds)
            edge = _boundary_names(result.x, names, bounds, limits)
            at_floor = (
                method == _WITH_GRADIENT
                and result.status == 2
                and np.max(np.abs(result.jac)) <= _FLAT
            )
            if (result.success or at_floor) and result.fun < _WALL and not edge:
                return _Optimum(np.asarray(result.x), int(result.nit), method)
            reason = f"parameters {edge} ran to the bound" if edge else str(result.message)
            failures.append(f"{method} from {tuple(start)}: {reason}")
            if np.all(np.isfinite(result.x)):
                x0 = np.asarray(result.x)
    raise BTYDFitError(f"{model} fit did not converge: " + "; ".join(failures))


def _scale(values: FloatArray, given: float | None, name: str) -> float:
    if given is not None:
        if not (np.isfinite(given) and given > 0):
            raise ValueError(f"{name} must be positive and finite, got {given!r}")
        return float(given)
    largest = float(values.max(initial=0.0))
    return largest if largest > 0 else 1.0


def _rate_scale(x: FloatArray, T: FloatArray) -> float:  # noqa: N803
    """A starting alpha: with r = 1, the mean purchase rate r / alpha matches sum x / sum T."""
    return float(np.clip(np.sum(T) / max(np.sum(x), 1.0), 1e-3, 1e3))


def _require_customers(x: FloatArray, *, minimum_buyers: int, model: str) -> None:
    if x.size == 0 or int((x > 0).sum()) < minimum_buyers:
        raise BTYDFitError(
            f"{model} fit needs customers with repeat purchases: got {x.size} customers, "
            f"{int((x > 0).sum())} with x > 0 (need at least {minimum_buyers})"
        )


def _fit(params: P, log_likelihood: FloatArray, optimum: _Optimum, n: int) -> BTYDFit[P]:
    total = float(np.sum(log_likelihood))
    if not np.isfinite(total):
        raise BTYDFitError(f"log-likelihood at {params} is not finite")
    return BTYDFit(params, total, True, optimum.iterations, optimum.method, n)


# a + b values at which a spread of dropout probabilities is tried against none
_SPREADS = (1.0, 10.0, 1e2, 1e3, 1e4)
_ONE_DROPOUT = 1e6  # a + b that stands for the limit: probabilities within 1e-6 of it


def _is_one_dropout(a: float, b: float) -> bool:
    """Whether BG/NBD's (a, b) is the one-dropout limit a + b = 1e6, give or take the last
    bits the fit's log-space parameters lose on their way back."""
    return a + b >= _ONE_DROPOUT * (1 - 1e-9)


# the 5 % critical value of the likelihood-ratio test for a parameter at its boundary
# (chi-square mixture: 2.71 / 2 log-likelihood units)
_NO_EVIDENCE = 1.35


def _bgnbd_one_dropout(
    scaled: tuple[_Distinct, _Distinct, _Distinct], alpha0: float
) -> _Optimum | None:
    """The BG/NBD fit in its one-dropout-probability limit, when the data show no spread in
    customers' dropout probabilities; ``None`` when they do, or when a fit fails.

    Without such a spread the likelihood barely changes as a + b grows at a fixed
    a / (a + b): optimisers in (a, b) then wander along a flat ridge. The limit has three
    parameters (r, alpha, a / (a + b)) and a proper maximum. It is taken when the same three
    parameters fitted at each a + b in ``_SPREADS`` never beat it by ``_NO_EVIDENCE``
    (a likelihood-ratio test on a profile of a + b); it is returned as a + b = 1e6.
    """
    n = scaled[0].full.size

    def fitted(kappa: float | None) -> tuple[_Optimum, float]:
        def ll(theta: FloatArray) -> tuple[float, FloatArray]:
            r, alpha = np.exp(theta[:2])
            p = special.expit(theta[2])
            if kappa is None:
                value, (d_r, d_alpha, d_p) = _one_dropout_mean_ll(r, alpha, p, *scaled)
            else:
                value, (d_r, d_alpha, d_a, d_b) = _bgnbd_mean_ll(
                    r, alpha, p * kappa, (1 - p) * kappa, *scaled
                )
                d_p = kappa * (d_a - d_b)
            return value, np.array([r * d_r, alpha * d_alpha, p * (1 - p) * d_p])

        optimum = _maximise(
            ll,
            [(1.0, alpha0, 0.1), (1.0, 1.0, 0.5)],
            names=("r", "alpha", "a/(a+b)"),
            model="BG/NBD at a fixed a + b",
            to_theta=lambda start: np.array([*np.log(start[:2]), special.logit(start[2])]),
            jac=True,
        )
        return optimum, ll(optimum.theta)[0] * n

    try:
        limit, limit_ll = fitted(None)
        if max(fitted(kappa)[1] for kappa in _SPREADS) - limit_ll > _NO_EVIDENCE:
            return None
    except BTYDFitError:
        return None
    log_r, log_alpha, logit_p = limit.theta
    p = special.expit(logit_p)
    log_ab = [np.log(p * _ONE_DROPOUT), np.log((1 - p) * _ONE_DROPOUT)]
    return _Optimum(
        np.array([log_r, log_alpha, *log_ab]),
        limit.iterations,
        f"{limit.method}, one dropout probability",
    )


def fit_bgnbd(
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    time_scale: float | None = None,
) -> BTYDFit[BGNBDParams]:
    """Maximum-likelihood BG/NBD fit.

    Parameters
    ----------
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation per customer.
    time_scale : float, optional
        Times are divided by it while optimising; default the largest ``T``.

    Returns
    -------
    BTYDFit[BGNBDParams]
        Parameters in the units of ``t_x`` and ``T``, with the total log-likelihood.

    Raises
    ------
    BTYDFitError
        If no optimiser reaches an interior optimum.
    """
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    _require_customers(xs, minimum_buyers=1, model="BG/NBD")
    scale = _scale(ts, time_scale, "time_scale")
    scaled = _Distinct.of(xs), _Distinct.of(txs / scale), _Distinct.of(ts / scale)

    def mean_ll(log_params: FloatArray) -> float:
        return float(np.mean(_bgnbd_ll(*np.exp(log_params), *scaled)))

    alpha0 = _rate_scale(xs, ts / scale)
    optimum = _bgnbd_one_dropout(scaled, alpha0)
    if optimum is None:
        # Finite differences here: where nobody seems to drop out, the maximum lies at a = 0,
        # and L-BFGS-B along the exact gradient runs a into its bound.
        starts = [(1.0, alpha0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0), (0.5, 0.1, 0.5, 2.0)]
        optimum = _maximise(mean_ll, starts, names=("r", "alpha", "a", "b"), model="BG/NBD")
    r, alpha, a, b = np.exp(optimum.theta)
    params = BGNBDParams(r=float(r), alpha=float(alpha * scale), a=float(a), b=float(b))
    return _fit(params, bgnbd_log_likelihood(params, xs, txs, ts), optimum, xs.size)


def fit_pareto_nbd(
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,  # noqa: N803
    *,
    time_scale: float | None = None,
) -> BTYDFit[ParetoNBDParams]:
    """Maximum-likelihood Pareto/NBD fit.

    Parameters
    ----------
    x, t_x, T : array_like
        Repeat purchases, time of the last purchase and length of observation per customer.
    time_scale : float, optional
        Times are divided by it while optimising; default the largest ``T``.

    Returns
    -------
    BTYDFit[ParetoNBDParams]
        Parameters in the units of ``t_x`` and ``T``, with the total log-likelihood.

    Raises
    ------
    BTYDFitError
        If no optimiser reaches an interior optimum or one of the model's limits.
    """
    xs, txs, ts = _rfm_arrays(x, t_x, T)
    _require_customers(xs, minimum_buyers=1, model="Pareto/NBD")
    scale = _scale(ts, time_scale, "time_scale")
    sx, st = txs / scale, ts / scale

    # In (r, alpha, mu = s / beta, phi = 1 / s) the limit of one dropout rate for everyone,
    # where s and beta run off to infinity together, is the edge phi = 0 of the box.
    def mean_ll(theta: FloatArray) -> float:
        r, alpha, mu = np.exp(theta[:3])
        return float(np.mean(_pareto_ll(r, alpha, mu, theta[3], xs, sx, st)))

    alpha0 = _rate_scale(xs, st)
    optimum = _maximise(
        mean_ll,
        [(1.0, alpha0, 1.0 / alpha0, 1.0), (1.0, 1.0, 1.0, 1.0), (0.5, 0.1, 5.0, 2.0)],
        names=("r", "alpha", "s / beta", "1 / s"),
        model="Pareto/NBD",
        to_theta=lambda start: np.array([*np.log(start[:3]), start[3]]),
        bounds=[(-_LOG_BOUND, _LOG_BOUND)] * 3 + [(0.0, np.exp(_LOG_BOUND))],
        limits=("s / beta", "1 / s"),
    )
    r, alpha = np.exp(optimum.theta[:2])
    s = 1.0 / max(optimum.theta[3], 1.0 / _ONE_DROPOUT)
    if s == _ONE_DROPOUT:
        optimum = replace(optimum, method=f"{optimum.method}, one dropout rate")
    # Where the data show no dropout the likelihood rises as the mean dropout rate falls to
    # 0, the NBD: the box's edge, 1e-6 per scaled time unit, stands for it.
    mu = np.exp(optimum.theta[2])
    if optimum.theta[2] < -_LOG_BOUND + _AT_EDGE:
        mu = np.exp(-_LOG_BOUND)
        optimum = replace(optimum, method=f"{optimum.method}, no dropout")
    params = ParetoNBDParams(
        r=float(r), alpha=float(alpha * scale), s=float(s), beta=float(s / mu * scale)
    )
    return _fit(params, _pareto_ll(*_pareto_rates(params), xs, txs, ts), optimum, xs.size)


def fit_gamma_gamma(
    x: ArrayLike,
    monetary: ArrayLike,
    *,
    spend_scale: float | None = None,
) -> BTYDFit[GammaGammaParams]:
    """Maximum-likelihood Gamma-Gamma fit on the customers with repeat purchases.

    Customers with ``x = 0`` carry no spend information and are left out; ``n_customers`` of
    the result counts the customers used.

    Parameters
    ----------
    x : array_like
        Repeat purchases per customer.
    monetary : array_like
        Mean spend per repeat purchase (> 0 where ``x > 0``; ignored where ``x = 0``).
    spend_scale : float, optional
        Spends are divided by it while optimising; default the largest mean spend.

    Returns
    -------
    BTYDFit[GammaGammaParams]
        Parameters with ``gamma`` in the currency of ``monetary``, and the log-likelihood.

    Raises
    ------
    ValueError
        If a customer with ``x > 0`` has a non-positive or missing spend.
    BTYDFitError
        If fewer than two customers have repeat purchases or no optimiser converges.
    """
    xs, ms = _monetary_arrays(x, monetary)
    _require_customers(xs, minimum_buyers=2, model="Gamma-Gamma")
    buyers = xs > 0
    xs, ms = xs[buyers], ms[buyers]
    scale = _scale(ms, spend_scale, "spend_scale")
    scaled = ms / scale

    def mean_ll(log_params: FloatArray) -> tuple[float, FloatArray]:
        params = np.exp(log_params)
        value, gradient = _gamma_gamma_mean_ll(*params, xs, scaled)
        return value, params * gradient

    starts = [(1.0, 1.0, 1.0), (2.0, 3.0, 0.5), (10.0, 10.0, 5.0)]
    optimum = _maximise(mean_ll, starts, names=("p", "q", "gamma"), model="Gamma-Gamma", jac=True)
    p, q, gamma = np.exp(optimum.theta)
    params = GammaGammaParams(p=float(p), q=float(q), gamma=float(gamma * scale))
    return _fit(params, _gamma_gamma_ll(*params.as_tuple(), xs, ms), optimum, xs.size)


# --------------------------------------------------------------------------- RFM summary


def _calendar_day(value: object, name: str) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    if stamp is pd.NaT or stamp != stamp.normalize():
        raise ValueError(f"{name} must be a calendar day (midnight), got {value!r}")
    return stamp


def _daily_spend(
    transactions: pd.DataFrame, *, customer_col: str, date_col: str, value_col: str
) -> pd.DataFrame:
    """One row per customer and purchase day: columns customer, day, spend (the day's total)."""
    missing = [c for c in (customer_col, date_col, value_col) if c not in transactions.columns]
    if missing:
        raise ValueError(
            f"transactions lack column(s) {missing}; they have {list(transactions.columns)}"
        )
    dates = transactions[date_col]
    if not pd.api.types.is_datetime64_any_dtype(dates):
        raise ValueError(
            f"column {date_col!r} must hold datetimes, got dtype {dates.dtype}; "
            "parse it first, e.g. pd.to_datetime(values, format='%Y%m%d')"
        )
    for column in (customer_col, date_col, value_col):
        n_missing = int(transactions[column].isna().sum())
        if n_missing:
            raise ValueError(f"column {column!r} has {n_missing} missing values")
    if dates.dt.tz is not None:  # calendar days in the data's own time zone
        dates = dates.dt.tz_localize(None)
    frame = pd.DataFrame(
        {
            "customer": transactions[customer_col].to_numpy(),
            "day": dates.dt.normalize().to_numpy(),
            "spend": transactions[value_col].astype("float64").to_numpy(),
        }
    )
    return frame.groupby(["customer", "day"], as_index=False, sort=True)["spend"].sum()


def _calibration_summary(days: pd.DataFrame, end: pd.Timestamp, unit: float) -> pd.DataFrame:
    grouped = days.groupby("customer", sort=True)
    first, last = grouped["day"].min(), grouped["day"].max()
    x = grouped.size() - 1
    repeat_spend = grouped["spend"].sum() - grouped["spend"].first()  # days are sorted
    return pd.DataFrame(
        {
            "x": x.astype("int64"),
            "t_x": (last - first).dt.days / unit,
            "T": (end - first).dt.days / unit,
            "monetary": (repeat_spend / x.where(x > 0)).fillna(0.0),
        }
    )


def _holdout_summary(
    days: pd.DataFrame, customers: pd.Index, *, start: pd.Timestamp, end: pd.Timestamp, unit: float
) -> pd.DataFrame:
    window = days[(days["day"] > start) & (days["day"] <= end)]
    grouped = window.groupby("customer")
    count = grouped.size().reindex(customers, fill_value=0)
    spend = grouped["spend"].sum().reindex(customers, fill_value=0.0)
    return pd.DataFrame(
        {
            "x_holdout": count.astype("int64"),
            "monetary_holdout": (spend / count.where(count > 0)).fillna(0.0),
            "duration_holdout": (end - start).days / unit,
        },
        index=customers,
    )


def rfm_summary(
    transactions: pd.DataFrame,
    *,
    customer_col: str,
    date_col: str,
    value_col: str,
    calibration_end: object,
    observation_end: object | None = None,
    time_unit_days: float = 7.0,
) -> pd.DataFrame:
    """Per-customer (x, t_x, T, monetary) summary for buy-till-you-die models.

    The papers' convention on purchase days: several purchases on one day count as one, with
    the day's total spend. Customers whose first purchase is after ``calibration_end`` are left
    out; so is anything after ``observation_end`` (or after ``calibration_end`` when that is
    not given). The input is not modified.

    Parameters
    ----------
    transactions : pandas.DataFrame
        One row per purchase.
    customer_col, date_col, value_col : str
        Columns with the customer id, the purchase datetime (time of day and time zone are
        dropped: days are the data's calendar days) and the amount spent.
    calibration_end : date-like
        Last day of the calibration period, inclusive (CDNOW: ``"1997-09-30"`` for
        "purchases before 1997-10-01"). ``T`` is measured up to this day.
    observation_end : date-like, optional
        Last day of a hold-out period starting the day after ``calibration_end``, inclusive;
        adds ``x_holdout`` (purchase days in it), ``monetary_holdout`` (mean spend per such day,
        0 without any) and ``duration_holdout``.
    time_unit_days : float, default 7.0
        Length of the time unit in days (7: weeks).

    Returns
    -------
    pandas.DataFrame
        Indexed by customer (named ``customer_col``, sorted), with ``x`` (purchase days - 1),
        ``t_x`` (last - first purchase day), ``T`` (``calibration_end`` - first purchase day),
        both in units, and ``monetary``: the mean spend per repeat purchase day, the first day
        excluded (0 where ``x = 0``). Read ``T`` as ``summary["T"]``: ``summary.T`` is the
        transpose.

    Raises
    ------
    ValueError
        If a column is missing or has missing values, dates are not datetimes, an end is not
        a calendar day, ``observation_end <= calibration_end`` or ``time_unit_days <= 0``.
    """
    if not (np.isfinite(time_unit_days) and time_unit_days > 0):
        raise ValueError(f"time_unit_days must be positive and finite, got {time_unit_days!r}")
    cal_end = _calendar_day(calibration_end, "calibration_end")
    days = _daily_spend(
        transactions, customer_col=customer_col, date_col=date_col, value_col=value_col
    )
    summary = _calibration_summary(days[days["day"] <= cal_end], cal_end, time_unit_days)
    if observation_end is not None:
        obs_end = _calendar_day(observation_end, "observation_end")
        if obs_end <= cal_end:
            raise ValueError(
                f"observation_end ({obs_end.date()}) must be after calibration_end "
                f"({cal_end.date()})"
            )
        holdout = _holdout_summary(
            days, summary.index, start=cal_end, end=obs_end, unit=time_unit_days
        )
        summary = summary.join(holdout)
    summary.index.name = customer_col
    return summary
