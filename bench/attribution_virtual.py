"""Attribution accuracy in virtual time: the proxy's attributor (and split-weight learner) fed
by the simulator's engine directly, no processes, no sockets, no CPU-contention noise.

`bench/attribution/` measures the whole proxy in real time; on a loaded machine token
delivery lags and its per-request figures move by several points between runs. This bench
replays the same seeded workload (`bench.attribution.make_plan`: chat, 2-8k-token prompts,
embeddings, streams, dropped streams) on one simulated GPU in virtual time and feeds the pure
`Attributor` exactly what the relay would (opens, stream token arrivals, closes, one power
sample per interval), so two runs with the same seed print the same figures.

Run: ``python -m bench.attribution_virtual [--seed S] [--requests N] [--profile P]
[--spread-ms MS]`` (`--spread-ms`: each step's tokens reach the proxy up to MS apart, as from
a busy event loop; 0, the default, delivers them all at the step's end). Prints,
per configuration (open-loop arrivals or a busy closed loop, 100 ms or 1 s samples) and with
learning off and on: per class (chat, long, embedding) the total error, per-tenant totals
error (largest), per-request median and p90 |error|, and conservation.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from dataclasses import dataclass, replace

from bench.attribution import CLASSES, Planned, _quantile, make_plan
from proxy.energy.attribution import Attributor
from proxy.energy.attribution.restate import EARLY_WINDOWS, ColdStart
from proxy.energy.attribution.weights import TokenWeights
from proxy.energy.learn import SplitLearner
from proxy.energy.timeline import EnergyTimeline
from proxy.sim.engine import Engine, Request
from proxy.sim.profiles import get_profile

PREFILL_WEIGHT = 0.05  # the proxy's default energy.prefill_weight


@dataclass
class _Live:
    plan: Planned
    tokens: int = 0


def replay(plan: list[Planned], profile: str, interval_s: float, busy: bool, concurrency: int,
           learn: bool, verbose: bool = False, spread_s: float = 0.0, whole_upstream: bool = False,
           restate: bool = True) -> tuple[dict[str, tuple[float, float, str, str]], float]:
    """Per request id (proxy J, truth J, class, tenant), and conservation error in %;
    `verbose` prints the learned weights at the end. `spread_s`: each token and answer of a
    step reaches the proxy up to this long after the step ends (uniform, seeded), as an event
    loop reading many streams one after the other delivers them. `whole_upstream`: non-streamed
    answers are seen only when they end (backends[].stream_upstream off); else their tokens are
    seen as a stream's, as the proxy does where it streams them upstream."""
    rng = random.Random(len(plan) * 7919 + round(spread_s * 1e6))
    eng = Engine(get_profile(profile))
    at = Attributor(EnergyTimeline(max_age_s=math.inf), prefill_weight=PREFILL_WEIGHT,
                    max_pending_s=math.inf)
    learner = SplitLearner(PREFILL_WEIGHT) if learn else None
    # As the proxy does: the first minutes settled again once the weights are learned.
    cold: ColdStart | None = ColdStart() if learn and restate else None

    def make() -> Attributor:
        return Attributor(at.timeline, prefill_weight=PREFILL_WEIGHT, max_pending_s=math.inf)

    def early() -> TokenWeights | None:
        return learner.early_weights(EARLY_WINDOWS) if learner is not None else None

    def call(name: str, *args: object) -> object:
        if cold is not None:
            cold.record(name, *args)
        return getattr(at, name)(*args)
    pending = sorted(plan, key=lambda p: p.at_s)
    queue: list[tuple[float, int]] = [] if busy else [(p.at_s, p.index) for p in pending]
    heapq.heapify(queue)
    live: dict[str, _Live] = {}
    waiting = list(pending) if busy else []
    finals: dict[str, float] = {}
    now_s, next_sample_s, prev_s = 0.0, 0.0, None

    def timed_tokens(p: Planned) -> bool:
        return p.stream or (not whole_upstream and p.kind != "embedding")

    def rid(p: Planned) -> str:
        return f"r{p.index}"

    def send(p: Planned, t_s: float) -> None:
        req = Request(rid(p), p.prompt_tokens, p.max_tokens, is_embedding=p.kind == "embedding")
        eng.add(req, t_s)
        live[req.request_id] = _Live(p)
        embedding = p.kind == "embedding"
        timed = timed_tokens(p)
        call("open", req.request_id, t_s, timed, p.prompt_tokens, embedding)
        if learner is not None:
            learner.open(req.request_id, t_s, timed, p.prompt_tokens, embedding)

    def close(r: str, t_s: float, completion: int) -> None:
        p = live.pop(r).plan
        call("close", r, t_s, p.prompt_tokens, completion)
        if learner is not None:
            learner.close(r, t_s, p.prompt_tokens, completion)

    def samples_until(t_s: float) -> None:
        nonlocal next_sample_s, prev_s, at, cold
        while next_sample_s <= t_s:
            at.timeline.add_energy_sample(next_sample_s, eng.energy_j(next_sample_s))
            if learner is not None and prev_s is not None:
                learner.interval(prev_s, next_sample_s, at.timeline.joules_between(prev_s, next_sample_s))
                learner.weights.apply_to(at)
            prev_s = next_sample_s
            if cold is not None:
                cold.record("advance", next_sample_s, next_sample_s)
            got = at.advance(next_sample_s)
            if cold is not None and learner is not None:
                at, got, over = cold.settle(at, got, early, learner.weights.intervals, next_sample_s, make)
                if over:
                    cold = None
            finals.update((f.request_id, f.joules) for f in got)
            next_sample_s += interval_s

    while queue or waiting or live or eng.has_work:
        if busy:
            while waiting and len(live) < concurrency:
                send(waiting.pop(0), now_s)
        else:
            while queue and queue[0][0] <= now_s and len(live) < concurrency:
                send(plan[heapq.heappop(queue)[1]], now_s)
        step = eng.plan_step(now_s)
        if step is None:  # idle until the next arrival
            now_s = queue[0][0] if queue else now_s
            samples_until(now_s)
            if not queue and not live:
                break
            continue
        samples_until(step.end_s)
        seen = [(step.end_s + (rng.uniform(0.0, spread_s) if spread_s else 0.0), ev)
                for ev in eng.finish_step(step)]
        seen.sort(key=lambda x: x[0])
        for seen_s, ev in seen:
            r = ev.request_id
            if r not in live:
                continue
            lv = live[r]
            if timed_tokens(lv.plan) and ev.tokens:
                lv.tokens += ev.tokens
                call("tokens", r, seen_s, ev.tokens)
                if learner is not None:
                    learner.tokens(r, seen_s, ev.tokens)
                if lv.plan.stream and lv.plan.abort_after and lv.tokens >= lv.plan.abort_after and not ev.finished:
                    eng.abort(r, step.end_s)  # the client drops the stream
                    close(r, seen_s, lv.tokens)
                    continue
            if ev.finished:
                rec = eng.record(r)
                assert rec is not None
                close(r, seen_s, rec.completion_tokens)
        now_s = step.end_s
    samples_until(now_s + 2 * interval_s + 1.0)
    if cold is not None and learner is not None:  # the run ends inside the hold
        at, got, _ = cold.settle(at, [], early, learner.weights.intervals, now_s, make, ending=True)
        finals.update((f.request_id, f.joules) for f in got)
    out = {}
    for p in plan:
        rec = eng.record(rid(p))
        if rec is not None and rec.joules > 0 and rid(p) in finals:
            out[rid(p)] = (finals[rid(p)], rec.joules, p.cls, p.tenant)
    billed = at.finalized_joules_attributed + at.finalized_joules_idle + at.carried_joules
    cons = 100.0 * (billed - at.finalized_joules_measured) / at.finalized_joules_measured
    if learner is not None and verbose:
        print("   ", learner.weights)
    return out, cons


def figures(rows: list[tuple[float, float, str, str]]) -> tuple[float, float | None, float | None, float | None]:
    """(total error %, largest per-tenant totals |error| %, median, p90 per-request |error| %)."""
    total = 100.0 * (math.fsum(r[0] for r in rows) / math.fsum(r[1] for r in rows) - 1.0)
    tenants = {}
    for tenant in {r[3] for r in rows}:
        mine = [r for r in rows if r[3] == tenant]
        tenants[tenant] = abs(100.0 * (math.fsum(r[0] for r in mine) / math.fsum(r[1] for r in mine) - 1.0))
    errs = [abs(100.0 * (r[0] - r[1]) / r[1]) for r in rows]
    return total, max(tenants.values()), _quantile(errs, 0.5), _quantile(errs, 0.9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attribution_virtual", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--profile", default="h100-llama3.1-8b")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--verbose", action="store_true", help="print the learned split weights")
    ap.add_argument("--spread-ms", type=float, default=0.0, metavar="MS",
                    help="tokens and answers reach the proxy up to MS after their step (uniform)")
    ap.add_argument("--whole-upstream", action="store_true",
                    help="non-streamed answers asked whole upstream (backends[].stream_upstream: false)")
    ap.add_argument("--no-restate", action="store_true",
                    help="keep the first minutes as settled with the prior weights")
    ap.add_argument("--warmup", type=int, default=0, metavar="N",
                    help="first replay N requests of another seed, not compared")
    args = ap.parse_args(argv)
    plan = make_plan(args.requests, args.seed)
    if args.warmup:
        # Warm-up requests of another seed first (not compared): the learner starts from weights
        # learned on other traffic, as in a proxy that has been up a while.
        warm = make_plan(args.warmup, args.seed + 1000)
        gap_s = warm[-1].at_s + 3.0
        plan = warm + [replace(p, index=p.index + len(warm), at_s=p.at_s + gap_s) for p in plan]
    warm = f" after {args.warmup} warm-up requests" if args.warmup else ""
    spread = f", tokens read up to {args.spread_ms:g} ms after their step" if args.spread_ms else ""
    spread += ", non-streamed answers asked whole upstream" if args.whole_upstream else ""
    print(f"{args.requests} requests (seed {args.seed}){warm} on one {args.profile}, virtual time{spread}; "
          f"figures per class: total err%, tenant max%, req median%, req p90%")
    print(f"{'config':<14} {'learn':<5} {'cons%':>8}  " + "  ".join(f"{c:^27}" for c in ("all", *CLASSES)))
    for busy in (False, True):
        for interval_s in (0.1, 1.0):
            name = f"{'busy' if busy else 'open'}@{'100ms' if interval_s < 1 else '1s'}"
            for learn in (False, True):
                rows, cons = replay(plan, args.profile, interval_s, busy, args.concurrency, learn,
                                    args.verbose, args.spread_ms / 1e3, args.whole_upstream,
                                    not args.no_restate)
                cells = []
                for cls in ("all", *CLASSES):
                    mine = [r for rid, r in rows.items() if cls in ("all", r[2])
                            and int(rid[1:]) >= args.warmup]
                    if not mine:
                        cells.append(f"{'-':^27}")
                        continue
                    tot, ten, med, p90 = figures(mine)
                    cells.append(f"{tot:+6.1f} {ten:5.1f} {med or 0:5.1f} {p90 or 0:6.1f} n={len(mine):<3}")
                print(f"{name:<14} {'on' if learn else 'off':<5} {cons:+8.4f}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
