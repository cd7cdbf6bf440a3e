"""Synthetic customers with known ground truth: transactions, engagement events, churn times.

The generator is a discrete-time simulation over periods of ``period_days`` (a week by
default), vectorised over customers: the only Python loop is over periods.

Behavioural model
-----------------
Customers sign up at uniformly random instants across the window ``[start, start + months)``.
Each draws three latent traits at signup, fixed for life:

* a purchase rate ``lambda`` (orders per month) ~ Gamma(``purchase_rate_shape``,
  ``purchase_rate_scale``);
* a spend level ``s`` (expected unit price) ~ LogNormal(``spend_log_mean``, ``spend_log_sd``);
* an engagement propensity ``e`` ~ Gamma(``engagement_shape``, 1 / ``engagement_shape``)
  (mean 1).

Each customer also carries a latent log-satisfaction ``z <= 0`` (0 at signup; ``exp(z)`` is
the satisfaction in (0, 1]) and exponentially decaying memories (half-life
``memory_half_life_days``) of recent complaints, low CSAT answers (<= 2), returns and
loyalty-point redemptions.

In every period, for each customer who has signed up and not churned:

1. **Churn** with per-period probability ``h = h0 * exp(-dissatisfaction_hazard * z)
   * complaint_hazard_multiplier ** min(m_complaint, 3) * low_csat_hazard_multiplier **
   min(m_low_csat, 3) * return_hazard_multiplier ** min(m_return, 3) *
   loyalty_hazard_multiplier ** min(m_loyalty, 1)``, capped at 1, where ``h0`` is
   ``base_churn_hazard`` (per month) converted to one period. The churn instant is uniform in
   the customer's part of the period; from then on the customer neither buys nor engages.
2. **Buy**: Poisson(``lambda * exp(z)``) orders per month of exposure, at uniform instants.
   An order has ``1 + Poisson(lines_per_order - 1)`` lines; each line a product drawn by Zipf
   popularity (exponent ``product_popularity``), ``1 + Poisson(quantity_mean - 1)`` units at
   ``s`` times the product's price factor (LogNormal(0, ``product_price_sd``)), in cents.
3. **Return**: each line is returned with ``return_probability``, after an exponential delay
   (mean ``return_delay_days``, at least a day, at most ``max_return_days``). A return is a
   line with the negated quantity and order id ``"C" + order_id + "-" + line number``. Returns
   that would fall after churn or after the window are not made.
4. **Engage**: visits, email opens, app logins and loyalty-point redemptions are Poisson with
   monthly rate ``<type>_rate * e * exp(z)``; each open is clicked with
   ``email_click_probability``. Redemptions carry the points (LogNormal around
   ``loyalty_points_median``).
5. **Service**: support tickets arrive at ``support_ticket_rate`` plus one with probability
   ``ticket_per_return`` per return this period; complaints at ``complaint_rate`` plus one with
   ``complaint_per_ticket`` per ticket.
6. **Surveys**: NPS at ``nps_rate``; CSAT at ``csat_rate`` plus one with ``csat_per_ticket``
   per ticket. Scores are ``round(mean + slope * z - penalty * complained + noise)``, clipped
   to 0-10 (NPS) or 1-5 (CSAT), so they drop after bad experiences.
7. **Update**: memories decay and add this period's counts; ``z`` recovers towards 0
   (half-life ``recovery_half_life_days``), takes Gaussian noise (``satisfaction_drift`` per
   square-root month) and drops by ``complaint_shock``, ``low_csat_shock`` and
   ``return_shock`` per event. It is then capped at 0.

Rates are per month (30.4375 days) and scaled by the customer's exposure in the period, so
results barely depend on ``period_days``. Churn follows bad experiences and a sinking ``z``,
and a sinking ``z`` also thins out purchases and engagement: customers who are about to churn
look quieter and unhappier beforehand, which is the signal a churn model should find.

The ground truth is ``SynthData.truth``: signup and churn instants (NaT when the customer is
still alive at the end of the window) and the latent traits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from churn import ChurnError
from churn.io import write_parquet

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

EVENT_TYPES = (
    "visit",
    "email_open",
    "email_click",
    "support_ticket",
    "complaint",
    "nps",
    "csat",
    "app_login",
    "loyalty_points_redeemed",
)
TRANSACTION_COLUMNS = ("customer_id", "order_id", "ts", "quantity", "unit_price", "product_id")
EVENT_COLUMNS = ("customer_id", "ts", "event_type", "value")
TRUTH_COLUMNS = (
    "customer_id",
    "signup_ts",
    "churn_ts",
    "purchase_rate",
    "spend_level",
    "engagement_propensity",
)
OUTPUT_NAMES = ("transactions", "events", "truth")

MONTH_DAYS = 30.4375
_DAY = 86_400
_NEVER = np.iinfo(np.int64).max
LOW_CSAT = 2  # a CSAT answer at or below this is a bad experience
# Exponent caps: a burst of complaints raises the hazard a lot, but not without bound, and
# loyalty engagement can at most apply its multiplier once.
_MAX_BAD_STACK = 3.0
_MAX_LOYALTY_STACK = 1.0
# Survey scores: slope on log-satisfaction and drop after a complaint in the same period,
# per point of scale (NPS spans 0-10, CSAT 1-5).
_CSAT_SLOPE, _CSAT_COMPLAINT_PENALTY = 1.5, 1.0
_NPS_SLOPE, _NPS_COMPLAINT_PENALTY = 3.0, 2.0
_LOYALTY_POINTS_SD = 0.5


class SynthSpecError(ChurnError, ValueError):
    """A :class:`SynthSpec` knob is out of its range: ``field`` names it, ``problem`` says
    what is wrong with its value (the command line names its own option instead)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"SynthSpec.{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class SynthSpec:
    """Every knob of the generator; rates are per month (30.4375 days) of exposure.

    Attributes
    ----------
    n_customers : int
        Customers signing up over the window (>= 1).
    months : int
        Window length in calendar months from ``start`` (>= 1).
    seed : int, default 0
        Seed for ``np.random.default_rng``; equal specs give equal data.
    start : datetime.date, default 2022-01-01
        First day of the window.
    period_days : int, default 7
        Simulation step; churn is decided and state updated once per period.
    purchase_rate_shape, purchase_rate_scale : float, default 1.5, 0.6
        Gamma prior of orders per month (mean 0.9).
    spend_log_mean, spend_log_sd : float, default 2.5, 0.6
        LogNormal prior of the spend level, the expected unit price (median about 12.2).
    lines_per_order : float, default 2.5
        Mean lines per order (``1 + Poisson(lines_per_order - 1)``, >= 1).
    quantity_mean : float, default 1.8
        Mean units per line (``1 + Poisson(quantity_mean - 1)``, >= 1).
    n_products : int, default 2000
        Catalogue size; product ids ``P00001``...
    product_popularity : float, default 1.1
        Zipf exponent of product popularity (0: uniform).
    product_price_sd : float, default 0.5
        Log-sd of the per-product price factor.
    return_probability : float, default 0.04
        Probability that a line is returned.
    return_delay_days, max_return_days : float, default 7.0, 28.0
        Mean and maximum days from purchase to return (at least one day).
    engagement_shape : float, default 2.0
        Gamma shape of the engagement propensity (mean 1; smaller is more dispersed).
    visit_rate, email_open_rate, app_login_rate : float, default 2.0, 1.5, 1.0
        Monthly events at propensity 1 and full satisfaction.
    email_click_probability : float, default 0.25
        Probability that an email open leads to a click.
    loyalty_redemption_rate : float, default 0.15
        Monthly loyalty-point redemptions at propensity 1 and full satisfaction.
    loyalty_points_median : float, default 500.0
        Median points per redemption.
    support_ticket_rate, complaint_rate : float, default 0.06, 0.02
        Spontaneous monthly support tickets and complaints.
    ticket_per_return, complaint_per_ticket : float, default 0.4, 0.25
        Probability that a return opens a ticket, and that a ticket turns into a complaint.
    nps_rate, csat_rate : float, default 0.04, 0.03
        Spontaneous monthly NPS and CSAT answers.
    csat_per_ticket : float, default 0.6
        Probability of a CSAT answer after a support ticket.
    nps_mean, csat_mean, survey_noise : float, default 8.0, 4.3, 0.7
        Scores at full satisfaction, and the noise sd on the CSAT scale (doubled for NPS).
    base_churn_hazard : float, default 0.015
        Monthly churn probability of a satisfied customer with no recent experiences.
    complaint_hazard_multiplier, low_csat_hazard_multiplier, return_hazard_multiplier : float
        Hazard multipliers for one recent complaint, low CSAT or return (default 4.0, 2.5,
        1.5); they compound for several, up to three of each.
    loyalty_hazard_multiplier : float, default 0.5
        Hazard multiplier after a recent loyalty redemption (below 1 lowers it).
    dissatisfaction_hazard : float, default 2.0
        The hazard is multiplied by ``exp(-dissatisfaction_hazard * z)``.
    memory_half_life_days : float, default 45.0
        Half-life of the memories of complaints, low CSAT, returns and redemptions.
    recovery_half_life_days : float, default 60.0
        Half-life of ``z`` returning to 0.
    satisfaction_drift : float, default 0.3
        Sd of the random walk of ``z`` per square-root month.
    complaint_shock, low_csat_shock, return_shock : float, default 0.4, 0.3, 0.15
        Drop of ``z`` per complaint, low CSAT answer and return.
    """

    n_customers: int
    months: int
    seed: int = 0
    start: date = date(2022, 1, 1)
    period_days: int = 7
    purchase_rate_shape: float = 1.5
    purchase_rate_scale: float = 0.6
    spend_log_mean: float = 2.5
    spend_log_sd: float = 0.6
    lines_per_order: float = 2.5
    quantity_mean: float = 1.8
    n_products: int = 2000
    product_popularity: float = 1.1
    product_price_sd: float = 0.5
    return_probability: float = 0.04
    return_delay_days: float = 7.0
    max_return_days: float = 28.0
    engagement_shape: float = 2.0
    visit_rate: float = 2.0
    email_open_rate: float = 1.5
    email_click_probability: float = 0.25
    app_login_rate: float = 1.0
    loyalty_redemption_rate: float = 0.15
    loyalty_points_median: float = 500.0
    support_ticket_rate: float = 0.06
    ticket_per_return: float = 0.4
    complaint_rate: float = 0.02
    complaint_per_ticket: float = 0.25
    nps_rate: float = 0.04
    csat_rate: float = 0.03
    csat_per_ticket: float = 0.6
    nps_mean: float = 8.0
    csat_mean: float = 4.3
    survey_noise: float = 0.7
    base_churn_hazard: float = 0.015
    complaint_hazard_multiplier: float = 4.0
    low_csat_hazard_multiplier: float = 2.5
    return_hazard_multiplier: float = 1.5
    loyalty_hazard_multiplier: float = 0.5
    dissatisfaction_hazard: float = 2.0
    memory_half_life_days: float = 45.0
    recovery_half_life_days: float = 60.0
    satisfaction_drift: float = 0.3
    complaint_shock: float = 0.4
    low_csat_shock: float = 0.3
    return_shock: float = 0.15

    def __post_init__(self) -> None:
        if not isinstance(self.start, date) or isinstance(self.start, datetime):
            raise SynthSpecError("start", f"{self.start!r} is not a datetime.date")
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            accept, expected = _RULES.get(spec_field.name, _NON_NEGATIVE)
            if spec_field.name != "start" and not (math.isfinite(value) and accept(value)):
                raise SynthSpecError(
                    spec_field.name, f"{value!r} is out of range; expected {expected}"
                )


_NON_NEGATIVE = (lambda v: v >= 0, "a finite number >= 0")
_POSITIVE = (lambda v: v > 0, "a finite number > 0")
_AT_LEAST_ONE = (lambda v: v >= 1, "a finite number >= 1")
_PROBABILITY = (lambda v: 0 <= v <= 1, "a probability in [0, 1]")
_COUNT = (lambda v: isinstance(v, int | np.integer) and v >= 1, "an integer >= 1")
_RULES = {
    "n_customers": _COUNT,
    "months": _COUNT,
    "period_days": (
        lambda v: isinstance(v, int | np.integer) and 1 <= v <= 366,
        "an integer in [1, 366]",
    ),
    "n_products": _COUNT,
    "seed": (lambda v: isinstance(v, int | np.integer) and v >= 0, "an integer >= 0"),
    "lines_per_order": _AT_LEAST_ONE,
    "quantity_mean": _AT_LEAST_ONE,
    "max_return_days": _AT_LEAST_ONE,  # a return comes a day or more after its purchase
    "spend_log_mean": (lambda v: True, "a finite number"),
    "base_churn_hazard": (lambda v: 0 <= v < 1, "a monthly probability in [0, 1)"),
    **dict.fromkeys(
        (
            "return_probability",
            "email_click_probability",
            "ticket_per_return",
            "complaint_per_ticket",
            "csat_per_ticket",
        ),
        _PROBABILITY,
    ),
    **dict.fromkeys(
        (
            "purchase_rate_shape",
            "purchase_rate_scale",
            "engagement_shape",
            "return_delay_days",
            "loyalty_points_median",
            "complaint_hazard_multiplier",
            "low_csat_hazard_multiplier",
            "return_hazard_multiplier",
            "loyalty_hazard_multiplier",
            "memory_half_life_days",
            "recovery_half_life_days",
        ),
        _POSITIVE,
    ),
}


@dataclass(frozen=True, eq=False)
class SynthData:
    """Generated tables.

    ``transactions``: ``customer_id``, ``order_id`` (str), ``ts`` (datetime64[us]),
    ``quantity`` (int64, negative on returns), ``unit_price`` (float64), ``product_id`` (str);
    sorted by time. ``events``: ``customer_id`` (str), ``ts``, ``event_type`` (str, one of
    :data:`EVENT_TYPES`), ``value`` (float64 score or points, NaN otherwise); sorted by time.
    ``truth``: one row per customer with ``signup_ts``, ``churn_ts`` (NaT if alive at the end
    of the window), ``purchase_rate`` (orders per month), ``spend_level`` and
    ``engagement_propensity``.
    """

    transactions: pd.DataFrame
    events: pd.DataFrame
    truth: pd.DataFrame


@dataclass(frozen=True)
class _Clock:
    """The window and its periods, in integer seconds since ``start``."""

    window_s: int
    period_s: int
    n_periods: int
    months_per_period: float

    @classmethod
    def of(cls, spec: SynthSpec) -> _Clock:
        end = (pd.Timestamp(spec.start) + pd.DateOffset(months=spec.months)).date()
        window_s = (end - spec.start).days * _DAY
        period_s = spec.period_days * _DAY
        return cls(window_s, period_s, -(-window_s // period_s), spec.period_days / MONTH_DAYS)

    def decay(self, half_life_days: float) -> float:
        """Factor by which a quantity with this half-life shrinks over one period."""
        return float(0.5 ** (self.period_s / (half_life_days * _DAY)))


@dataclass(frozen=True)
class _Customers:
    signup: IntArray
    purchase_rate: FloatArray
    spend_level: FloatArray
    engagement: FloatArray


@dataclass(frozen=True)
class _Catalogue:
    cdf: FloatArray
    price_factor: FloatArray


@dataclass
class _State:
    """Per-customer state, mutated period by period inside one :func:`generate` call."""

    z: FloatArray
    m_complaint: FloatArray
    m_low_csat: FloatArray
    m_return: FloatArray
    m_loyalty: FloatArray
    churn: IntArray
    returns_due: NDArray[np.int32]  # ring of return counts per future period and customer

    @classmethod
    def new(cls, n: int, ring: int) -> _State:
        def zeros() -> FloatArray:
            return np.zeros(n)

        churn = np.full(n, _NEVER, dtype=np.int64)
        due = np.zeros((ring, n), dtype=np.int32)
        return cls(zeros(), zeros(), zeros(), zeros(), zeros(), churn, due)


@dataclass(frozen=True)
class _Span:
    """The customers active in the period from ``start`` and their slice ``[lo, hi)`` of it."""

    start: int
    active: IntArray
    lo: IntArray
    hi: IntArray
    months: FloatArray  # exposure in months


@dataclass(frozen=True)
class _Experiences:
    """This period's counts per active customer that move churn risk and satisfaction."""

    complaints: IntArray
    low_csat: IntArray
    returns: NDArray[np.int32]
    redemptions: IntArray


@dataclass
class _Log:
    """What happened, as lists of per-period arrays."""

    order_customer: list[IntArray] = field(default_factory=list)
    order_ts: list[IntArray] = field(default_factory=list)
    line_order: list[IntArray] = field(default_factory=list)
    line_no: list[IntArray] = field(default_factory=list)
    line_product: list[IntArray] = field(default_factory=list)
    line_quantity: list[IntArray] = field(default_factory=list)
    line_price: list[FloatArray] = field(default_factory=list)
    return_line: list[IntArray] = field(default_factory=list)
    return_ts: list[IntArray] = field(default_factory=list)
    event_customer: list[IntArray] = field(default_factory=list)
    event_ts: list[IntArray] = field(default_factory=list)
    event_code: list[NDArray[np.int8]] = field(default_factory=list)
    event_value: list[FloatArray] = field(default_factory=list)
    n_orders: int = 0
    n_lines: int = 0

    def sort_events_since(self, first: int, period_start: int) -> None:
        """Merge the event chunks from ``first`` on (one period's) into one, sorted by time.

        Periods do not overlap, so sorting each period sorts the whole log, in small pieces.
        """
        ts = np.concatenate(self.event_ts[first:])
        perm = _argsort_seconds(ts - period_start)
        for chunks in (self.event_customer, self.event_code, self.event_value):
            chunks[first:] = [np.concatenate(chunks[first:])[perm]]
        self.event_ts[first:] = [ts[perm]]


def generate(spec: SynthSpec) -> SynthData:
    """Simulate customers under ``spec``; see the module docstring for the model.

    Parameters
    ----------
    spec : SynthSpec
        The knobs, including the seed: equal specs give equal data.

    Returns
    -------
    SynthData
        Transactions, events and the per-customer ground truth.

    Examples
    --------
    >>> data = generate(SynthSpec(n_customers=50, months=6, seed=1))
    >>> len(data.truth), list(data.transactions.columns)[:3]
    (50, ['customer_id', 'order_id', 'ts'])
    """
    rng = np.random.default_rng(spec.seed)
    clock = _Clock.of(spec)
    customers = _draw_customers(spec, clock, rng)
    catalogue = _draw_catalogue(spec, rng)
    state, log = _simulate(spec, clock, customers, catalogue, rng)
    ids = _id_strings("C", np.arange(1, spec.n_customers + 1), width=7)
    return SynthData(
        transactions=_transactions_frame(spec, clock, log, state.churn, ids),
        events=_events_frame(spec, log, ids),
        truth=_truth_frame(spec, clock, customers, state.churn, ids),
    )


def write(data: SynthData, out_dir: Path) -> dict[str, Path]:
    """Write the three tables as Parquet files in ``out_dir``, each atomically.

    Parameters
    ----------
    data : SynthData
        What :func:`generate` returned.
    out_dir : pathlib.Path
        Target folder, created if missing.

    Returns
    -------
    dict of str to pathlib.Path
        ``transactions``, ``events`` and ``truth`` mapped to their ``<name>.parquet`` files.
    """
    paths = {name: Path(out_dir) / f"{name}.parquet" for name in OUTPUT_NAMES}
    for name, path in paths.items():
        write_parquet(getattr(data, name), path)
    return paths


def _draw_customers(spec: SynthSpec, clock: _Clock, rng: np.random.Generator) -> _Customers:
    n = spec.n_customers
    return _Customers(
        signup=np.sort(rng.integers(0, clock.window_s, n, dtype=np.int64)),
        purchase_rate=rng.gamma(spec.purchase_rate_shape, spec.purchase_rate_scale, n),
        spend_level=rng.lognormal(spec.spend_log_mean, spec.spend_log_sd, n),
        engagement=rng.gamma(spec.engagement_shape, 1 / spec.engagement_shape, n),
    )


def _draw_catalogue(spec: SynthSpec, rng: np.random.Generator) -> _Catalogue:
    weights = np.arange(1, spec.n_products + 1, dtype=np.float64) ** -spec.product_popularity
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0  # rounding must not leave a gap above the last product
    factor = rng.lognormal(0.0, spec.product_price_sd, spec.n_products)
    return _Catalogue(cdf=cdf, price_factor=factor / factor.mean())


def _simulate(
    spec: SynthSpec,
    clock: _Clock,
    customers: _Customers,
    catalogue: _Catalogue,
    rng: np.random.Generator,
) -> tuple[_State, _Log]:
    ring = math.ceil(spec.max_return_days * _DAY / clock.period_s) + 1
    state, log = _State.new(spec.n_customers, ring), _Log()
    for period in range(clock.n_periods):
        p0, p1 = period * clock.period_s, min((period + 1) * clock.period_s, clock.window_s)
        signed_up = int(np.searchsorted(customers.signup, p1))  # customers are in signup order
        active = np.flatnonzero(state.churn[:signed_up] >= p0)
        lo = np.maximum(customers.signup[active], p0)
        _draw_churn(spec, clock, state, active, lo, p1, rng)
        hi = np.minimum(state.churn[active], p1)
        span = _Span(p0, active, lo, hi, (hi - lo) / (MONTH_DAYS * _DAY))
        _draw_purchases(spec, clock, customers, catalogue, state, span, rng, log)
        returns_now = state.returns_due[period % ring, active]
        state.returns_due[period % ring] = 0
        first_event = len(log.event_ts)
        _draw_experiences(spec, clock, customers, state, span, returns_now, rng, log)
        log.sort_events_since(first_event, p0)
    return state, log


def _draw_churn(
    spec: SynthSpec,
    clock: _Clock,
    state: _State,
    active: IntArray,
    lo: IntArray,
    p1: int,
    rng: np.random.Generator,
) -> None:
    hazard = _period_hazard(spec, clock, state, active)
    exposure = p1 - lo
    partial = exposure < clock.period_s  # signed up in this period, or the window's last one
    hazard[partial] = 1 - (1 - hazard[partial]) ** (exposure[partial] / clock.period_s)
    churns = np.flatnonzero(rng.random(active.size) < hazard)
    offset = np.floor(rng.random(churns.size) * exposure[churns]).astype(np.int64)
    state.churn[active[churns]] = lo[churns] + offset


def _period_hazard(spec: SynthSpec, clock: _Clock, state: _State, idx: IntArray) -> FloatArray:
    """Per-period churn probability of customers ``idx`` given their state."""
    base = 1 - (1 - spec.base_churn_hazard) ** clock.months_per_period
    log_mult = -spec.dissatisfaction_hazard * state.z[idx]
    for memory, multiplier, cap in (
        (state.m_complaint, spec.complaint_hazard_multiplier, _MAX_BAD_STACK),
        (state.m_low_csat, spec.low_csat_hazard_multiplier, _MAX_BAD_STACK),
        (state.m_return, spec.return_hazard_multiplier, _MAX_BAD_STACK),
        (state.m_loyalty, spec.loyalty_hazard_multiplier, _MAX_LOYALTY_STACK),
    ):
        log_mult += math.log(multiplier) * np.minimum(memory[idx], cap)
    return np.minimum(base * np.exp(log_mult), 1.0)


def _draw_purchases(
    spec: SynthSpec,
    clock: _Clock,
    customers: _Customers,
    catalogue: _Catalogue,
    state: _State,
    span: _Span,
    rng: np.random.Generator,
    log: _Log,
) -> None:
    mood = np.exp(state.z[span.active])
    pos = _repeat(rng.poisson(customers.purchase_rate[span.active] * mood * span.months))
    order_ts = _uniform_ts(rng, span.lo[pos], span.hi[pos])
    # Orders are numbered in time order, like invoices: sort them before they get lines.
    by_time = _argsort_seconds(order_ts - span.start)
    order_customer, order_ts = span.active[pos[by_time]], order_ts[by_time]
    n_lines = 1 + rng.poisson(spec.lines_per_order - 1, pos.size)
    line_order = _repeat(n_lines)
    n = line_order.size
    product = np.searchsorted(catalogue.cdf, rng.random(n), side="right")
    quantity = 1 + rng.poisson(spec.quantity_mean - 1, n)
    price = customers.spend_level[order_customer[line_order]] * catalogue.price_factor[product]
    log.order_customer.append(order_customer)
    log.order_ts.append(order_ts)
    log.line_order.append(line_order + log.n_orders)
    log.line_no.append(np.arange(n) - np.repeat(np.cumsum(n_lines) - n_lines, n_lines) + 1)
    log.line_product.append(product)
    log.line_quantity.append(quantity)
    log.line_price.append(np.maximum(np.round(price, 2), 0.01))
    _draw_returns(spec, clock, state, order_customer[line_order], order_ts[line_order], rng, log)
    log.n_orders += pos.size
    log.n_lines += n


def _draw_returns(
    spec: SynthSpec,
    clock: _Clock,
    state: _State,
    line_customer: IntArray,
    line_ts: IntArray,
    rng: np.random.Generator,
    log: _Log,
) -> None:
    hit = np.flatnonzero(rng.random(line_ts.size) < spec.return_probability)
    delay = rng.exponential(spec.return_delay_days * _DAY, hit.size)
    delay = np.clip(delay, _DAY, spec.max_return_days * _DAY).astype(np.int64)
    ts = line_ts[hit] + delay
    # Book each return into the period it happens in; its effect on churn starts there.
    inside = ts < clock.window_s
    ring = state.returns_due.shape[0]
    due_slot = (ts[inside] // clock.period_s) % ring
    np.add.at(state.returns_due, (due_slot, line_customer[hit][inside]), 1)
    log.return_line.append(hit + log.n_lines)
    log.return_ts.append(ts)


def _draw_experiences(
    spec: SynthSpec,
    clock: _Clock,
    customers: _Customers,
    state: _State,
    span: _Span,
    returns_now: NDArray[np.int32],
    rng: np.random.Generator,
    log: _Log,
) -> None:
    redemptions = _draw_engagement(spec, customers, state, span, rng, log)
    returned = np.flatnonzero(returns_now)
    from_returns = rng.binomial(returns_now[returned], spec.ticket_per_return)
    tickets = np.concatenate(
        [
            _sparse_poisson(rng, spec.support_ticket_rate * span.months),
            returned.repeat(from_returns),
        ]
    )
    complaints = np.concatenate(
        [
            _sparse_poisson(rng, spec.complaint_rate * span.months),
            tickets[rng.random(tickets.size) < spec.complaint_per_ticket],
        ]
    )
    _emit_at(rng, span, "support_ticket", tickets, log)
    _emit_at(rng, span, "complaint", complaints, log)
    n_complaints = np.bincount(complaints, minlength=span.active.size)
    low_csat = _draw_surveys(spec, state, span, tickets, n_complaints > 0, rng, log)
    counts = _Experiences(n_complaints, low_csat, returns_now, redemptions)
    _update_state(spec, clock, state, span.active, counts, rng)


def _draw_engagement(
    spec: SynthSpec,
    customers: _Customers,
    state: _State,
    span: _Span,
    rng: np.random.Generator,
    log: _Log,
) -> IntArray:
    """Visits, emails, logins and redemptions; returns redemptions per active customer."""
    drive = customers.engagement[span.active] * np.exp(state.z[span.active]) * span.months
    _emit(rng, span, "visit", rng.poisson(spec.visit_rate * drive), log)
    opens = _repeat(rng.poisson(spec.email_open_rate * drive))
    _emit_at(rng, span, "email_open", opens, log)
    clicks = opens[rng.random(opens.size) < spec.email_click_probability]
    _emit_at(rng, span, "email_click", clicks, log)
    _emit(rng, span, "app_login", rng.poisson(spec.app_login_rate * drive), log)
    pos = _sparse_poisson(rng, spec.loyalty_redemption_rate * drive)
    points = rng.lognormal(math.log(spec.loyalty_points_median), _LOYALTY_POINTS_SD, pos.size)
    _emit_at(rng, span, "loyalty_points_redeemed", pos, log, np.round(points))
    return np.bincount(pos, minlength=span.active.size)


def _draw_surveys(
    spec: SynthSpec,
    state: _State,
    span: _Span,
    tickets: IntArray,
    complained: NDArray[np.bool_],
    rng: np.random.Generator,
    log: _Log,
) -> IntArray:
    """NPS and CSAT answers; returns low CSAT answers per active customer."""
    z = state.z[span.active]
    pos = _sparse_poisson(rng, spec.nps_rate * span.months)
    noise = rng.normal(0.0, 2 * spec.survey_noise, pos.size)
    nps = spec.nps_mean + _NPS_SLOPE * z[pos] - _NPS_COMPLAINT_PENALTY * complained[pos] + noise
    _emit_at(rng, span, "nps", pos, log, np.clip(np.round(nps), 0, 10))
    after_ticket = tickets[rng.random(tickets.size) < spec.csat_per_ticket]
    pos = np.concatenate([_sparse_poisson(rng, spec.csat_rate * span.months), after_ticket])
    noise = rng.normal(0.0, spec.survey_noise, pos.size)
    csat = spec.csat_mean + _CSAT_SLOPE * z[pos] - _CSAT_COMPLAINT_PENALTY * complained[pos] + noise
    csat = np.clip(np.round(csat), 1, 5)
    _emit_at(rng, span, "csat", pos, log, csat)
    return np.bincount(pos[csat <= LOW_CSAT], minlength=span.active.size)


def _update_state(
    spec: SynthSpec,
    clock: _Clock,
    state: _State,
    active: IntArray,
    counts: _Experiences,
    rng: np.random.Generator,
) -> None:
    memory = clock.decay(spec.memory_half_life_days)
    state.m_complaint[active] = state.m_complaint[active] * memory + counts.complaints
    state.m_low_csat[active] = state.m_low_csat[active] * memory + counts.low_csat
    state.m_return[active] = state.m_return[active] * memory + counts.returns
    state.m_loyalty[active] = state.m_loyalty[active] * memory + counts.redemptions
    shock = (
        spec.complaint_shock * counts.complaints
        + spec.low_csat_shock * counts.low_csat
        + spec.return_shock * counts.returns
    )
    drift = spec.satisfaction_drift * math.sqrt(clock.months_per_period)
    z = clock.decay(spec.recovery_half_life_days) * state.z[active]
    z += drift * rng.standard_normal(active.size) - shock
    state.z[active] = np.minimum(z, 0.0)


def _repeat(counts: NDArray[np.integer]) -> IntArray:
    """Positions ``i`` repeated ``counts[i]`` times: one entry per drawn event."""
    return np.repeat(np.arange(counts.size, dtype=np.int64), counts)


def _sparse_poisson(rng: np.random.Generator, rates: FloatArray) -> IntArray:
    """Positions ``i`` repeated Poisson(``rates[i]``) times, sorted.

    Drawn as one Poisson total spread over positions in proportion to the rates, which is the
    same law as independent draws but far cheaper when most rates are tiny (tickets, surveys).
    """
    cumulative = np.cumsum(rates)
    total = float(cumulative[-1]) if cumulative.size else 0.0
    spots = np.sort(rng.random(rng.poisson(total))) * total
    return np.minimum(np.searchsorted(cumulative, spots, side="right"), rates.size - 1)


def _argsort_seconds(seconds: IntArray) -> IntArray:
    """Stable argsort of second offsets in ``[0, 2**32)``, such as times within a period.

    Two stable passes over 16-bit halves, which numpy sorts by radix: about three times as
    fast as one stable sort of int64, and the simulation sorts every period's events.
    """
    low = (seconds & 0xFFFF).astype(np.uint16)
    first = np.argsort(low, kind="stable")
    high = (seconds[first] >> 16).astype(np.uint16)
    return first[np.argsort(high, kind="stable")]


def _uniform_ts(rng: np.random.Generator, lo: IntArray, hi: IntArray) -> IntArray:
    """Whole seconds uniform in ``[lo, hi)``; every ``hi > lo`` here (no exposure, no draw)."""
    return lo + np.floor(rng.random(lo.size) * (hi - lo)).astype(np.int64)


def _emit(
    rng: np.random.Generator, span: _Span, event_type: str, counts: IntArray, log: _Log
) -> None:
    """Log ``counts[i]`` events without a value for active customer ``i``."""
    _emit_at(rng, span, event_type, _repeat(counts), log)


def _emit_at(
    rng: np.random.Generator,
    span: _Span,
    event_type: str,
    pos: IntArray,
    log: _Log,
    values: FloatArray | None = None,
) -> None:
    """Log one event per entry of ``pos`` (positions in ``span.active``) at uniform instants."""
    log.event_customer.append(span.active[pos])
    log.event_ts.append(_uniform_ts(rng, span.lo[pos], span.hi[pos]))
    log.event_code.append(np.full(pos.size, EVENT_TYPES.index(event_type), dtype=np.int8))
    log.event_value.append(np.full(pos.size, np.nan) if values is None else values)


def _id_strings(prefix: str, numbers: IntArray, *, width: int) -> pa.StringArray:
    """``prefix`` + zero-padded ``numbers`` (at least ``width`` digits), built as Arrow bytes.

    Formatting millions of ids one Python string at a time would dominate the run time, so
    the digits are written into a byte matrix that becomes the string array's data buffer.
    """
    top = int(np.max(numbers, initial=0))
    width = max(width, len(str(top)))
    head = np.frombuffer(prefix.encode("ascii"), dtype=np.uint8)
    size = head.size + width
    chars = np.empty((numbers.size, size), dtype=np.uint8)
    chars[:, : head.size] = head
    rest = np.asarray(numbers).astype(np.uint32 if top < 2**32 else np.uint64)  # 32 bits: faster
    ten = rest.dtype.type(10)
    for column in range(size - 1, head.size - 1, -1):
        rest, digit = np.divmod(rest, ten)
        chars[:, column] = digit + ord("0")
    large = numbers.size * size >= 2**31
    offsets = np.arange(numbers.size + 1, dtype=np.int64 if large else np.int32) * size
    kind = pa.LargeStringArray if large else pa.StringArray
    return kind.from_buffers(numbers.size, pa.py_buffer(offsets), pa.py_buffer(chars))


def _transactions_frame(
    spec: SynthSpec, clock: _Clock, log: _Log, churn: IntArray, ids: pa.StringArray
) -> pd.DataFrame:
    """Purchase lines and the returns made before churn and the window end, sorted by time."""
    order_customer, order_ts = _cat(log.order_customer), _cat(log.order_ts)
    line_order, line_no = _cat(log.line_order), _cat(log.line_no)
    return_line, return_ts = _cat(log.return_line), _cat(log.return_ts)
    returner = order_customer[line_order[return_line]]
    kept = return_ts < np.minimum(churn[returner], clock.window_s)
    source, is_return, ts = _merge_returns(order_ts[line_order], return_line[kept], return_ts[kept])
    order = line_order[source]
    products = _id_strings("P", np.arange(1, spec.n_products + 1), width=5)
    return pd.DataFrame(
        {
            "customer_id": _take(ids, order_customer[order]),
            "order_id": _order_ids(order, order_ts.size, line_no[source], is_return),
            "ts": _timestamps(spec, ts),
            "quantity": np.where(is_return, -1, 1) * _cat(log.line_quantity)[source],
            "unit_price": _cat(log.line_price, np.float64)[source],
            "product_id": _take(products, _cat(log.line_product)[source]),
        },
        copy=False,
    )


def _merge_returns(
    line_ts: IntArray, return_line: IntArray, return_ts: IntArray
) -> tuple[IntArray, NDArray[np.bool_], IntArray]:
    """Purchase lines (already in time order) and returns, merged by time.

    Returns each row's source line, whether it is a return, and its time; a return comes after
    the purchases of the same second. A merge rather than a sort of all rows keeps this linear.
    """
    by_time = np.argsort(return_ts, kind="stable")
    return_line, return_ts = return_line[by_time], return_ts[by_time]
    slot = np.searchsorted(line_ts, return_ts, side="right") + np.arange(return_ts.size)
    is_return = np.zeros(line_ts.size + return_ts.size, dtype=bool)
    is_return[slot] = True
    source = np.empty(is_return.size, dtype=np.int64)
    source[~is_return], source[is_return] = np.arange(line_ts.size), return_line
    ts = np.empty(is_return.size, dtype=np.int64)
    ts[~is_return], ts[is_return] = line_ts, return_ts
    return source, is_return, ts


def _order_ids(
    order: IntArray, n_orders: int, line_no: IntArray, is_return: NDArray[np.bool_]
) -> pd.Series:
    """``O<order>`` for purchases; ``CO<order>-<line>`` for returns, as retail exports do.

    ``order`` is each row's 0-based order index; order numbers start at 1.
    """
    width = max(8, len(str(n_orders)))
    ids = _id_strings("O", np.arange(1, n_orders + 1), width=width).take(pa.array(order))
    returned = _id_strings("CO", order[is_return] + 1, width=width)
    suffix = _id_strings("", line_no[is_return], width=2)
    returned = pc.binary_join_element_wise(returned, suffix, "-")
    return _str_series(pc.replace_with_mask(ids, pa.array(is_return), returned))


def _events_frame(spec: SynthSpec, log: _Log, ids: pa.StringArray) -> pd.DataFrame:
    """All events, in time order already (see :meth:`_Log.sort_events_since`)."""
    types = pa.array(EVENT_TYPES, type=pa.string())
    return pd.DataFrame(
        {
            "customer_id": _take(ids, _cat(log.event_customer)),
            "ts": _timestamps(spec, _cat(log.event_ts)),
            "event_type": _take(types, _cat(log.event_code, np.int8)),
            "value": _cat(log.event_value, np.float64),
        },
        copy=False,
    )


def _truth_frame(
    spec: SynthSpec, clock: _Clock, customers: _Customers, churn: IntArray, ids: pa.StringArray
) -> pd.DataFrame:
    churn_ts = _timestamps(spec, np.where(churn < clock.window_s, churn, 0))
    churn_ts[churn >= clock.window_s] = np.datetime64("NaT")
    return pd.DataFrame(
        {
            "customer_id": _str_series(ids),
            "signup_ts": _timestamps(spec, customers.signup),
            "churn_ts": churn_ts,
            "purchase_rate": customers.purchase_rate,
            "spend_level": customers.spend_level,
            "engagement_propensity": customers.engagement,
        },
        copy=False,
    )


def _cat(chunks: list[NDArray], dtype: type = np.int64) -> NDArray:
    """Concatenate per-period chunks; an empty list (no period produced any) is empty."""
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.empty(0, dtype)


def _take(strings: pa.StringArray, idx: NDArray[np.integer]) -> pd.Series:
    return _str_series(strings.take(pa.array(idx)))


def _str_series(strings: pa.Array) -> pd.Series:
    return pd.Series(strings.to_pandas(), copy=False).astype("str")


def _timestamps(spec: SynthSpec, seconds: IntArray) -> NDArray[np.datetime64]:
    start_us = np.datetime64(spec.start, "us").astype(np.int64)
    return (seconds * 1_000_000 + start_us).view("datetime64[us]")
