"""`joulegate simulate`: a discrete-event, virtual-time fleet of simulated GPUs behind a policy.

Each backend is the same `Engine` and GPU profile that `joulegate sim-backend` runs in real
time; here the clock is virtual, so a trace of thousands of requests runs in seconds. The
routing is the proxy's own `policies/` code, and the efficiency model is the same
`policies.model.EfficiencyModel`, fed only what a proxy measures: every `sample_interval_s`
(100 ms) of virtual time each backend's power (from its energy counter) with the mean number
of requests in flight and the output tokens in the interval; per request its TTFT (at its
first token) and TPOT (at its end), keyed by the requests in flight when it was sent.

Events at one instant run in this order: step ends (tokens appear), power samples, arrivals.
A request's TTFT is first token - arrival; its TPOT is (end - first token) / (tokens - 1).
Energy: every GPU of the fleet draws idle power whenever it has no step running, from 0 to
the end of the run (the last request's end). Conservation is checked on every run: the
engines' per-request ground truth plus their idle energy equals their counters; with
`attribute=True` the proxy's live `Attributor` also splits each backend's sampled counter
over its requests, and its books must balance the same way.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from policies.base import BackendView, Policy, RequestInfo
from policies.efficiency import Efficiency
from policies.least_loaded import LeastLoaded
from policies.model import EfficiencyModel, Ticket
from policies.round_robin import RoundRobin
from proxy.energy.attribution import ScheduledRequest, attribute_schedule
from proxy.sim.engine import Engine, Request, Step
from proxy.sim.fleet_file import FleetBackend, FleetError, load_fleet, parse_fleet
from proxy.sim.governed import VirtualGovernor
from proxy.sim.parking import DEFAULT_WAKE_S, FleetParking
from proxy.sim.profiles import GpuProfile
from proxy.sim.sites import CarbonBooks, Site
from proxy.sim.traces import TraceRequest

__all__ = ["FleetBackend", "FleetError", "SimResult", "BackendResult", "POLICY_NAMES", "DEFAULT_WAKE_S",
           "load_fleet", "parse_fleet", "simulate", "make_sim_policy", "fleet_capacity_rps",
           "backend_capacity_rps"]

POLICY_NAMES = ("round_robin", "least_loaded", "efficiency")
OBJECTIVES = ("joules", "carbon")


def make_sim_policy(name: str, models: Mapping[str, EfficiencyModel], slo_ttft_s: float,
                    slo_tpot_s: float, objective: str = "joules") -> Policy:
    """A fresh policy by its config name, the way the proxy builds it."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "efficiency":
        return Efficiency(models, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
                          objective=objective)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


# -- capacity ----------------------------------------------------------------------------------


def backend_capacity_rps(profile: GpuProfile, mean_prompt_tokens: float,
                         mean_output_tokens: float, slo_tpot_s: float) -> float:
    """Most requests/s one GPU sustains for this length mix with TPOT within the SLO.

    At decode batch b the GPU emits r = b / step(b) tokens/s while decoding, and each request
    also needs `prompt * prefill_s_per_token` s of prefill, so it completes
    x = r / (output + prefill_s * r) requests/s; prefill stalls stretch TPOT to
    step(b) / (1 - x * prefill_s). The best b up to max_batch that keeps TPOT within the SLO.
    """
    prefill_s = mean_prompt_tokens * profile.prefill_s_per_token
    best = 0.0
    for batch in range(1, profile.max_batch + 1):
        step_s = profile.step_time_s(batch)
        rate = batch / step_s
        x = rate / (mean_output_tokens + prefill_s * rate)
        busy_prefill = x * prefill_s
        if busy_prefill < 1 and step_s / (1 - busy_prefill) <= slo_tpot_s:
            best = max(best, x)
    return best


def fleet_capacity_rps(fleet: Sequence[FleetBackend], trace: Sequence[TraceRequest],
                       slo_tpot_s: float = 0.2) -> float:
    """Sum of the backends' `backend_capacity_rps` for the trace's mean prompt and output."""
    n = max(len(trace), 1)
    prompt = sum(r.prompt_tokens for r in trace) / n
    output = sum(r.output_tokens for r in trace) / n
    return sum(backend_capacity_rps(b.profile, prompt, output, slo_tpot_s) for b in fleet)


# -- results -----------------------------------------------------------------------------------


@dataclass(slots=True)
class BackendResult:
    """One backend over a run: busy share of the run, requests served, joules (idle included)."""

    name: str
    profile: str
    utilisation: float
    requests: int
    joules: float
    idle_joules: float
    output_tokens: int
    slo_met: int = 0  # of `requests`, those meeting both TTFT and TPOT
    gco2e: float | None = None  # grams CO2e, idle and PUE included (None: no site)


@dataclass(slots=True)
class SimResult:
    """One policy over one trace; energies in J, latencies in ms."""

    policy: str
    requests: int
    rejected: int
    output_tokens: int
    joules: float
    idle_joules: float
    slo_attainment: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p99_ms: float
    makespan_s: float
    offered_rps: float
    backends: dict[str, BackendResult] = field(default_factory=dict)
    # |sum of the engines' per-request joules - (counters - idle)|: energy conservation.
    conservation_error_j: float = 0.0
    attribution: dict[str, float] | None = None  # the live Attributor's books, if asked
    governor: dict[str, Any] | None = None  # `+governor`: per backend, time at each cap
    # Grams of CO2e over the same energy as `joules` (x PUE x the site's intensity then);
    # None when the fleet declares no sites.
    gco2e_total: float | None = None
    idle_gco2e: float | None = None
    objective: str = "joules"
    # With `record_requests`, per trace request: (backend or None if rejected, time sent to it
    # (after any wait for a wake-up), TTFT in s).
    request_log: list[tuple[str | None, float, float]] | None = None

    @property
    def gco2e_per_1k_output_tokens(self) -> float | None:
        if self.gco2e_total is None:
            return None
        return 1e3 * self.gco2e_total / self.output_tokens if self.output_tokens else 0.0

    @property
    def output_tokens_per_joule(self) -> float:
        return self.output_tokens / self.joules if self.joules > 0 else 0.0

    @property
    def joules_per_request(self) -> float:
        served = self.requests - self.rejected
        return self.joules / served if served > 0 else 0.0

    @property
    def idle_energy_share(self) -> float:
        return self.idle_joules / self.joules if self.joules > 0 else 0.0

    def contract_json(self) -> dict[str, Any]:
        """This policy's entry under `policies` in the contract's `--json` schema."""
        return {
            "output_tokens_per_joule": self.output_tokens_per_joule,
            "joules_per_request": self.joules_per_request,
            "idle_energy_share": self.idle_energy_share,
            "slo_attainment": self.slo_attainment,
            "ttft_p50_ms": self.ttft_p50_ms,
            "ttft_p99_ms": self.ttft_p99_ms,
            "tpot_p99_ms": self.tpot_p99_ms,
            "requests": self.requests,
            "backends": {b.name: {"utilisation": b.utilisation, "requests": b.requests,
                                  "joules": b.joules} for b in self.backends.values()},
            "gco2e_total": self.gco2e_total,
            "gco2e_per_1k_output_tokens": self.gco2e_per_1k_output_tokens,
        }

    def details_json(self) -> dict[str, Any]:
        """What the contract's schema does not hold (the `details` key of `--json`)."""
        out: dict[str, Any] = {
            "rejected": self.rejected, "output_tokens": self.output_tokens, "joules": self.joules,
            "idle_joules": self.idle_joules, "makespan_s": self.makespan_s,
            "offered_rps": self.offered_rps, "conservation_error_j": self.conservation_error_j,
            "backends": {b.name: {"profile": b.profile, "idle_joules": b.idle_joules,
                                  "output_tokens": b.output_tokens,
                                  "slo_attainment": b.slo_met / b.requests if b.requests else 1.0}
                         for b in self.backends.values()},
        }
        if self.attribution is not None:
            out["attribution"] = self.attribution
        if self.gco2e_total is not None:
            out["objective"], out["idle_gco2e"] = self.objective, self.idle_gco2e
            for b in self.backends.values():
                out["backends"][b.name]["gco2e"] = b.gco2e
        if self.governor is not None:
            out["governor"] = self.governor
        return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# -- the simulation ----------------------------------------------------------------------------


def simulate(fleet: Sequence[FleetBackend], trace: Sequence[TraceRequest], policy: str, *,
             slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.2, sample_interval_s: float = 0.1,
             attribute: bool = False,
             models: dict[str, EfficiencyModel] | None = None,
             objective: str = "joules", park: bool = True, wake_s: float = DEFAULT_WAKE_S,
             record_requests: bool = False, power_caps: bool = True, fast_raise: bool = False,
             slo_target: float | None = None) -> SimResult:
    """Replay `trace` (sorted by arrival) through `policy` over `fleet`; deterministic.

    `models`: the learned models to use and feed, by backend name (fresh ones by default;
    pass a dict to look at them afterwards or to start from what an earlier run learned).

    `attribute`: also run the proxy's Attributor over each backend's 100 ms counter samples
    and token arrivals, and report its books (slower: keeps every token's time).

    `objective`: what `efficiency` minimises, `joules` or `carbon` (joules x PUE x the
    site's intensity at the arrival; needs every backend to have a site).

    `park`: with `+governor`, park the backends it advises parking (proxy/sim/parking.py); a
    wake-up takes `wake_s`. `power_caps`: with `+governor`, set the power caps it decides (False:
    parking only, to tell what each saves); `fast_raise`: deeper caps, raised at once when a queue
    forms between two decisions (proxy/governor/fast.py; False, the default: burst headroom under a fixed cap);
    `slo_target`: the governor's attainment target (GovernorParams.slo_target; None: off). `record_requests`: fill `SimResult.request_log`.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    sites = [b.site for b in fleet]
    if objective == "carbon" and (not fleet or any(s is None for s in sites)):
        raise ValueError("objective carbon needs `sites:` in the fleet and a `site:` per backend")
    n_b, n_req = len(fleet), len(trace)
    names = [b.name for b in fleet]
    index = {name: i for i, name in enumerate(names)}
    caps = [b.max_concurrency for b in fleet]
    engines = [Engine(b.profile, start_s=0.0, max_finished=64) for b in fleet]
    if models is None:
        models = {}
    for fb in fleet:  # not `b`: below, b is a backend's index
        models.setdefault(fb.name, EfficiencyModel())
    model_list = [models[name] for name in names]
    base, _, extra = policy.partition("+")  # `efficiency+governor`: proxy/sim/governed.py
    chooser = make_sim_policy(base, models, slo_ttft_s, slo_tpot_s, objective)
    parking = FleetParking(engines, wake_s) if extra == "governor" and park else None
    cost_factor = (lambda b, t_s: sites[b].gco2e_per_j(t_s)) if objective == "carbon" else None  # type: ignore[union-attr]
    gov = (VirtualGovernor(names, engines, model_list, slo_ttft_s, slo_tpot_s, parking=parking,
                           cost_factor=cost_factor, caps=power_caps,
                           fast=fast_raise, slo_target=slo_target) if extra == "governor" else None)
    books = CarbonBooks(engines, sites) if fleet and all(sites) else None  # type: ignore[arg-type]
    last_arrival_s = trace[-1].arrival_s if trace else 0.0
    model_name = fleet[0].profile.model_name if fleet else ""

    in_flight = [0] * n_b
    busy_s = [0.0] * n_b
    served = [0] * n_b
    tokens_by_backend = [0] * n_b
    last_e_j = [0.0] * n_b
    steps: list[Step | None] = [None] * n_b
    heap: list[tuple[float, int]] = []
    tickets: list[Ticket] = [(0, 0, 0.0)] * n_req
    first_s = [math.nan] * n_req
    sent_s = [math.nan] * n_req
    end_s = [math.nan] * n_req
    truth_j = 0.0
    rejected = 0
    samples: list[list[tuple[float, float]]] = [[(0.0, 0.0)] for _ in fleet] if attribute else []
    arrivals: dict[int, list[tuple[float, int]]] = {}
    truth_by_req: dict[int, float] = {}
    idle_at_end_j = [0.0] * n_b
    owner = [-1] * n_req

    def route(i: int, t_s: float) -> None:
        """Send request `i` at `t_s` where the policy says; wait for a wake-up or refuse it if
        no awake backend has room."""
        nonlocal rejected
        req = trace[i]
        views = [BackendView(names[b], parking is None or parking.accepts(b), in_flight[b],
                             max_concurrency=caps[b], **_site_terms(sites[b], t_s)) for b in range(n_b)]
        info = RequestInfo(model_name, req.prompt_tokens)
        choice = chooser.choose(info, views, t_s)
        if choice is None and parking is not None and any(parking.draining):
            # A draining backend is awake: it takes what no other has room for (before a wait).
            views = [replace(v, healthy=parking.routable(b)) for b, v in enumerate(views)]
            choice = chooser.choose(info, views, t_s)
        if choice is None:
            if parking is None or not parking.wait(i, t_s):
                rejected += 1
            return
        b = index[choice]
        eng = engines[b]
        eng.add(Request(str(i), req.prompt_tokens, req.output_tokens), t_s)
        in_flight[b] += 1
        served[b] += 1
        owner[i] = b
        sent_s[i] = t_s
        tickets[i] = model_list[b].sent(t_s)
        if attribute:
            arrivals[i] = []
        if steps[b] is None:
            step = eng.plan_step(t_s)
            steps[b] = step
            if step is not None:
                heapq.heappush(heap, (step.end_s, b))

    tick_n, next_tick_s = 1, sample_interval_s
    ai = 0
    inf = math.inf
    t_s = 0.0
    while True:
        t_arr = trace[ai].arrival_s if ai < n_req else inf
        t_step = heap[0][0] if heap else inf
        t_wake = parking.next_s if parking is not None else inf
        if t_arr == inf and t_step == inf and t_wake == inf:
            break
        if t_wake <= t_step and t_wake <= next_tick_s and t_wake <= t_arr:
            assert parking is not None  # wake-ups end first at an instant: arrivals then see them
            t_s = t_wake
            for i in parking.finish_wakes(t_s):
                route(i, t_s)
        elif t_step <= next_tick_s and t_step <= t_arr:
            t_s, b = heapq.heappop(heap)
            step = steps[b]
            assert step is not None
            steps[b] = None
            eng = engines[b]
            events = eng.finish_step(step)
            busy_s[b] += step.end_s - step.start_s
            model = model_list[b]
            model.tokens(len(events))
            tokens_by_backend[b] += len(events)
            for rec in step.prefill:  # their first token is out now
                i = int(rec.request_id)
                first_s[i] = t_s
                model.first_token(t_s, tickets[i])
            if attribute:
                for e in events:
                    arrivals[int(e.request_id)].append((t_s, e.tokens))
            for e in events:
                if not e.finished:
                    continue
                i = int(e.request_id)
                end_s[i] = t_s
                done = eng.record(e.request_id)
                assert done is not None
                truth_j += done.joules
                if attribute:
                    truth_by_req[i] = done.joules
                in_flight[b] -= 1
                model.finished(t_s, tickets[i], first_s[i], trace[i].output_tokens)
            nxt = eng.plan_step(t_s)
            if nxt is not None:
                steps[b] = nxt
                heapq.heappush(heap, (nxt.end_s, b))
        elif next_tick_s <= t_arr:
            t_s = next_tick_s
            for b in range(n_b):
                e_j = engines[b].energy_j(t_s)
                power_w = (e_j - last_e_j[b]) / sample_interval_s
                last_e_j[b] = e_j
                if attribute:
                    samples[b].append((t_s, e_j))
                if parking is None or parking.routable(b):  # asleep: its model learns nothing
                    model_list[b].power_sample(t_s, power_w)
            if books is not None:
                books.advance(t_s, count_idle=t_s <= last_arrival_s)
            if gov is not None:
                gov.sample(t_s, in_flight, served, sample_interval_s)
            tick_n += 1
            next_tick_s = tick_n * sample_interval_s  # no drift over a long run
        else:
            t_s = t_arr
            ai += 1
            if ai == n_req:  # the last arrival: the offered span ends; idle so far counts
                idle_at_end_j = [eng.idle_energy_j(t_s) for eng in engines]
                if books is not None:
                    books.advance(t_s)
            route(ai - 1, t_s)

    end_run_s = max(t_s, trace[-1].arrival_s if trace else 0.0)
    if books is not None:
        books.advance(end_run_s, count_idle=False)
    if parking is not None:
        parking.close(end_run_s)
    result = _summarise(
        policy, fleet, trace, engines, end_run_s, busy_s, served, tokens_by_backend, first_s,
        end_s, owner, rejected, truth_j, idle_at_end_j, slo_ttft_s, slo_tpot_s,
        _attribution(fleet, trace, engines, samples, arrivals, owner, truth_by_req, end_s,
                     end_run_s)
        if attribute else None,
    )
    result.objective = objective
    if books is not None:
        result.gco2e_total, result.idle_gco2e = sum(books.grams), sum(books.idle_grams)
        for b, name in enumerate(names):
            result.backends[name].gco2e = books.grams[b]
    result.governor = gov.summary() if gov is not None else None
    if record_requests:
        result.request_log = [(names[owner[i]] if owner[i] >= 0 else None, sent_s[i], first_s[i] - r.arrival_s)
                              for i, r in enumerate(trace)]
    return result


def _site_terms(site: Site | None, t_s: float) -> dict[str, Any]:
    """BackendView's carbon fields for a backend at `site` at virtual time `t_s`."""
    if site is None:
        return {}
    return {"pue": site.pue, "gco2e_per_kwh": site.carbon.at(t_s)}


def _summarise(policy: str, fleet: Sequence[FleetBackend], trace: Sequence[TraceRequest],
               engines: list[Engine], end_run_s: float, busy_s: list[float], served: list[int],
               tokens_by_backend: list[int], first_s: list[float], end_s: list[float],
               owner: list[int], rejected: int, truth_j: float, idle_at_end_j: list[float], slo_ttft_s: float,
               slo_tpot_s: float,
               attribution: dict[str, float] | None) -> SimResult:
    ttfts: list[float] = []
    tpots: list[float] = []
    met = 0
    met_by_backend = [0] * len(fleet)
    tokens = 0
    for i, req in enumerate(trace):
        if math.isnan(end_s[i]):
            continue  # rejected
        ttft = first_s[i] - req.arrival_s
        tpot = (end_s[i] - first_s[i]) / (req.output_tokens - 1) if req.output_tokens > 1 else 0.0
        ttfts.append(ttft)
        tpots.append(tpot)
        tokens += req.output_tokens
        # A hair of slack: float rounding must not turn an exact 2.000 s into a miss.
        if ttft <= slo_ttft_s + 1e-9 and tpot <= slo_tpot_s + 1e-9:
            met += 1
            met_by_backend[owner[i]] += 1
    ttfts.sort()
    tpots.sort()
    backends: dict[str, BackendResult] = {}
    # The fleet's energy: every step of every request, plus idle power over the span the
    # workload is offered, [0, last arrival]. Idle time after it (GPUs waiting while a slow
    # one finishes the last requests) is left out: a service that keeps running fills it with
    # the next requests, and counting it would charge the whole fleet's idle power for the
    # longest tail, which says more about the trace's length than about the policy.
    duration_s = trace[-1].arrival_s if trace else 0.0
    total_j = idle_j = truth_total_j = 0.0
    for b, fb in enumerate(fleet):
        eng = engines[b]
        e_j, idle_end_j = eng.energy_j(end_run_s), eng.idle_energy_j(end_run_s)
        idle_window_j = idle_at_end_j[b]
        truth_total_j += e_j - idle_end_j
        joules = e_j - (idle_end_j - idle_window_j)
        total_j += joules
        idle_j += idle_window_j
        backends[fb.name] = BackendResult(
            fb.name, fb.profile.name, busy_s[b] / end_run_s if end_run_s > 0 else 0.0,
            served[b], joules, idle_window_j, tokens_by_backend[b], met_by_backend[b])
    return SimResult(
        policy=policy, requests=len(trace), rejected=rejected, output_tokens=tokens,
        joules=total_j, idle_joules=idle_j, slo_attainment=met / len(trace) if trace else 1.0,
        ttft_p50_ms=1e3 * _percentile(ttfts, 0.50), ttft_p99_ms=1e3 * _percentile(ttfts, 0.99),
        tpot_p99_ms=1e3 * _percentile(tpots, 0.99), makespan_s=end_run_s,
        offered_rps=len(trace) / duration_s if duration_s > 0 else 0.0, backends=backends,
        conservation_error_j=abs(truth_j - truth_total_j), attribution=attribution,
    )


def _attribution(fleet: Sequence[FleetBackend], trace: Sequence[TraceRequest],
                 engines: list[Engine], samples: list[list[tuple[float, float]]],
                 arrivals: dict[int, list[tuple[float, int]]], owner: list[int],
                 truth_by_req: dict[int, float], end_s: list[float],
                 end_run_s: float) -> dict[str, float]:
    """Run the live Attributor over each backend's samples: its books against the counters,
    and its per-request joules against the engines' ground truth."""
    attributed_j = idle_j = measured_j = abs_err_j = 0.0
    for b in range(len(fleet)):
        points = samples[b]
        if points[-1][0] < end_run_s:
            points.append((end_run_s, engines[b].energy_j(end_run_s)))
        reqs = [ScheduledRequest(str(i), trace[i].arrival_s, end_s[i], trace[i].prompt_tokens,
                                 trace[i].output_tokens, True, arrivals[i])
                for i in range(len(trace)) if owner[i] == b]
        joules, idle = attribute_schedule(points, reqs)
        attributed_j += sum(joules.values())
        idle_j += idle
        measured_j += points[-1][1] - points[0][1]
        abs_err_j += sum(abs(joules[r.request_id] - truth_by_req[int(r.request_id)]) for r in reqs)
    truth_j = sum(truth_by_req.values())
    return {"attributed_joules": attributed_j, "idle_joules": idle_j,
            "measured_joules": measured_j,
            "books_error_j": abs(attributed_j + idle_j - measured_j),
            # Share of the attributed joules that landed on the wrong request (vs truth).
            "misattributed_share": abs_err_j / (2 * truth_j) if truth_j > 0 else 0.0}


# -- `joulegate simulate` ----------------------------------------------------------------------
