"""The governor's decisions: a power cap per backend, and which idle backends could be parked.

Pure: no I/O, no clock reads; the caller passes the time (seconds, one clock).

Per backend, from its load (requests in flight, recent arrival rate, mean request time), its
learned efficiency model (policies/model.py: power, TTFT and TPOT vs load, as measured at the
cap in force) and the SLO, choose the per-GPU power cap with the fewest predicted joules per
output token among those whose predicted TTFT and TPOT, times (1 + `margin`), keep the SLO both
at the current load and at the expected load (Little's law, times `burst`). Each load is
scaled by the cap's decode slowdown (slower service, more in flight), and with the prefill
slowdown must stay under `max_load_share` of the load the router trusts the backend with.

How a cap changes the model's predictions follows the simulator's cap model
(proxy/governor/capmodel.py, which cites the published shapes): under a cap c below the uncapped
power p the clock falls to r = ((c - idle) / (p - idle))^(1/2); a decode step takes
(0.65 + 0.35 / r) times as long, a prefill 1 / r times. Predictions are scaled relative to the
cap in force when the model learnt them. Where that cap already binds, the uncapped power is
unknown: the board maximum is assumed (the largest slowdown, so the safe side). Prefill is
priced at the board maximum too (compute-bound work runs at the limit).

Rate limits: at most one change per backend per `hold_s`; a lower cap at most `max_step_w`
below the current one or the predicted draw, whichever is lower (raising to keep the SLO is not bounded); no change worth less than
`min_gain` of the joules per token, nor smaller than `deadband_w` (hysteresis).

Parking (decided here, done by actuate.py/park.py in apply mode): an idle backend (nothing in flight, no arrivals) can be parked when
the other unparked backends' SLO capacity (the load at which their predicted TPOT reaches the
SLO) minus their expected load still covers `burst` times the fleet's expected load; the
largest idle cost is parked first (idle W x `cost_per_j`: watts under the joules objective,
grams under the carbon one), and one backend always stays up. A parked backend is woken
(`wake_advice`) when the unparked ones' spare capacity no longer covers `burst` times their
expected load: the inverse of the parking test, so a fleet does not park and wake at one load.
Under the carbon objective a parked backend also wakes (`swap_advice`) when it is on a cleaner
grid and its grams per token at the dearest awake backend's load, idle power included, are
`swap_margin` below that backend's: grids change through the day, and a backend parked at night
must not stay parked once its site is the cleaner one. The backend it relieves is drained and
parked, and a wake-up for capacity wakes the cleanest parked backend (`cheapest_to_wake`).
Units: watts, seconds, requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from policies.efficiency import MAX_WAIT_FRACTION
from policies.model import EfficiencyModel
from proxy.governor.capmodel import DECODE_CLOCK_SENSITIVITY, PREFILL_CLOCK_SENSITIVITY, capped
from proxy.governor.clock import cap_for_clock_w

__all__ = ["BackendInput", "Decision", "GovernorParams", "Swap", "cheapest_to_wake", "decide", "decide_cap",
           "fast_params", "idle_cost_rate", "park_advice", "serve_cost_per_token", "swap_advice", "wake_advice"]

LOWER, RAISE, HOLD = "lower", "raise", "hold"


@dataclass(frozen=True, slots=True)
class GovernorParams:
    """Knobs of `decide`; defaults for a 15 s interval."""

    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    margin: float = 0.2  # predictions times (1 + margin) must keep the SLO
    burst: float = 1.5  # the expected load times this must keep it too
    hold_s: float = 15.0  # at most one change per backend per this many seconds
    max_step_w: float = 100.0  # the most a cap falls in one change
    deadband_w: float = 10.0  # smaller changes are not made
    min_gain: float = 0.02  # nor ones that save less than this share of the J/token
    grid: int = 24  # candidate caps between the GPU's minimum and maximum
    max_load_share: float = 0.5  # a cap keeps the (stretched) load under this share of capacity
    swap_margin: float = 0.2  # a parked backend wakes to take over when it costs this much less
    # Between two decisions (proxy/governor/burst.py): a parked backend wakes at once when no
    # awake backend passes the router's SLO guard, whose wait limit is this share of the TTFT
    # SLO (the router's own); at most once per `rewake_s` seconds (both governors: their interval).
    wake_wait_share: float = MAX_WAIT_FRACTION
    rewake_s: float = 15.0
    # With the fast raise (proxy/governor/fast.py: a queue between two decisions raises the cap
    # at once) a burst is met with clock headroom, not slack under a fixed cap, so the cap chosen
    # may be deeper: it keeps the SLO with these knobs instead of burst / margin / max_load_share
    # / max_step_w above, which still give the safe cap the fast raise goes to.
    # Measured in bench.governor (docs/governor.md): the load guard (0.5) and the 100 W step
    # were what held caps high at 60% load; a first-token wait of 0.15-0.4 x the TTFT SLO is
    # what capped prefill takes anyway at large batches, and raised caps at once after each
    # decision lowered them.
    fast: bool = False
    fast_burst: float = 1.0
    fast_margin: float = 0.2
    fast_load_share: float = 1.0
    fast_max_step_w: float = 500.0
    # A queue, between two decisions: the oldest request has awaited its first token this share
    # of the TTFT SLO, or the model's upper TPOT at the load in flight passes this share of the
    # TPOT SLO. A cap already at the safe one goes to the maximum, `fast_dwell_s` after the last.
    fast_wait_share: float = 0.6
    fast_tpot_share: float = 0.8
    fast_dwell_s: float = 1.0
    # The attainment target (None: off): the share of requests that must meet the SLO. With
    # one, the fleet also runs at a common clock set from measured latency (clock.py), and
    # each backend's cap is the lower of the one chosen above and the one holding its GPUs to
    # that clock (`decide`'s `clock`).
    slo_target: float | None = None


@dataclass(frozen=True, slots=True)
class BackendInput:
    """One backend as the governor sees it. Caps are per GPU (every GPU of a backend gets the
    same); the model's power is the whole backend's."""

    name: str
    model: EfficiencyModel
    in_flight: int
    arrival_rate_per_s: float
    mean_request_s: float
    gpus: int
    min_w: float
    max_w: float
    cap_w: float  # in force now
    # The time-weighted mean cap since the last decision, which the model's latest observations
    # were made at (None: `cap_w`). With the fast raise the cap moves between decisions, and
    # scaling what the model learnt under a deep cap from the raised one would read the deep
    # cap's latency as the raised cap's, and no cap would fit again.
    learned_cap_w: float | None = None
    last_change_s: float | None = None
    # What one joule of this backend costs in the objective's unit: 1 under the joules
    # objective, grams CO2e per joule at its site now (PUE included) under the carbon one.
    # Parking and waking rank backends by it, so the joules objective's order is unchanged.
    cost_per_j: float = 1.0
    # Requests now awaiting their first token, and how long (s) the oldest of them has waited:
    # burst.py reads them between decisions; the decisions themselves do not.
    waiting: int = 0
    oldest_wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one backend: `cap_w` (per GPU) is the cap to have after this tick."""

    name: str
    action: str  # lower | raise | hold
    cap_w: float
    previous_cap_w: float
    reason: str
    j_per_token_ratio: float  # predicted J/token at cap_w over that at the cap in force
    park: bool = False
    park_reason: str = ""
    # The cap the conservative knobs (burst, margin, max_load_share) would keep, for the fast
    # raise to go to when a queue forms under a deeper `cap_w` (None: no fast raise).
    safe_cap_w: float | None = None


def _expected_load(b: BackendInput) -> float:
    return max(float(b.in_flight), b.arrival_rate_per_s * b.mean_request_s)


class _Predictor:
    """The backend's model, seen under another cap."""

    def __init__(self, b: BackendInput, n: float) -> None:
        g = max(b.gpus, 1)
        self.b = b
        self.idle_w = b.model.idle_w / g
        measured_w = b.model.power_w(n) / g
        learned_w = b.cap_w if b.learned_cap_w is None else b.learned_cap_w
        binding = learned_w < b.max_w and measured_w >= 0.95 * learned_w
        self.decode_w = b.max_w if binding else max(measured_w, self.idle_w)
        self.base_decode = self._decode(learned_w)  # latency is scaled from where it was learnt
        self.base_prefill = self._prefill(learned_w)
        self.now_decode = self._decode(b.cap_w)  # J/token from the cap in force

    def _decode(self, cap_w: float) -> tuple[float, float]:
        return capped(1.0, self.decode_w, cap_w, self.idle_w, DECODE_CLOCK_SENSITIVITY)

    def _prefill(self, cap_w: float) -> float:
        return capped(1.0, self.b.max_w, cap_w, self.idle_w, PREFILL_CLOCK_SENSITIVITY)[0]

    def tpot_factor(self, cap_w: float) -> float:
        return self._decode(cap_w)[0] / self.base_decode[0]

    def ttft_factor(self, cap_w: float) -> float:
        return self._prefill(cap_w) / self.base_prefill

    def j_per_token_ratio(self, cap_w: float) -> float:
        seconds, watts = self._decode(cap_w)
        base_s, base_w = self.now_decode
        return (seconds * watts) / (base_s * base_w)


def _keeps_slo(b: BackendInput, p: GovernorParams, cap_w: float, loads: Sequence[float],
               predictors: Sequence[_Predictor]) -> str | None:
    """None if `cap_w` keeps the SLO at every load, else why not."""
    k = 1.0 + p.margin
    capacity = _slo_capacity(b, p)
    for n0, pred in zip(loads, predictors, strict=True):
        # Little's law: requests served more slowly stay longer, so the same arrivals keep more
        # of them in flight (a bigger batch, itself slower); and a slower prefill shrinks the load
        # carried within the SLO further: queues' TTFT grows before the mean TTFT line says so.
        n = n0 * pred.tpot_factor(cap_w)
        if n * pred.ttft_factor(cap_w) > p.max_load_share * capacity:
            return f"{n:.1f} in flight is near the capacity ({capacity:.0f}) at {cap_w:.0f} W"
        tpot_s = b.model.tpot_upper_s(max(n, 1.0)) * pred.tpot_factor(cap_w) * k
        if tpot_s > p.slo_tpot_s:
            return f"TPOT {tpot_s * 1e3:.0f} ms > {p.slo_tpot_s * 1e3:.0f} ms at {n:.1f} in flight"
        waiting = max(1.0, b.model.waiting)
        ttft_s = b.model.ttft_upper_s(waiting) * pred.ttft_factor(cap_w) * k
        if ttft_s > p.slo_ttft_s:
            return f"TTFT {ttft_s * 1e3:.0f} ms > {p.slo_ttft_s * 1e3:.0f} ms with {waiting:.0f} waiting"
    return None


def _options(b: BackendInput, p: GovernorParams) -> tuple[tuple[float, float], list[_Predictor], _Predictor,
                                                           list[float]]:
    """(loads checked, their predictors, the pricing predictor, the caps that keep the SLO)."""
    current = min(max(b.cap_w, b.min_w), b.max_w)
    loads = (float(b.in_flight), _expected_load(b) * p.burst)
    predictors = [_Predictor(b, n) for n in loads]
    cost = _Predictor(b, max(_expected_load(b), 1.0))  # priced at the load expected, at least one request
    step_w = (b.max_w - b.min_w) / max(p.grid, 1)
    candidates = sorted({current, b.max_w, *(b.min_w + i * step_w for i in range(p.grid + 1))})
    return loads, predictors, cost, [c for c in candidates if _keeps_slo(b, p, c, loads, predictors) is None]


def _cheapest(feasible: Sequence[float], cost: _Predictor) -> float:
    """Fewest J/token; among equals (caps that do not bind) the highest, which risks least."""
    return min(feasible, key=lambda c: (round(cost.j_per_token_ratio(c), 4), -c))


def fast_params(p: GovernorParams) -> GovernorParams:
    """`p` with the knobs a cap keeps when the fast raise meets bursts (`GovernorParams.fast`)."""
    return replace(p, burst=p.fast_burst, margin=p.fast_margin, max_load_share=p.fast_load_share,
                   max_step_w=p.fast_max_step_w)


def decide_cap(b: BackendInput, p: GovernorParams, now_s: float) -> Decision:
    """The cap for one backend (see the module docstring); with `p.fast`, chosen with the fast
    knobs, and the cap the conservative ones keep as `safe_cap_w` for the fast raise."""
    if not p.fast:
        return _decide_cap(b, p, now_s)
    d = _decide_cap(b, fast_params(p), now_s)
    _, _, cost, feasible = _options(b, p)
    safe_w = _cheapest(feasible, cost) if feasible else b.max_w
    return replace(d, safe_cap_w=max(safe_w, d.cap_w))


def _decide_cap(b: BackendInput, p: GovernorParams, now_s: float) -> Decision:
    current = min(max(b.cap_w, b.min_w), b.max_w)
    expected = _expected_load(b)
    loads, predictors, cost, feasible = _options(b, p)
    load_text = f"{b.in_flight} in flight, {b.arrival_rate_per_s:.2f} req/s, expected {expected:.1f}"

    def hold(reason: str) -> Decision:
        return Decision(b.name, HOLD, current, current, reason, 1.0)

    if not feasible:
        why = _keeps_slo(b, p, b.max_w, loads, predictors)
        if current >= b.max_w:
            return hold(f"at the maximum; SLO at risk even so ({why})")
        return Decision(b.name, RAISE, b.max_w, current, f"SLO at risk ({why}); {load_text}",
                        cost.j_per_token_ratio(b.max_w))
    best = _cheapest(feasible, cost)
    if current not in feasible:
        # A faster clock only helps, so every feasible cap lies above the current one.
        target = best
        reason = _keeps_slo(b, p, current, loads, predictors)
        return Decision(b.name, RAISE, target, current, f"SLO at risk at {current:.0f} W ({reason}); {load_text}",
                        cost.j_per_token_ratio(target))
    if b.last_change_s is not None and now_s - b.last_change_s < p.hold_s:
        return hold(f"changed {now_s - b.last_change_s:.1f} s ago (at most one change per {p.hold_s:g} s)")
    # A cap above what the GPU draws does nothing, so the bounded step starts at the draw.
    anchor = min(current, max(x.decode_w for x in (*predictors, cost)))
    target = max(best, anchor - p.max_step_w) if best < current else best
    # The bounded step may land between grid points: keep it only if it keeps the SLO too.
    if _keeps_slo(b, p, target, loads, predictors) is not None:
        target = best
    ratio = cost.j_per_token_ratio(target)
    if abs(target - current) < p.deadband_w or 1.0 - ratio < p.min_gain:
        return hold(f"{target:.0f} W would change J/token by {100 * (ratio - 1):+.1f}%: within the dead band; "
                    f"{load_text}")
    action = LOWER if target < current else RAISE
    return Decision(b.name, action, target, current,
                    f"{100 * (ratio - 1):+.1f}% J/token predicted at {target:.0f} W, SLO kept with "
                    f"{100 * p.margin:.0f}% margin; {load_text}", ratio)


def _slo_capacity(b: BackendInput, p: GovernorParams) -> float:
    """Requests in flight at which the predicted TPOT reaches the SLO (with margin), no further
    than the loads the model has seen (x2 + 8), as the router trusts it."""
    return b.model.plan(p.slo_ttft_s / (1 + p.margin), p.slo_tpot_s / (1 + p.margin)).cap


def idle_cost_rate(b: BackendInput) -> float:
    """What `b` costs per second while awake and idle: idle W x `cost_per_j` (W under the joules
    objective, grams/s under the carbon one). Parking saves in proportion to it."""
    return b.model.idle_w * b.cost_per_j


def park_advice(backends: Sequence[BackendInput], p: GovernorParams) -> dict[str, str]:
    """{backend: reason} for the idle backends that could be parked, the dearest idle first
    (`idle_cost_rate`: most idle power under the joules objective, most idle grams under the
    carbon one, so a clean site's GPUs stay up while a dirty site's sleep)."""
    total_expected = sum(_expected_load(b) for b in backends)
    idle = [b for b in backends if b.in_flight == 0 and b.arrival_rate_per_s == 0.0]
    up = {b.name: b for b in backends}
    out: dict[str, str] = {}
    for b in sorted(idle, key=lambda x: -idle_cost_rate(x)):
        if len(up) <= 1:
            break
        rest = [x for x in up.values() if x.name != b.name]
        spare = sum(max(_slo_capacity(x, p) - _expected_load(x), 0.0) for x in rest)
        if spare >= p.burst * total_expected and spare >= 1.0:
            del up[b.name]
            out[b.name] = (f"idle ({b.model.idle_w:.0f} W): the other {len(rest)} keep the SLO with "
                           f"{spare:.0f} requests of spare capacity for {total_expected:.1f} expected")
    return out


def wake_advice(up: Sequence[BackendInput], p: GovernorParams) -> str | None:
    """Why a parked backend should wake, given the unparked backends that are up; None: no need."""
    if not up:
        return "no unparked backend is up"
    expected = sum(_expected_load(b) for b in up)
    spare = sum(max(_slo_capacity(b, p) - _expected_load(b), 0.0) for b in up)
    if spare >= p.burst * expected and spare >= 1.0:
        return None
    return (f"the {len(up)} unparked have {spare:.1f} requests of spare capacity for {expected:.1f} expected "
            f"(under {p.burst:g}x)")


@dataclass(frozen=True, slots=True)
class Swap:
    """`swap_advice`'s answer: wake `wake`, and once it serves, drain `relieve` (route nothing
    new to it) and park it when its last request is done."""

    wake: str
    relieve: str
    reason: str


def serve_cost_per_token(b: BackendInput, n: float) -> float:
    """What `b` costs per output token while awake serving `n` requests (at least one), idle
    power included: P(n) / R(n) x `cost_per_j`. When one backend takes over another's load the
    other is parked, so its idle power is saved too; a marginal cost above idle would leave that
    out and can rank two GPUs the wrong way round (an A100's climb from idle is cheaper than an
    H100's, its whole draw per token dearer)."""
    m = max(n, 1.0)
    rate = b.model.tokens_per_s(m)
    return b.model.power_w(m) / rate * b.cost_per_j if rate > 0 else float("inf")


def cheapest_to_wake(parked: Sequence[BackendInput], n: float = 1.0) -> str | None:
    """The parked backend that would serve `n` requests for the least (`serve_cost_per_token`);
    the first listed among equals; None if none is parked."""
    if not parked:
        return None
    return min(parked, key=lambda b: serve_cost_per_token(b, n)).name


def _cleaner(b: BackendInput, than: BackendInput, n: float, p: GovernorParams) -> float | None:
    """`b`'s cost per token at load `n` over `than`'s when `b` is on a cleaner grid per joule
    and at least `swap_margin` cheaper per token; else None. The grid is what changes over a
    day: two backends on one grid are left to the router, whose models' noise between equal GPUs
    is larger than any margin worth a wake-up."""
    if not b.cost_per_j < than.cost_per_j:
        return None
    ratio = serve_cost_per_token(b, n) / serve_cost_per_token(than, n)
    return ratio if ratio < 1.0 - p.swap_margin else None


def _dearest_loaded(up: Sequence[BackendInput]) -> tuple[BackendInput, float] | None:
    loaded = [(b, _expected_load(b)) for b in up if _expected_load(b) > 0]
    return max(loaded, key=lambda bn: serve_cost_per_token(*bn)) if loaded else None


def swap_advice(parked: Sequence[BackendInput], up: Sequence[BackendInput], p: GovernorParams) -> Swap | None:
    """Which parked backend to wake, and which awake one it relieves, when the parked one is on
    a cleaner grid (`cost_per_j`: grams per joule under the carbon objective) and would serve the
    awake fleet's dearest load for at least `swap_margin` less (`serve_cost_per_token`); None
    otherwise. A site whose grid got cleaner while its backends slept takes the load back.

    The relieved backend must be drained (nothing new routed to it): otherwise the router, which
    prices the next requests at the margin, keeps feeding the backend already busy (its climb
    from idle is paid) and the woken one idles until it is parked again."""
    dearest = _dearest_loaded(up)
    if not parked or dearest is None:
        return None
    dear, n = dearest
    options = [(r, b) for b in parked if (r := _cleaner(b, dear, n, p)) is not None]
    if not options:
        return None
    ratio, best = min(options, key=lambda rb: rb[0])
    return Swap(best.name, dear.name, f"costs {ratio:.0%} of {dear.name}'s per token at its load ({n:.1f} in flight)")


def _clocked(d: Decision, b: BackendInput, clock: float, now_s: float, p: GovernorParams) -> Decision:
    """`d`, or the fleet clock's cap where that is lower (`GovernorParams.slo_target`). The
    clock's cap keeps the hold between changes but not the step limit: the clock itself moves
    by at most 10% an interval."""
    cap_w = round(cap_for_clock_w(clock, b.model.idle_w / max(b.gpus, 1), b.min_w, b.max_w), 1)
    current = min(max(b.cap_w, b.min_w), b.max_w)
    if cap_w >= d.cap_w - p.deadband_w / 2:
        return d
    if abs(cap_w - current) < p.deadband_w:
        return replace(d, action=HOLD, cap_w=current, reason=f"at the fleet clock {clock:.2f} ({current:.0f} W)")
    since_s = now_s - b.last_change_s if b.last_change_s is not None else None
    if since_s is not None and since_s < p.hold_s and cap_w < current:
        return replace(d, action=HOLD, cap_w=current, reason=f"changed {since_s:.1f} s ago; fleet clock {clock:.2f}")
    action = LOWER if cap_w < current else RAISE
    return replace(d, action=action, cap_w=cap_w, reason=f"fleet clock {clock:.2f} for the attainment target "
                   f"({100 * (p.slo_target or 0):.0f}%): {cap_w:.0f} W; the model alone: {d.cap_w:.0f} W")


def decide(backends: Sequence[BackendInput], params: GovernorParams, now_s: float,
           clock: float = 1.0) -> list[Decision]:
    """A decision per backend, in the order given: its cap, and whether it could be parked.
    `clock`: the fleet's clock ratio under an attainment target (clock.py's `next_clock`)."""
    parks = park_advice(backends, params)
    out = []
    for b in backends:
        d = decide_cap(b, params, now_s)
        if params.slo_target is not None and clock < 1.0:
            d = _clocked(d, b, clock, now_s, params)
        if b.name in parks:
            d = replace(d, park=True, park_reason=parks[b.name])
        out.append(d)
    return out
