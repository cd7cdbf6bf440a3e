"""Buy-till-you-die models: the papers' CDNOW estimates, recovery from simulated customers,
predictions against slow references and Monte Carlo, and the RFM summary on hand-made tables."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special

from churn import ChurnError, btyd
from churn.btyd import (
    BGNBDParams,
    BTYDFitError,
    GammaGammaParams,
    ParetoNBDParams,
    _maximise,
    bgnbd_expected_purchases,
    bgnbd_log_likelihood,
    bgnbd_probability_alive,
    bgnbd_probability_no_purchase,
    fit_bgnbd,
    fit_gamma_gamma,
    fit_pareto_nbd,
    gamma_gamma_expected_spend,
    gamma_gamma_log_likelihood,
    pareto_nbd_expected_purchases,
    pareto_nbd_log_likelihood,
    pareto_nbd_probability_alive,
    pareto_nbd_probability_no_purchase,
    rfm_summary,
)

CDNOW = Path(__file__).parent / "data" / "CDNOW_sample.txt"
# Fader, Hardie & Lee (2005) and the Gamma-Gamma note, on the CDNOW 1/10 sample, weekly units.
PAPER_BGNBD = {"r": 0.2426, "alpha": 4.4136, "a": 0.7929, "b": 2.4259}
PAPER_PARETO = {"r": 0.5533, "alpha": 10.578, "s": 0.6062, "beta": 11.668}
PAPER_GAMMA_GAMMA = {"p": 6.2496, "q": 3.7442, "gamma": 15.444}
BGNBD = BGNBDParams(**PAPER_BGNBD)
PARETO = ParetoNBDParams(**PAPER_PARETO)
# (x, t_x, T) of the customers Pareto/NBD likelihoods are checked on
PARETO_CUSTOMERS = [(0, 0.0, 39.0), (1, 0.0, 39.0), (3, 12.0, 39.0), (40, 2.0, 60.0), (7, 5.0, 5.0)]

# Customers at the edges: no repeat purchase, first purchase on the last day, very long
# observation, many purchases, last purchase long ago or just now.
EDGE_X = np.array([0, 0, 0, 1, 1, 5, 40, 500, 3000], dtype=float)
EDGE_T = np.array([0.0, 39.0, 1e7, 1e-6, 1e6, 39.0, 39.0, 200.0, 1e5])
EDGE_TX = np.array([0.0, 0.0, 0.0, 1e-6, 1.0, 39.0, 0.5, 199.0, 5e4])
EDGE_H = np.array([0.0, 1e-12, 1.0, 39.0, 1e4, 1e7])[:, None]

PREDICTORS = {
    "bgnbd": (bgnbd_expected_purchases, bgnbd_probability_alive, bgnbd_probability_no_purchase),
    "pareto_nbd": (
        pareto_nbd_expected_purchases,
        pareto_nbd_probability_alive,
        pareto_nbd_probability_no_purchase,
    ),
}
EDGE_PARAMS = [
    pytest.param("bgnbd", BGNBD, id="bgnbd-cdnow"),
    pytest.param("bgnbd", BGNBDParams(r=1.0, alpha=1.0, a=1.0, b=1.0), id="bgnbd-a=1"),
    pytest.param("bgnbd", BGNBDParams(r=50.0, alpha=0.01, a=0.02, b=0.98), id="bgnbd-a+b=1"),
    pytest.param("bgnbd", BGNBDParams(r=0.01, alpha=1e3, a=40.0, b=0.05), id="bgnbd-extreme"),
    pytest.param("pareto_nbd", PARETO, id="pareto-cdnow"),
    pytest.param("pareto_nbd", ParetoNBDParams(1.0, 5.0, 1.0, 5.0), id="pareto-alpha=beta-s=1"),
    pytest.param("pareto_nbd", ParetoNBDParams(2.0, 100.0, 1.0, 0.01), id="pareto-alpha>>beta"),
    pytest.param("pareto_nbd", ParetoNBDParams(0.01, 0.001, 30.0, 1e3), id="pareto-alpha<<beta"),
]


# --------------------------------------------------------------------------- helpers


def _read_cdnow() -> pd.DataFrame:
    frame = pd.read_csv(CDNOW, sep=r"\s+", dtype={"date": str})
    frame["date"] = pd.to_datetime(frame["date"], format="%Y%m%d")
    return frame


@pytest.fixture(scope="module")
def cdnow() -> pd.DataFrame:
    """The paper's summary: purchases before 1997-10-01, T measured to 1997-09-30, weeks."""
    return rfm_summary(
        _read_cdnow(),
        customer_col="sample_id",
        date_col="date",
        value_col="dollar_value",
        calibration_end="1997-09-30",
    )


def _simulate_bgnbd(
    rng: np.random.Generator,
    params: BGNBDParams,
    T: np.ndarray,  # noqa: N803
    horizon: float,
) -> dict[str, np.ndarray]:
    """Customers from BG/NBD, first purchase at 0, observed to T, then ``horizon`` more."""
    rate = rng.gamma(params.r, 1.0 / params.alpha, T.size)
    budget = rng.geometric(rng.beta(params.a, params.b, T.size))  # drops after this purchase
    n_cal = rng.poisson(rate * T)
    x = np.minimum(n_cal, budget)
    # the x-th of n_cal uniform purchase times on (0, T) is T * Beta(x, n_cal - x + 1)
    t_x = np.where(x > 0, T * rng.beta(np.maximum(x, 1), n_cal - x + 1), 0.0)
    alive = n_cal < budget
    future = np.where(alive, np.minimum(rng.poisson(rate * horizon), budget - x), 0)
    return {"x": x.astype(float), "t_x": t_x, "T": T, "future": future, "alive": alive}


def _simulate_pareto(
    rng: np.random.Generator,
    params: ParetoNBDParams,
    T: np.ndarray,  # noqa: N803
    horizon: float,
) -> dict[str, np.ndarray]:
    """Customers from Pareto/NBD, first purchase at 0, observed to T, then ``horizon`` more."""
    rate = rng.gamma(params.r, 1.0 / params.alpha, T.size)
    lifetime = rng.exponential(1.0 / rng.gamma(params.s, 1.0 / params.beta, T.size))
    active = np.minimum(lifetime, T)
    x = rng.poisson(rate * active)
    t_x = np.where(x > 0, active * rng.beta(np.maximum(x, 1), 1.0), 0.0)
    future = rng.poisson(rate * np.clip(lifetime - T, 0.0, horizon))
    return {"x": x.astype(float), "t_x": t_x, "T": T, "future": future, "alive": lifetime > T}


def _simulate_spend(
    rng: np.random.Generator, params: GammaGammaParams, x: np.ndarray
) -> np.ndarray:
    """Mean of x spends ~ Gamma(p, nu), nu ~ Gamma(q, gamma) per customer."""
    nu = rng.gamma(params.q, 1.0 / params.gamma, x.size)
    return rng.gamma(params.p * x, 1.0 / nu) / x


def _relative_errors(fitted: object, truth: object) -> np.ndarray:
    return np.array(fitted.as_tuple()) / np.array(truth.as_tuple()) - 1.0


def _pareto_ll_reference(params: ParetoNBDParams, x: float, t_x: float, T: float) -> float:  # noqa: N803
    """Pareto/NBD log-likelihood with the death-time integral done by scipy's adaptive quad.

    The density of dying at tau, (alpha + tau)^-(r + x) s beta^s (beta + tau)^-(s + 1), is
    taken relative to its value at t_x, its largest, so that it underflows nowhere."""
    r, alpha, s, beta = params.as_tuple()

    def log_density(tau: float) -> float:
        log_dropout = math.log(s / beta) - (s + 1) * math.log1p(tau / beta)
        return -(r + x) * math.log(alpha + tau) + log_dropout

    peak = log_density(t_x)
    lifetime = beta / s  # breaks at multiples of the mean lifetime resolve a sharp decay
    breaks = [t_x + k * lifetime for k in (1, 10, 100, 1000) if t_x + k * lifetime < T]
    died, _ = integrate.quad(
        lambda tau: math.exp(log_density(tau) - peak),
        t_x,
        T,
        points=breaks or None,
        epsabs=0,
        epsrel=1e-12,
        limit=500,
    )
    alive = -(r + x) * math.log(alpha + T) - s * math.log1p(T / beta)
    common = special.gammaln(r + x) - special.gammaln(r) + r * math.log(alpha)
    return float(common + np.logaddexp(alive, peak + math.log(died) if died > 0 else -math.inf))


def _bgnbd_expected_reference(params: BGNBDParams, x: float, T: float, horizon: float) -> float:  # noqa: N803
    """P(alive) * E_p[(1 - (1 + p H / (alpha + T))^-(r + x)) / p], p ~ Beta(a, b + x), by quad."""
    r, alpha, a, b = params.as_tuple()
    k = horizon / (alpha + T)

    log_norm = special.betaln(a, b + x)

    def integrand(p: float) -> float:
        given_p = -math.expm1(-(r + x) * math.log1p(p * k)) / p
        return given_p * math.exp((a - 1) * math.log(p) + (b + x - 1) * math.log1p(-p) - log_norm)

    mean = a / (a + b + x)  # a break point: the density may be a narrow spike there
    value, _ = integrate.quad(integrand, 0.0, 1.0, points=[mean], epsabs=0, epsrel=1e-11, limit=500)
    return value


# --------------------------------------------------------------------------- RFM summary


TINY = pd.DataFrame(
    {
        "customer": ["A", "A", "A", "A", "B", "B", "C", "D", "A", "B"],
        "ts": pd.to_datetime(
            [
                "2021-01-01 09:00",
                "2021-01-01 17:30",  # same day as the first: one purchase day, spends summed
                "2021-01-15 10:00",
                "2021-01-29 23:59",
                "2021-01-08 12:00",
                "2021-01-31 00:00",  # the calibration's last day is included
                "2021-01-31 08:00",  # first purchase on the last day: x = 0, T = 0
                "2021-02-01 00:00",  # first purchase after calibration: left out
                "2021-02-10 12:00",  # hold-out
                "2021-03-15 12:00",  # after the observation end: ignored
            ]
        ),
        "amount": [10.0, 5.0, 20.0, 40.0, 7.0, 9.0, 3.0, 100.0, 11.0, 1000.0],
    }
)


def test_rfm_summary_follows_the_paper_convention_on_a_hand_table() -> None:
    before = TINY.copy()
    summary = rfm_summary(
        TINY, customer_col="customer", date_col="ts", value_col="amount",
        calibration_end="2021-01-31", time_unit_days=1.0,
    )  # fmt: skip
    expected = pd.DataFrame(
        {
            "x": [2, 1, 0],
            "t_x": [28.0, 23.0, 0.0],
            "T": [30.0, 23.0, 0.0],
            "monetary": [30.0, 9.0, 0.0],  # A: (20 + 40) / 2, the first day (10 + 5) excluded
        },
        index=pd.Index(["A", "B", "C"], name="customer"),
    )
    pd.testing.assert_frame_equal(summary, expected)
    pd.testing.assert_frame_equal(TINY, before)


def test_rfm_summary_adds_hold_out_columns() -> None:
    summary = rfm_summary(
        TINY, customer_col="customer", date_col="ts", value_col="amount",
        calibration_end="2021-01-31", observation_end="2021-02-28", time_unit_days=7.0,
    )  # fmt: skip
    assert summary["x_holdout"].tolist() == [1, 0, 0]
    assert summary["monetary_holdout"].tolist() == [11.0, 0.0, 0.0]
    assert summary["duration_holdout"].tolist() == [4.0, 4.0, 4.0]
    assert summary.loc["A", "t_x"] == pytest.approx(4.0)


def test_rfm_summary_uses_the_calendar_days_of_aware_timestamps() -> None:
    aware = TINY.assign(ts=TINY["ts"].dt.tz_localize("America/New_York"))
    kwargs = {"customer_col": "customer", "date_col": "ts", "value_col": "amount"}
    pd.testing.assert_frame_equal(
        rfm_summary(aware, calibration_end="2021-01-31", **kwargs),
        rfm_summary(TINY, calibration_end="2021-01-31", **kwargs),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value_col": "price"}, r"lack column\(s\) \['price'\]"),
        ({"calibration_end": "2021-01-31 12:00"}, "calibration_end must be a calendar day"),
        ({"observation_end": "2021-01-15"}, "observation_end .* must be after"),
        ({"time_unit_days": 0.0}, "time_unit_days must be positive"),
    ],
    ids=["missing-column", "end-with-time", "observation-before-calibration", "zero-unit"],
)
def test_rfm_summary_rejects_bad_arguments(change: dict, message: str) -> None:
    kwargs = {
        "customer_col": "customer",
        "date_col": "ts",
        "value_col": "amount",
        "calibration_end": "2021-01-31",
    }
    with pytest.raises(ValueError, match=message):
        rfm_summary(TINY, **(kwargs | change))


def test_rfm_summary_asks_for_parsed_dates() -> None:
    raw = pd.read_csv(CDNOW, sep=r"\s+", nrows=5)
    with pytest.raises(ValueError, match="column 'date' must hold datetimes, got dtype int64"):
        rfm_summary(
            raw, customer_col="sample_id", date_col="date", value_col="dollar_value",
            calibration_end="1997-09-30",
        )  # fmt: skip


def test_cdnow_summary_matches_the_papers(cdnow: pd.DataFrame) -> None:
    assert len(cdnow) == 2357
    assert int((cdnow["x"] > 0).sum()) == 946  # the Gamma-Gamma note's repeat buyers
    first = cdnow.loc[1]  # bought 1997-01-01, -01-18, -08-02 (and 1997-12-12, after)
    assert first["x"] == 2
    assert first["t_x"] == pytest.approx(213 / 7)
    assert first["T"] == pytest.approx(272 / 7)
    assert first["monetary"] == pytest.approx((29.73 + 14.96) / 2)


# --------------------------------------------------------------------------- the papers' fits


def _assert_matches_paper(params: object, paper: dict[str, float]) -> None:
    fitted = dataclasses.asdict(params)
    assert fitted == pytest.approx(paper, rel=5e-3)


def test_bgnbd_fit_reproduces_the_paper(cdnow: pd.DataFrame) -> None:
    fit = fit_bgnbd(cdnow["x"], cdnow["t_x"], cdnow["T"])
    _assert_matches_paper(fit.params, PAPER_BGNBD)
    assert fit.log_likelihood == pytest.approx(-9582.43, abs=0.01)
    assert fit.converged
    assert fit.n_customers == 2357


def test_pareto_nbd_fit_reproduces_the_paper(cdnow: pd.DataFrame) -> None:
    fit = fit_pareto_nbd(cdnow["x"], cdnow["t_x"], cdnow["T"])
    _assert_matches_paper(fit.params, PAPER_PARETO)
    assert fit.log_likelihood == pytest.approx(-9594.98, abs=0.01)


def test_gamma_gamma_fit_reproduces_the_paper(cdnow: pd.DataFrame) -> None:
    fit = fit_gamma_gamma(cdnow["x"], cdnow["monetary"])
    _assert_matches_paper(fit.params, PAPER_GAMMA_GAMMA)
    assert fit.n_customers == 946


def test_log_likelihood_is_in_the_data_units(cdnow: pd.DataFrame) -> None:
    """Days instead of weeks: alpha scales by 7, and the density of the purchase times by
    7 ** -x per customer, so the total drops by sum(x) * log(7)."""
    weeks = fit_bgnbd(cdnow["x"], cdnow["t_x"], cdnow["T"])
    days = fit_bgnbd(cdnow["x"], cdnow["t_x"] * 7, cdnow["T"] * 7, time_scale=1.0)
    assert days.params.alpha == pytest.approx(7 * weeks.params.alpha, rel=1e-4)
    assert days.params.r == pytest.approx(weeks.params.r, rel=1e-4)
    shift = cdnow["x"].sum() * math.log(7)
    assert days.log_likelihood == pytest.approx(weeks.log_likelihood - shift, abs=1e-3)


def test_fit_result_is_frozen(cdnow: pd.DataFrame) -> None:
    fit = fit_gamma_gamma(cdnow["x"], cdnow["monetary"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.log_likelihood = 0.0  # type: ignore[misc]
    assert fit.method in {"L-BFGS-B, analytic gradient", "Nelder-Mead"}
    assert fit.iterations > 0


# --------------------------------------------------------------------------- recovery


def test_bgnbd_recovers_simulated_parameters() -> None:
    truth = BGNBDParams(r=0.8, alpha=4.0, a=1.5, b=5.0)
    rng = np.random.default_rng(20240501)
    data = _simulate_bgnbd(rng, truth, rng.uniform(52, 156, 20_000), horizon=0.0)
    fit = fit_bgnbd(data["x"], data["t_x"], data["T"])
    assert np.abs(_relative_errors(fit.params, truth)).max() < 0.15


def test_bgnbd_one_dropout_probability_is_the_limit_of_a_growing_beta() -> None:
    x, t_x, age = (
        np.array([0.0, 1.0, 7.0]),
        np.array([0.0, 3.0, 40.0]),
        np.array([10.0, 30.0, 52.0]),
    )
    near = bgnbd_log_likelihood(BGNBDParams(r=0.9, alpha=5.0, a=0.03e8, b=0.97e8), x, t_x, age)
    for i, expected in enumerate(near):
        customer = [btyd._Distinct(v[i : i + 1]) for v in (x, t_x, age)]
        limit, _ = btyd._one_dropout_mean_ll(0.9, 5.0, 0.03, *customer)
        assert limit == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("mean_ll", "params"),
    [
        (btyd._bgnbd_mean_ll, (0.2426, 4.4136, 0.7929, 2.4259)),
        (btyd._bgnbd_mean_ll, (2.0, 1.5, 3.0, 0.7)),
        (btyd._one_dropout_mean_ll, (0.5, 0.3, 0.1)),
        (btyd._one_dropout_mean_ll, (2.0, 1.5, 0.6)),
    ],
    ids=["cdnow", "b<1", "limit-small-p", "limit-large-p"],
)
def test_bgnbd_likelihood_gradients_match_finite_differences(mean_ll, params) -> None:
    rng = np.random.default_rng(7)
    x = rng.poisson(2, 500).astype(float)
    T = rng.uniform(0.2, 40.0, 500)  # noqa: N806
    t_x = np.where(x > 0, T * rng.uniform(0, 1, 500), 0.0)
    summary = [btyd._Distinct.of(v) for v in (x, t_x, T)]
    _, gradient = mean_ll(*params, *summary)
    step = 1e-6 * np.array(params)
    for k, h in enumerate(step):
        up, down = np.array(params), np.array(params)
        up[k], down[k] = up[k] + h, down[k] - h
        central = (mean_ll(*up, *summary)[0] - mean_ll(*down, *summary)[0]) / (2 * h)
        assert gradient[k] == pytest.approx(central, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("params", [(6.2496, 3.7442, 15.444), (0.8, 40.0, 0.3)])
def test_gamma_gamma_likelihood_gradient_matches_finite_differences(params) -> None:
    rng = np.random.default_rng(8)
    x = rng.integers(1, 30, 500).astype(float)
    m = rng.gamma(2.0, 20.0, 500)
    _, gradient = btyd._gamma_gamma_mean_ll(*params, x, m)
    for k, h in enumerate(1e-6 * np.array(params)):
        up, down = np.array(params), np.array(params)
        up[k], down[k] = up[k] + h, down[k] - h
        central = (
            btyd._gamma_gamma_mean_ll(*up, x, m)[0] - btyd._gamma_gamma_mean_ll(*down, x, m)[0]
        ) / (2 * h)
        assert gradient[k] == pytest.approx(central, rel=1e-5, abs=1e-8)


def test_bgnbd_expected_purchases_at_the_limit_continue_the_general_case() -> None:
    x, age, horizon = np.array([0.0, 1.0, 12.0, 100.0]), np.array([10.0, 50.0, 100.0, 150.0]), 52.0
    by_formula = btyd._bgnbd_expected_given_alive(1.8, 10.0, 2e4, 9.8e5, x, age, horizon)
    general = btyd._bgnbd_expected_given_alive(1.8, 10.0, 1.98e4, 9.702e5, x, age, horizon)
    np.testing.assert_allclose(by_formula, general, rtol=1e-4)
    no_dropout = (1.8 + x) * horizon / (10.0 + age)  # p -> 0: the NBD's expectation
    tiny = btyd._bgnbd_expected_given_alive(1.8, 10.0, 1e-3, 1e6, x, age, horizon)
    np.testing.assert_allclose(tiny, no_dropout, rtol=1e-5)


def test_bgnbd_limit_returned_by_a_fit_is_predicted_by_the_limit_formula() -> None:
    # The fit returns the limit through log space: a + b lands a few ulps below 1e6 here.
    p, x, age, horizon = 0.0196, np.array([0.0, 1.0, 12.0]), np.array([2.0, 50.0, 100.0]), 52.0
    a, b = np.exp(np.log(p * 1e6)), np.exp(np.log((1 - p) * 1e6))
    assert a + b < 1e6
    got = btyd._bgnbd_expected_given_alive(1.8, 10.0, a, b, x, age, horizon)
    limit = (1 - ((10.0 + age) / (10.0 + age + p * horizon)) ** (1.8 + x)) / p
    np.testing.assert_allclose(got, limit, rtol=1e-12)


@pytest.mark.parametrize(
    "params", [BGNBD, BGNBDParams(r=1.8, alpha=10.0, a=2e4, b=9.8e5)], ids=["cdnow", "limit"]
)
def test_bgnbd_discounted_purchases_equal_the_discounted_expectations(params) -> None:
    # repeated (x, T) pairs with different t_x share their expectation given alive; the
    # same x with another T does not
    x = np.array([0.0, 2.0, 2.0, 2.0, 2.0, 7.0, 40.0])
    t_x = np.array([0.0, 5.0, 30.0, 30.0, 30.0, 38.0, 39.0])
    T = np.array([39.0, 39.0, 39.0, 39.0, 52.0, 39.0, 52.0])  # noqa: N806
    slow = btyd.discounted_purchases(
        lambda h: bgnbd_expected_purchases(params, x, t_x, T, horizon=h),
        horizon=52.0,
        periods=12,
        rate=0.1,
    )
    got = btyd.bgnbd_discounted_purchases(params, x, t_x, T, horizon=52.0, periods=12, rate=0.1)
    np.testing.assert_allclose(got, slow, rtol=1e-12)
    assert got[1] < got[2] == got[3]  # the same x and T, an earlier last purchase: less alive


def test_bgnbd_fit_takes_the_limit_when_every_customer_has_one_dropout_probability() -> None:
    # Beta(2e4, 1e6): the dropout probability is 0.0196 for everyone, give or take 0.0001;
    # the likelihood rises ever more slowly with a + b, along a ridge optimisers wander on
    truth = BGNBDParams(r=1.8, alpha=10.0, a=2e4, b=1e6)
    rng = np.random.default_rng(20240504)
    data = _simulate_bgnbd(rng, truth, rng.uniform(52, 156, 20_000), horizon=0.0)
    fit = fit_bgnbd(data["x"], data["t_x"], data["T"])
    p = fit.params
    assert fit.method == "L-BFGS-B, analytic gradient, one dropout probability"
    assert p.a + p.b == pytest.approx(1e6)
    assert p.a / (p.a + p.b) == pytest.approx(2e4 / 1.02e6, rel=0.1)
    assert p.r == pytest.approx(1.8, rel=0.1)
    assert p.alpha == pytest.approx(10.0, rel=0.1)
    assert fit.log_likelihood == pytest.approx(
        np.sum(bgnbd_log_likelihood(p, data["x"], data["t_x"], data["T"]))
    )


def test_pareto_nbd_recovers_simulated_parameters() -> None:
    truth = ParetoNBDParams(r=0.8, alpha=5.0, s=0.8, beta=10.0)
    rng = np.random.default_rng(20240502)
    data = _simulate_pareto(rng, truth, rng.uniform(52, 156, 20_000), horizon=0.0)
    fit = fit_pareto_nbd(data["x"], data["t_x"], data["T"])
    assert np.abs(_relative_errors(fit.params, truth)).max() < 0.15


def test_pareto_nbd_fit_reaches_the_limit_of_one_dropout_rate() -> None:
    # Everyone drops out at 0.02 a week: the likelihood rises as s and beta run off to infinity
    # together. In about half of such samples its maximum is that limit, 1 / s = 0; in this
    # seed's it is, and the likelihood falls as s comes down from it.
    truth = ParetoNBDParams(r=1.8, alpha=10.0, s=1e6, beta=1e6 / 0.02)
    rng = np.random.default_rng(20240506)
    data = _simulate_pareto(rng, truth, rng.uniform(52, 156, 5_000), horizon=0.0)
    fit = fit_pareto_nbd(data["x"], data["t_x"], data["T"])
    p = fit.params
    assert fit.method == "L-BFGS-B, one dropout rate"
    assert p.s == 1e6
    assert p.s / p.beta == pytest.approx(0.02, rel=0.05)
    assert p.r == pytest.approx(1.8, rel=0.1)
    assert p.alpha == pytest.approx(10.0, rel=0.1)

    def total(params: ParetoNBDParams) -> float:
        return float(np.sum(pareto_nbd_log_likelihood(params, data["x"], data["t_x"], data["T"])))

    assert fit.log_likelihood > total(truth)
    for s in (1e4, 1e2):
        assert fit.log_likelihood > total(dataclasses.replace(p, s=s, beta=p.beta * s / p.s))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pareto_nbd_fit_of_one_dropout_rate_beats_the_truth(seed: int) -> None:
    # Whether this sample's maximum is at 1 / s = 0 or near it, the fit finds it
    truth = ParetoNBDParams(r=1.8, alpha=10.0, s=1e6, beta=1e6 / 0.02)
    rng = np.random.default_rng(seed)
    data = _simulate_pareto(rng, truth, rng.uniform(52, 156, 2_000), horizon=0.0)
    fit = fit_pareto_nbd(data["x"], data["t_x"], data["T"])
    p = fit.params
    assert p.s / p.beta == pytest.approx(0.02, rel=0.1)
    assert p.s > 10  # dropout rates' coefficient of variation under a third
    truth_ll = pareto_nbd_log_likelihood(truth, data["x"], data["t_x"], data["T"]).sum()
    assert fit.log_likelihood > truth_ll


def test_pareto_nbd_fit_reaches_the_limit_without_dropout() -> None:
    # Nobody drops out: the likelihood rises as the mean dropout rate s / beta falls to 0,
    # the NBD. The fit stops at the edge of its box, which stands for that limit, and every
    # customer's P(no purchase) is the NBD's, ((alpha + T) / (alpha + T + h)) ** (r + x).
    truth = ParetoNBDParams(r=0.7, alpha=9.0, s=1.0, beta=1e300)
    rng = np.random.default_rng(4)
    data = _simulate_pareto(rng, truth, rng.integers(280, 560, 600) / 7, horizon=0.0)
    x, t_x, T = data["x"], np.ceil(data["t_x"] * 7) / 7, data["T"]  # noqa: N806  whole days
    fit = fit_pareto_nbd(x, t_x, T)
    p = fit.params
    assert fit.method == "L-BFGS-B, no dropout"
    assert p.s / p.beta == pytest.approx(1e-6 / T.max())
    assert p.r == pytest.approx(0.7, rel=0.15)
    assert p.alpha == pytest.approx(9.0, rel=0.15)
    nbd = ((p.alpha + T) / (p.alpha + T + 13.0)) ** (p.r + x)
    got = pareto_nbd_probability_no_purchase(p, x, t_x, T, horizon=13.0)
    np.testing.assert_allclose(got, nbd, atol=1e-4)


def test_gamma_gamma_recovers_simulated_parameters() -> None:
    truth = GammaGammaParams(p=3.0, q=5.0, gamma=10.0)
    rng = np.random.default_rng(20240503)
    x = rng.integers(1, 6, 30_000).astype(float)
    fit = fit_gamma_gamma(x, _simulate_spend(rng, truth, x))
    assert np.abs(_relative_errors(fit.params, truth)).max() < 0.15


# --------------------------------------------------------------------------- predictions


def test_bgnbd_probability_no_purchase_by_hand() -> None:
    # Customer 1 of CDNOW, next 39 weeks: odds of having dropped out
    # a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x) = 0.231443 * 1.625577 = 0.376225,
    # P(alive) = 1 / 1.376225 = 0.726625; ((alpha + T) / (alpha + T + 39)) ** 2.2426 = 0.236684;
    # P0 = 1 - 0.726625 + 0.726625 * 0.236684 = 0.445368.
    p0 = bgnbd_probability_no_purchase(BGNBD, 2, 213 / 7, 272 / 7, horizon=39.0)
    assert p0 == pytest.approx(0.445368, abs=1e-6)
    assert bgnbd_probability_alive(BGNBD, 2, 213 / 7, 272 / 7) == pytest.approx(0.726625, abs=1e-6)


def test_bgnbd_no_repeat_purchase_means_alive() -> None:
    assert np.all(bgnbd_probability_alive(BGNBD, [0, 0], [0, 0], [0.0, 1e6]) == 1.0)


@pytest.mark.parametrize(("model", "params"), EDGE_PARAMS)
def test_predictions_are_finite_and_in_range_at_the_edges(model: str, params: object) -> None:
    expected, alive, no_purchase = PREDICTORS[model]
    counts = expected(params, EDGE_X, EDGE_TX, EDGE_T, horizon=EDGE_H)
    p_alive = alive(params, EDGE_X, EDGE_TX, EDGE_T)
    p_zero = no_purchase(params, EDGE_X, EDGE_TX, EDGE_T, horizon=EDGE_H)
    assert np.isfinite(counts).all()
    assert (counts >= 0).all()
    assert ((p_alive >= 0) & (p_alive <= 1)).all()
    assert ((p_zero >= 0) & (p_zero <= 1)).all()
    assert (counts[0] == 0).all()  # horizon 0
    assert (p_zero[0] == 1).all()
    np.testing.assert_allclose(p_zero[1], 1.0, atol=1e-6)  # horizon -> 0
    assert (np.diff(p_zero, axis=0) <= 1e-9).all()  # decreasing in the horizon
    assert (np.diff(counts, axis=0) >= -1e-9 * counts[1:]).all()  # increasing in the horizon


@pytest.mark.parametrize(
    ("params", "x", "T", "horizon"),
    [
        (BGNBD, 2, 38.9, 39.0),  # the closed form
        (BGNBD, 0, 30.0, 5e3),  # long horizon: quadrature
        (BGNBD, 25, 38.9, 52.0),
        (BGNBDParams(r=0.5, alpha=3.0, a=1.0, b=2.0), 3, 20.0, 10.0),  # a = 1: quadrature
        (BGNBDParams(r=2.0, alpha=1.0, a=3.0, b=0.5), 1, 0.5, 400.0),
        # a steady dropout rate (huge a and b): scipy's 2F1 fails, so quadrature
        (BGNBDParams(r=1.8, alpha=10.1, a=22852.8, b=970096.9), 12, 150.0, 52.0),
        (BGNBDParams(r=1.0, alpha=2.0, a=12.0, b=0.7), 0, 1.0, 400.0),  # Gauss-Jacobi, b < 1
    ],
    ids=[
        "cdnow",
        "long-horizon",
        "many-purchases",
        "a=1",
        "a>1-long",
        "steady-dropout",
        "large-a-small-b",
    ],
)
def test_bgnbd_expected_purchases_against_quad(
    params: BGNBDParams,
    x: float,
    T: float,  # noqa: N803
    horizon: float,
) -> None:
    t_x = T / 2 if x else 0.0
    alive = bgnbd_probability_alive(params, x, t_x, T)
    reference = alive * _bgnbd_expected_reference(params, x, T, horizon)
    got = bgnbd_expected_purchases(params, x, t_x, T, horizon=horizon)
    assert got == pytest.approx(reference, rel=1e-7)


@pytest.mark.parametrize(
    "params",
    [
        PARETO,
        ParetoNBDParams(1.0, 5.0, 1.0, 5.0),
        ParetoNBDParams(2.0, 100.0, 1.0, 0.01),  # 2F1 argument near 1: quadrature
        ParetoNBDParams(1.0, 0.01, 0.5, 50.0),
        ParetoNBDParams(1.0, 1.0, 1e3, 100.0),  # lifetimes of 0.1: the density drops sharply
        ParetoNBDParams(0.5, 1e6, 1e6, 1e7),  # s log(beta) = 1.6e7 would cancel in closed form
    ],
    ids=["cdnow", "alpha=beta-s=1", "alpha>>beta", "alpha<<beta", "short-lives", "huge-s"],
)
def test_pareto_nbd_against_quad(params: ParetoNBDParams) -> None:
    customers = [*PARETO_CUSTOMERS, (2, 1.0, 1e4)]  # observed far longer than most live
    x, t_x, T = (np.array(c, dtype=float) for c in zip(*customers, strict=True))  # noqa: N806
    reference = np.array([_pareto_ll_reference(params, *c) for c in customers])
    got = pareto_nbd_log_likelihood(params, x, t_x, T)
    np.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-9)
    later = np.array([_pareto_ll_reference(params, xi, ti, Ti + 20) for xi, ti, Ti in customers])
    np.testing.assert_allclose(
        pareto_nbd_probability_no_purchase(params, x, t_x, T, horizon=20.0),
        np.exp(later - reference),
        rtol=1e-8,
    )


@pytest.mark.parametrize(("s", "rtol"), [(1e6, 1e-5), (1e12, 1e-10), (math.inf, 1e-10)])
def test_pareto_nbd_likelihood_tends_to_one_dropout_rate(s: float, rtol: float) -> None:
    # s -> infinity at s / beta = mu: every lifetime is Exponential(mu), within O(1 / s); the
    # fit's coordinates reach the limit itself (phi = 1 / s = 0)
    r, alpha, mu = 0.8, 5.0, 0.05

    def reference(x: float, t_x: float, T: float) -> float:  # noqa: N803
        def integrand(tau: float) -> float:
            return (alpha + tau) ** -(r + x) * mu * math.exp(-mu * tau)

        died, _ = integrate.quad(integrand, t_x, T, epsabs=0, epsrel=1e-13, limit=500)
        alive = (alpha + T) ** -(r + x) * math.exp(-mu * T)
        common = special.gammaln(r + x) - special.gammaln(r) + r * math.log(alpha)
        return float(common + math.log(alive + died))

    customers = PARETO_CUSTOMERS
    x, t_x, T = (np.array(c, dtype=float) for c in zip(*customers, strict=True))  # noqa: N806
    if s == math.inf:
        got = btyd._pareto_ll(r, alpha, mu, 0.0, x, t_x, T)
    else:
        got = pareto_nbd_log_likelihood(ParetoNBDParams(r, alpha, s, s / mu), x, t_x, T)
    np.testing.assert_allclose(got, [reference(*c) for c in customers], rtol=rtol)


def test_pareto_nbd_without_dropout_is_the_nbd() -> None:
    # s / beta = 1e-330 underflows to a zero dropout rate: nobody dies, and the likelihood is
    # the NBD's, Gamma(r + x) alpha^r / (Gamma(r) (alpha + T)^(r + x))
    params = ParetoNBDParams(r=0.8, alpha=5.0, s=1e-30, beta=1e300)
    x, T = np.array([0.0, 2.0]), 10.0  # noqa: N806
    nbd = (
        special.gammaln(0.8 + x)
        - special.gammaln(0.8)
        + 0.8 * np.log(5.0)
        - (0.8 + x) * np.log(15.0)
    )
    got = pareto_nbd_log_likelihood(params, x, [0.0, 3.0], [T, T])
    np.testing.assert_allclose(got, nbd, rtol=1e-12)


def test_pareto_nbd_no_purchase_matches_the_conditional_pmf() -> None:
    """The n = 0 case of Fader & Hardie's conditional PMF (2014), written as pymc-marketing's
    ``expected_purchase_probability`` does: 1 - P(alive) + (B1 + B2 - B3) / L."""
    r, alpha, s, beta = PARETO.as_tuple()
    x, t_x, T, t = np.array([0.0, 2, 10, 1]), np.array([0.0, 30.4, 35, 1]), 38.9, 39.0  # noqa: N806
    log_l = pareto_nbd_log_likelihood(PARETO, x, t_x, T)
    big, small = max(alpha, beta), min(alpha, beta)
    upper = r + x if alpha < beta else s + 1
    common = r * np.log(alpha) + s * np.log(beta) - special.gammaln(r)

    def log_b(end: float) -> np.ndarray:
        hyp = special.hyp2f1(r + s + x, upper, r + s + x + 1, (big - small) / (big + end))
        return (
            common + special.gammaln(r + s + x) + special.betaln(r + x, s + 1) + np.log(hyp)
            - special.gammaln(s) - (r + s + x) * np.log(big + end)
        )  # fmt: skip

    log_alive = special.gammaln(r + x) + common - (r + x) * np.log(alpha + T) - s * np.log(beta + T)
    log_b1 = special.gammaln(r + x) + common - (r + x) * np.log(alpha + T + t)
    log_b1 = log_b1 - s * np.log(beta + T + t)
    pmf_zero = (
        1 - np.exp(log_alive - log_l)
        + np.exp(log_b1 - log_l) + np.exp(log_b(T) - log_l) - np.exp(log_b(T + t) - log_l)
    )  # fmt: skip
    got = pareto_nbd_probability_no_purchase(PARETO, x, t_x, T, horizon=t)
    np.testing.assert_allclose(got, pmf_zero, rtol=1e-10)


@pytest.mark.parametrize(
    ("simulate", "params", "predictors"),
    [
        (_simulate_bgnbd, BGNBDParams(r=0.5, alpha=3.0, a=0.8, b=2.5), PREDICTORS["bgnbd"]),
        (_simulate_pareto, ParetoNBDParams(0.6, 5.0, 0.8, 12.0), PREDICTORS["pareto_nbd"]),
    ],
    ids=["bgnbd", "pareto_nbd"],
)
def test_predictions_match_monte_carlo(simulate, params, predictors) -> None:
    """E[prediction | history] averages to the simulated outcome, within each frequency band."""
    rng = np.random.default_rng(7)
    data = simulate(rng, params, rng.uniform(26, 78, 40_000), horizon=39.0)
    history = (params, data["x"], data["t_x"], data["T"])
    expected, alive, no_purchase = predictors
    checks = [
        (expected(*history, horizon=39.0), data["future"]),
        (alive(*history), data["alive"]),
        (no_purchase(*history, horizon=39.0), data["future"] == 0),
    ]
    for band in (data["x"] == 0, (data["x"] >= 1) & (data["x"] <= 3), data["x"] > 3):
        for predicted, observed in checks:
            gap = observed[band] - predicted[band]
            assert abs(gap.mean()) < 4 * gap.std() / math.sqrt(band.sum()) + 1e-9


def test_gamma_gamma_expected_spend_by_hand() -> None:
    params = GammaGammaParams(p=6.0, q=4.0, gamma=15.0)
    # (gamma + x m) p / (p x + q - 1): population mean 6 * 15 / 3 = 30; x = 2, m = 20: 330 / 15
    got = gamma_gamma_expected_spend(params, [0, 2], [np.nan, 20.0])
    np.testing.assert_allclose(got, [30.0, 22.0])


def test_gamma_gamma_refuses_an_infinite_mean() -> None:
    with pytest.raises(ValueError, match="expected spend is infinite"):
        gamma_gamma_expected_spend(GammaGammaParams(p=0.5, q=0.8, gamma=1.0), [0], [0.0])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("x", "t_x", "T", "message"),
    [
        ([1.0], [5.0], [4.0], r"t_x must be <= T, got 5\.0 at position 0"),
        ([1.0, -1.0], [1.0, 0.0], [4.0, 4.0], "x must be >= 0"),
        ([1.0], [np.nan], [4.0], "t_x must be finite"),
        ([0.0], [2.0], [4.0], "t_x must be 0 where x == 0"),
    ],
    ids=["t_x>T", "negative-x", "nan", "t_x-without-purchases"],
)
def test_inputs_are_validated(x: list, t_x: list, T: list, message: str) -> None:  # noqa: N803
    with pytest.raises(ValueError, match=message):
        bgnbd_log_likelihood(BGNBD, x, t_x, T)
    with pytest.raises(ValueError, match=message):
        fit_pareto_nbd(x, t_x, T)


def test_bad_parameters_and_horizons_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"BGNBDParams.a must be positive and finite, got -1"):
        BGNBDParams(r=1.0, alpha=1.0, a=-1.0, b=1.0)
    with pytest.raises(ValueError, match="horizon must be >= 0"):
        pareto_nbd_expected_purchases(PARETO, 1, 1.0, 2.0, horizon=-1.0)
    with pytest.raises(ValueError, match="x must be > 0 for the Gamma-Gamma likelihood"):
        gamma_gamma_log_likelihood(GammaGammaParams(1.0, 2.0, 3.0), [0, 1], [0.0, 5.0])
    with pytest.raises(ValueError, match=r"monetary must be > 0 where x > 0"):
        fit_gamma_gamma([1, 2], [5.0, 0.0])


def test_fit_without_repeat_purchases_raises() -> None:
    with pytest.raises(BTYDFitError, match="0 with x > 0"):
        fit_bgnbd([0, 0], [0.0, 0.0], [10.0, 20.0])


def test_fit_error_is_a_churn_and_value_error() -> None:
    assert issubclass(BTYDFitError, ChurnError)
    assert issubclass(BTYDFitError, ValueError)


def test_optimiser_takes_a_failed_line_search_where_the_gradient_vanishes() -> None:
    # Near its maximum the BG/NBD likelihood of large a and b is noise at its precision: no
    # step lowers it, and the line search fails.
    def noise_floor(gradient: float):
        return lambda v: (-1.0 + 1e-9 * np.sin(1e9 * v).sum(), np.full(2, gradient))

    start = [(1.0, 3.0)]
    at_floor = _maximise(noise_floor(1e-7), start, names=("u", "v"), model="toy", jac=True)
    assert at_floor.method == "L-BFGS-B, analytic gradient"
    np.testing.assert_allclose(at_floor.theta, [0.0, np.log(3.0)], atol=1e-5)
    steep = _maximise(noise_floor(1e-4), start, names=("u", "v"), model="toy", jac=True)
    assert steep.method == "Nelder-Mead"

    def bowl(v: np.ndarray) -> tuple[float, np.ndarray]:
        return -float(np.sum((v - 0.5) ** 2)), 2 * (v - 0.5)  # the gradient's sign is wrong

    misled = _maximise(bowl, start, names=("u", "v"), model="toy", jac=True)
    assert misled.method == "Nelder-Mead"
    np.testing.assert_allclose(misled.theta, [0.5, 0.5], atol=1e-6)


def test_optimiser_stops_at_the_lower_edge_of_a_limit_only() -> None:
    # The maximum lies beyond the lower bound of u: an edge, unless u's bound is a limit the
    # model contains (Pareto/NBD's s / beta = 0)
    def rising(v: np.ndarray) -> float:
        return -float(v[0] + (v[1] - 0.5) ** 2)

    bounds = [(-3.0, 3.0), (-3.0, 3.0)]
    at_limit = _maximise(
        rising, [(1.0, 1.0)], names=("u", "v"), model="toy", bounds=bounds, limits=("u",)
    )
    np.testing.assert_allclose(at_limit.theta, [-3.0, 0.5], atol=1e-5)
    with pytest.raises(BTYDFitError, match=r"\['u'\] ran to the bound"):
        _maximise(rising, [(1.0, 1.0)], names=("u", "v"), model="toy", bounds=bounds)


def test_optimiser_falls_back_to_nelder_mead_then_raises() -> None:
    target = np.array([0.3, -0.7])
    kinked = _maximise(
        lambda v: -float(np.abs(v - target).sum()), [(1.0, 1.0)], names=("u", "v"), model="toy"
    )
    assert kinked.method == "Nelder-Mead"
    np.testing.assert_allclose(kinked.theta, target, atol=1e-6)
    with pytest.raises(BTYDFitError, match=r"toy fit did not converge: .*\['u', 'v'\] ran to"):
        _maximise(lambda v: float(v.sum()), [(1.0, 1.0)], names=("u", "v"), model="toy")
