"""Many replicas, one backend: each bills only its share (proxy/energy/shares.py).

Unit: attributors with other replicas' weights (foreign density), the peers' merge, and the
property that N replicas exchanging their weights bill exactly what one proxy holding every
request would. Against a real Redis: two exchanges in one process; Redis unreachable -> engine
metrics. End to end: three `joulegate serve` processes, one Redis, two simulated GPUs.
Redis: $REDIS_URL, else 127.0.0.1:6379, else a redis-server started here; under CI=true a
missing Redis fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import BackendConfig, Config, ConfigError, PowerConfig, parse_config
from proxy.energy.attribution import Attributor, Final, ScheduledRequest
from proxy.energy.meter import BackendMeter, EnergyMeter
from proxy.energy.shares import (
    PeerWeights,
    WeightExchange,
    decode_chunks,
    encode_chunks,
    make_exchange,
)
from proxy.energy.timeline import EnergyTimeline
from tests.conftest import (
    ADMIN_KEY,
    MODEL,
    ProxyProc,
    SimBackend,
    free_port,
    sha256,
    wait_until,
)
from tests.redis_support import RedisServer, need_redis_server, usable_redis
from tests.test_attribution import assert_books_balance, schedules, streamed

REL = 1e-9


def books_balance(attributor: Attributor) -> None:
    """attributed + idle + carried + foreign == measured."""
    measured_j = attributor.finalized_joules_measured
    books_j = (attributor.finalized_joules_attributed + attributor.finalized_joules_idle
               + attributor.carried_joules + attributor.finalized_joules_foreign)
    assert books_j == pytest.approx(measured_j, rel=REL, abs=1e-6)


# -- the attributor with other replicas' weights ------------------------------------------------


def test_foreign_weight_takes_its_share_and_is_not_billed_here() -> None:
    attributor = Attributor(prefill_weight=0.0)
    attributor.foreign_until_s = -math.inf
    tl = attributor.timeline
    tl.add_energy_sample(0.0, 0.0)
    attributor.open("a", 0.0, stream=True)
    attributor.tokens("a", 0.0, 0)
    for i in range(1, 21):
        attributor.tokens("a", i / 10, 1)  # 10 tokens/s
    attributor.close("a", 2.0, 0, 20)
    for t_s in (1.0, 2.0, 3.0):
        tl.add_energy_sample(t_s, 100.0 * t_s)
    assert attributor.advance(3.0) == []  # waits for the others' weights
    assert attributor.weighed_until_s == 3.0 and attributor.finalized_until_s == 0.0
    # Others: 30 weight/s over 0-1 s, nothing 1-2 s, 5 requests weighing nothing 2-3 s.
    attributor.set_foreign(0.0, 30.0, 3)
    attributor.set_foreign(1.0, 0.0, 0)
    attributor.set_foreign(2.0, 0.0, 5)
    attributor.foreign_until_s = 3.0
    (final,) = attributor.advance(3.0)
    assert final.joules == pytest.approx(25.0 + 100.0, rel=REL)
    # Nothing in flight here 2-3 s, but elsewhere: the others' energy, not idle.
    assert attributor.finalized_joules_foreign == pytest.approx(75.0 + 100.0, rel=REL)
    assert attributor.finalized_joules_idle == 0.0
    books_balance(attributor)


def test_weightless_requests_split_by_count_with_the_others() -> None:
    attributor = Attributor(prefill_weight=0.0)
    attributor.foreign_until_s = -math.inf
    attributor.timeline.add_energy_sample(0.0, 0.0)
    attributor.open("a", 0.0, stream=True)
    attributor.close("a", 1.0, 0, 0)
    attributor.set_foreign(0.0, 0.0, 3)
    attributor.foreign_until_s = 1.0
    attributor.timeline.add_energy_sample(1.0, 100.0)
    (final,) = attributor.advance(1.0)
    assert final.joules == pytest.approx(25.0, rel=REL)
    assert attributor.finalized_joules_foreign == pytest.approx(75.0, rel=REL)


def test_intervals_wait_for_the_others_at_most_max_wait() -> None:
    attributor = Attributor(foreign_max_wait_s=2.0)
    attributor.foreign_until_s = 0.5
    attributor.set_foreign(0.0, 10.0, 1)  # the last word from the others
    tl = attributor.timeline
    tl.add_energy_sample(0.0, 0.0)
    attributor.open("a", 0.0, stream=True, prompt_tokens=0)
    attributor.tokens("a", 0.0, 0)
    for i in range(1, 11):
        attributor.tokens("a", i / 10, 1)
    attributor.close("a", 1.0, 0, 10)
    tl.add_energy_sample(1.0, 100.0)
    assert attributor.advance(2.5) == []  # 1.5 s past the end: still waiting
    (final,) = attributor.advance(3.0)  # 2 s: settled with the last known value
    assert final.joules == pytest.approx(50.0, rel=REL)
    assert final.method == "measured"
    books_balance(attributor)


def test_without_foreign_data_nothing_changes() -> None:
    """No exchange (foreign_until_s infinite): the same numbers as before, bit for bit."""
    joules = {}
    for with_foreign in (False, True):
        attributor = Attributor(prefill_weight=0.1)
        if with_foreign:
            attributor.set_foreign(-1.0, 0.0, 0)  # zero weight elsewhere, known for ever
        tl = attributor.timeline
        for i in range(21):
            t_s = i / 10
            attributor.open(f"r{i}", t_s, stream=i % 2 == 0, prompt_tokens=50)
            attributor.tokens(f"r{i}", t_s + 0.03, 3)
            attributor.close(f"r{i}", t_s + 0.25, 50, 3)
            tl.add_energy_sample(t_s, 100.0 * t_s + 7.0 * math.sin(i))
            attributor.advance(t_s)
        tl.add_energy_sample(3.0, 400.0)
        joules[with_foreign] = {f.request_id: f.joules for f in attributor.advance(3.0)}
        assert_books_balance(attributor)
    assert joules[True] == joules[False]


# -- N replicas exchanging weights == one proxy holding every request ----------------------------


class Replicas:
    """Attributors for `n` replicas, each with its own timeline, exchanging weights like the
    live exchange does (take_local -> PeerWeights -> set_foreign), in time order."""

    def __init__(self, n: int, **opts: Any) -> None:
        self.atts = [Attributor(EnergyTimeline(max_age_s=math.inf), max_pending_s=math.inf,
                                foreign_max_wait_s=math.inf, **opts) for _ in range(n)]
        for a in self.atts:
            a.publish_local = True
            a.foreign_until_s = -math.inf
        self.peers = [PeerWeights(-math.inf) for _ in range(n)]
        self.finals: dict[str, Final] = {}

    def exchange(self, now_s: float) -> None:
        for i, a in enumerate(self.atts):
            chunk = a.take_local()
            if chunk is None:
                continue
            # Through the wire format, as Redis carries it.
            wire = decode_chunks(encode_chunks([chunk]))
            for j, peers in enumerate(self.peers):
                if j != i:
                    peers.add(f"r{i}", wire, seen_ms=0)
        for a, peers in zip(self.atts, self.peers, strict=True):
            steps, until_s = peers.merge(now_s, 0, 10**12)
            for step in steps:
                a.set_foreign(*step)
            a.foreign_until_s = until_s
            self.finals.update((f.request_id, f) for f in a.advance(now_s))


def replay(samples: list[tuple[float, float]] | list[list[tuple[float, float]]],
           requests: list[ScheduledRequest], owners: list[int], replicas: Replicas,
           kind: str, rnd: Any = None) -> None:
    """Live calls in time order; requests[k] goes to replica owners[k]. `samples`: the power
    samples every replica reads, or one list per replica (each its own sampling phase).
    With `rnd`, a heartbeat follows a sample only now and then (the exchange lags)."""
    n = len(replicas.atts)
    per_replica = samples if samples and isinstance(samples[0], list) else [samples] * n
    events: list[tuple[float, int, Any, int]] = []
    for r, owner in zip(requests, owners, strict=True):
        events.append((r.start_s, 0, r, owner))
        events.extend((t_s, 1, (r.request_id, count), owner) for t_s, count in r.token_arrivals)
        events.append((r.end_s, 2, r, owner))
    for i, mine in enumerate(per_replica):
        events.extend((t_s, 3, (t_s, value), i) for t_s, value in mine)
    events.sort(key=lambda e: (e[0], e[1]))
    for t_s, order, item, i in events:
        a = replicas.atts[i]
        if order == 0:
            a.open(item.request_id, t_s, item.stream,
                   item.prompt_tokens if item.request_id[-1] in "02468" else 0)
        elif order == 1:
            a.tokens(item[0], t_s, item[1])
        elif order == 2:
            a.close(item.request_id, t_s, item.prompt_tokens, item.completion_tokens)
        else:
            add = a.timeline.add_energy_sample if kind == "energy_j" else a.timeline.add_power_sample
            add(*item)
            replicas.finals.update((f.request_id, f) for f in a.advance(t_s))
            if rnd is None or rnd.random() < 0.3:
                replicas.exchange(t_s)
    replicas.exchange(math.inf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.integers(2, 3), st.randoms(use_true_random=False))
def test_replicas_exchanging_weights_bill_what_one_proxy_would(case: tuple, n: int,
                                                               rnd: Any) -> None:
    samples, requests, idle, prefill_weight, kind = case
    owners = [rnd.randrange(n) for _ in requests]
    one = Replicas(1, prefill_weight=prefill_weight, idle=idle)
    many = Replicas(n, prefill_weight=prefill_weight, idle=idle)
    # Each replica's step clock sees only its own streams: the same split needs flat placement.
    for a in (*one.atts, *many.atts):
        a.place_by_steps = False
    replay(samples, requests, [0] * len(requests), one, kind)
    replay(samples, requests, owners, many, kind, rnd)
    assert set(many.finals) == set(one.finals) == {r.request_id for r in requests}
    scale_j = abs(one.atts[0].finalized_joules_measured) + 1.0
    for request_id, final in one.finals.items():
        assert many.finals[request_id].joules == pytest.approx(
            final.joules, rel=1e-6, abs=1e-9 * scale_j)
    for a in many.atts:
        books_balance(a)
        assert a.finalized_until_s == one.atts[0].finalized_until_s
        # What the others took here is what they billed.
    billed = [a.finalized_joules_attributed for a in many.atts]
    for i, a in enumerate(many.atts):
        assert a.finalized_joules_foreign == pytest.approx(
            math.fsum(billed) - billed[i], rel=1e-6, abs=1e-9 * scale_j)
    assert math.fsum(billed) == pytest.approx(one.atts[0].finalized_joules_attributed,
                                              rel=1e-6, abs=1e-9 * scale_j)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.lists(st.tuples(st.floats(-1.0, 34.0), st.floats(0.0, 1e4),
                                       st.integers(0, 5)), max_size=20),
       st.sampled_from([0.0, 1.0, math.inf]))
def test_random_foreign_weights_keep_the_books_balanced(case: tuple, foreign: list,
                                                        max_wait_s: float) -> None:
    samples, requests, idle, prefill_weight, kind = case
    attributor = Attributor(prefill_weight=prefill_weight, idle=idle, max_pending_s=900.0,
                            foreign_max_wait_s=max_wait_s)
    attributor.foreign_until_s = -math.inf
    add = (attributor.timeline.add_energy_sample if kind == "energy_j"
           else attributor.timeline.add_power_sample)
    events: list[tuple[float, int, Any]] = []
    for r in requests:
        events.append((r.start_s, 0, r))
        events.extend((t_s, 1, (r.request_id, count)) for t_s, count in r.token_arrivals)
        events.append((r.end_s, 2, r))
    events.extend((t_s, 3, value) for t_s, value in samples)
    events.extend((t_s, 4, (density, count)) for t_s, density, count in foreign)
    events.sort(key=lambda e: (e[0], e[1]))
    finals: dict[str, Final] = {}
    for t_s, order, payload in events:
        if order == 0:
            attributor.open(payload.request_id, t_s, payload.stream, payload.prompt_tokens)
        elif order == 1:
            attributor.tokens(payload[0], t_s, payload[1])
        elif order == 2:
            attributor.close(payload.request_id, t_s, payload.prompt_tokens,
                             payload.completion_tokens)
        elif order == 3:
            add(t_s, payload)
        else:
            attributor.set_foreign(t_s, *payload)
            attributor.foreign_until_s = t_s
        finals.update((f.request_id, f) for f in attributor.advance(t_s))
        books_balance(attributor)
        assert all(f.joules >= -1e-9 for f in finals.values())
    attributor.foreign_until_s = math.inf
    finals.update((f.request_id, f) for f in attributor.advance())
    books_balance(attributor)
    assert set(finals) == {r.request_id for r in requests}
    assert attributor.finalized_until_s == attributor.timeline.last_sample_s


def test_two_replicas_with_symmetric_work_get_half_each_on_their_own_sampling() -> None:
    """Same work on two replicas, each reading the counter at its own phase: half each, and
    together what one proxy would bill."""

    def counter_j(t_s: float) -> float:  # 300 W +- 100 W, integrated
        return 300.0 * t_s - 100.0 / 3.0 * (math.cos(3.0 * t_s) - 1.0)

    grids = [[(k * 0.05 + phase_s, counter_j(k * 0.05 + phase_s)) for k in range(121)]
             for phase_s in (0.0, 0.021)]
    requests, owners = [], []
    for j in range(20):
        for owner in (0, 1):
            start_s = 0.2 * j + 0.05
            requests.append(streamed(f"{j}-{owner}", start_s, start_s + 0.1, start_s + 1.6, 40,
                                     prompt=300 + 11 * j))
            owners.append(owner)
    many = Replicas(2, prefill_weight=0.1)
    replay(grids, requests, owners, many, "energy_j")
    a, b = many.atts
    books_balance(a)
    books_balance(b)
    mine = [math.fsum(f.joules for f in many.finals.values() if f.request_id.endswith(f"-{k}"))
            for k in (0, 1)]
    # Each replica sees the token arrivals through its own sample intervals, and places decode
    # tokens where its own streams show steps (a step cut by a sample counts in part): ~2 %
    # apart here, where every arrival falls exactly on one replica's samples.
    assert mine[0] == pytest.approx(mine[1], rel=0.03)
    assert a.finalized_joules_foreign == pytest.approx(mine[1], rel=0.03)
    # Together they bill the busy energy once (not twice), whatever their sampling phases.
    one = Replicas(1, prefill_weight=0.1)
    replay(grids[0], requests, [0] * len(requests), one, "energy_j")
    assert math.fsum(mine) == pytest.approx(one.atts[0].finalized_joules_attributed, rel=1e-3)


# -- the peers' merge ----------------------------------------------------------------------------


def test_peer_weights_merge_and_watermark() -> None:
    pw = PeerWeights(0.0)
    pw.add("a", [(0.0, 1.0, [(0.0, 10.0, 1), (0.5, 20.0, 2)])], seen_ms=1000)
    pw.add("b", [(0.0, 0.6, [(0.0, 5.0, 1)])], seen_ms=1000)
    steps, until_s = pw.merge(2.0, 1100, 1000)
    assert until_s == 0.6  # b has published up to 0.6 s only
    assert steps == [(0.0, 15.0, 2), (0.5, 25.0, 3)]
    pw.add("b", [(0.6, 1.2, [(0.6, 0.0, 0)])], seen_ms=1200)
    steps, until_s = pw.merge(2.0, 1200, 1000)
    assert (steps, until_s) == ([(0.6, 20.0, 2)], 1.0)
    # a goes silent: after the timeout it is dead, weighs 0 after 1.0 s, holds nothing back.
    pw.add("b", [(1.2, 1.8, [])], seen_ms=2500)
    steps, until_s = pw.merge(2.0, 2500, 1000)
    assert (steps, until_s) == ([(1.0, 0.0, 0)], 1.8)
    assert set(pw.peers) == {"b"} and pw.live_peers() == 1
    # b says goodbye: nobody left; the watermark follows the clock.
    pw.add("b", [(1.8, 1.9, [])], seen_ms=2600, leaving=True)
    steps, until_s = pw.merge(2.5, 2600, 1000)
    assert (steps, until_s) == ([], 2.5)
    assert pw.peers == {}


def test_a_revived_peer_and_a_skip() -> None:
    pw = PeerWeights(0.0)
    pw.add("a", [(0.0, 1.0, [(0.0, 10.0, 1)])], seen_ms=0)
    assert pw.merge(5.0, 5000, 1000) == ([(0.0, 10.0, 1), (1.0, 0.0, 0)], 5.0)
    pw.skip_to(6.0)  # e.g. a Redis outage stood in
    pw.add("a", [(6.5, 7.0, [(6.5, 4.0, 1)])], seen_ms=7000)
    assert pw.merge(8.0, 7000, 1000) == ([(6.0, 0.0, 0), (6.5, 4.0, 1)], 7.0)


# -- the exchange against a real Redis -----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with usable_redis(tmp_path_factory) as url:
        yield url


def _meter(name: str, finals: list[Final]) -> BackendMeter:
    config = Config(backends=[BackendConfig(name=name, url="http://127.0.0.1:9/v1")])
    return BackendMeter(name, PowerConfig(source="none"), config,
                        lambda _backend, final: finals.append(final))


def test_two_exchanges_through_redis_split_the_backend(redis_url: str) -> None:
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    prefix = f"jg-test-{uuid.uuid4().hex[:8]}:"

    async def scenario() -> tuple[list[list[Final]], list[BackendMeter], dict]:
        finals: list[list[Final]] = [[], []]
        meters = [_meter(name, finals[i]) for i in range(2)]
        exchanges = [WeightExchange({name: m}, redis_url=redis_url, key_prefix=prefix,
                                    heartbeat_s=0.05, replica_id=f"replica-{i}")
                     for i, m in enumerate(meters)]
        for x in exchanges:
            await x.start()
        t0 = time.time()
        for m in meters:
            m.timeline.add_energy_sample(t0, 0.0)
        # Both replicas stream the same work; 200 W constant, a sample every 50 ms.
        for k, m in enumerate(meters):
            m.attributor.open(f"r{k}", t0 + 0.01, stream=True, prompt_tokens=100)
        for step in range(1, 31):
            await asyncio.sleep(0.05)
            now_s = time.time()
            for k, m in enumerate(meters):
                if step <= 20:
                    m.attributor.tokens(f"r{k}", now_s, 1)
                if step == 20:
                    m.attributor.close(f"r{k}", now_s, 100, 20)
                m.timeline.add_energy_sample(now_s, 200.0 * (now_s - t0))
                m.settle(now_s)
        await asyncio.sleep(0.3)
        state = exchanges[0].state()
        await exchanges[1].close()  # says goodbye: replica 0 stops waiting for it at once
        await asyncio.sleep(0.3)
        state_after = exchanges[0].state()
        await exchanges[0].close()
        return finals, meters, {"before": state, "after": state_after}

    try:
        finals, meters, states = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        client = redis.Redis.from_url(redis_url)
        client.delete(f"{prefix}w:{name}")
        client.close()
    assert [len(f) for f in finals] == [1, 1]
    a, b = (m.attributor for m in meters)
    for att in (a, b):
        books_balance(att)
    # The request ran about 1 s at 200 W: each replica bills about half of it, never all.
    (fa,), (fb,) = finals
    total_j = fa.joules + fb.joules
    busy_j = 200.0 * (fa.end_s - fa.start_s)
    assert total_j == pytest.approx(busy_j, rel=0.05)
    assert fa.joules == pytest.approx(fb.joules, rel=0.1)
    assert a.finalized_joules_foreign == pytest.approx(fb.joules, rel=0.1)
    backend = states["before"]["backends"][name]
    assert backend["foreign_source"] == "redis" and backend["replicas"] == 2
    assert states["before"]["redis"] is True
    assert states["after"]["backends"][name]["replicas"] == 1


async def _engine_page(running: int, waiting: int) -> tuple[web.AppRunner, str]:
    page = (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running {running}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {waiting}\n")

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text=page)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/metrics"


def test_redis_unreachable_falls_back_to_engine_metrics(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[dict, int, float, float]:
        runner, metrics_url = await _engine_page(running=3, waiting=0)
        meter = _meter("gpu", [])
        exchange = WeightExchange(
            {"gpu": meter}, redis_url=f"redis://127.0.0.1:{free_port()}/0", heartbeat_s=0.05,
            metrics_urls={"gpu": metrics_url}, in_flight=lambda _name: 1)
        await exchange.start()
        try:
            await asyncio.sleep(0.4)
            state = exchange.state()
            att = meter.attributor
            return state, att.foreign_count, att.foreign_density, time.time() - att.foreign_until_s
        finally:
            await exchange.close()
            await runner.cleanup()

    state, count, density, lag_s = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert state["redis"] is False
    assert state["backends"]["gpu"]["foreign_source"] == "engine_metrics"
    assert count == 2  # 3 running, 1 of them ours
    assert density == pytest.approx(2 * 10.0)  # the default decode rate before any was seen
    assert lag_s < 0.5  # no waiting for peers that cannot be heard
    assert sum("Redis unreachable" in r.message for r in caplog.records) == 1


def test_a_redis_restart_falls_back_and_recovers(tmp_path: Path) -> None:
    """Redis dies mid-run: both replicas keep settling (the others counting for nothing, no
    engine metrics here); Redis comes back on the same port: they find each other again."""
    need_redis_server("no redis-server to stop and start")
    server = RedisServer(tmp_path)
    server.start()

    async def scenario() -> list[tuple[str, Any, Any, float]]:
        meters = [_meter("gpu", []) for _ in range(2)]
        exchanges = [WeightExchange({"gpu": m}, redis_url=server.url, heartbeat_s=0.05)
                     for m in meters]
        for x in exchanges:
            await x.start()
        seen: list[tuple[str, Any, Any, float]] = []
        t0 = time.time()

        async def run_for(seconds: float, label: str) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.sleep(0.05)
                now_s = time.time()
                for m in meters:
                    m.timeline.add_energy_sample(now_s, 100.0 * (now_s - t0))
                    m.settle(now_s)
            state = exchanges[0].state()
            backend = state["backends"]["gpu"]
            lag_s = time.time() - meters[0].attributor.finalized_until_s
            seen.append((label, state["redis"], (backend["foreign_source"], backend["replicas"]),
                         lag_s))

        try:
            await run_for(0.6, "up")
            server.kill()
            await run_for(0.8, "down")
            server.start()
            await run_for(3.5, "back")  # retries back off up to 2 s apart
        finally:
            for x in exchanges:
                await x.close()
        return seen

    try:
        seen = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        server.kill()
    (_, up_redis, up, _), (_, down_redis, down, down_lag_s), (_, back_redis, back, back_lag_s) = seen
    assert (up_redis, up) == (True, ("redis", 2))
    assert (down_redis, down[0]) == (False, "none")
    assert down_lag_s < 1.0  # settling goes on without Redis
    assert (back_redis, back) == (True, ("redis", 2))
    assert back_lag_s < 1.0


def test_make_exchange_follows_the_config(redis_url: str) -> None:
    base = "backends:\n  - {name: a, url: 'http://127.0.0.1:9/v1', power: {source: sim, url: 'http://127.0.0.1:9'}}\n"

    def exchange_for(extra: str) -> WeightExchange | None:
        config = parse_config(base + extra)
        return make_exchange(config, EnergyMeter(config, lambda *_: None))

    assert exchange_for("ledger: memory://\n") is None  # a lone proxy: as before
    x = exchange_for("ledger: redis://127.0.0.1:6379/3\n")
    assert x is not None and x.redis_url == "redis://127.0.0.1:6379/3"
    x = exchange_for("cluster: {redis_url: 'redis://r:6379/1', heartbeat_s: 0.2}\n")
    assert x is not None and (x.redis_url, x.heartbeat_s) == ("redis://r:6379/1", 0.2)
    assert exchange_for("ledger: redis://r:6379/0\ncluster: {enabled: false}\n") is None
    with pytest.raises(ConfigError, match="line 4: cluster.redis_url: .*redis://"):
        parse_config(base + "cluster:\n  redis_url: http://r:6379\n")
    with_metrics = base.replace("power:", "metrics_url: 'http://127.0.0.1:9/metrics', power:")
    config = parse_config(with_metrics + "ledger: memory://\n")
    x = make_exchange(config, EnergyMeter(config, lambda *_: None))
    assert x is not None and x.redis_url is None  # engine metrics only


# -- end to end: three replicas, one Redis, two simulated GPUs -----------------------------------


def _cleanup_redis(url: str, backends: list[str], tenants: list[str], request_ids: list[str]
                   ) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = [f"joulegate:w:{b}" for b in backends] + [f"joulegate:tj:{t}" for t in tenants]
        keys += [f"joulegate:req:{rid}" for rid in request_ids]
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
        for hour in client.zrange("joulegate:hours", 0, -1):
            agg = b"joulegate:agg:" + hour
            fields = [f for f in client.hkeys(agg) if any(t.encode() in f for t in tenants)]
            if fields:
                client.hdel(agg, *fields)
            if not client.exists(agg):
                client.zrem("joulegate:hours", hour)
    finally:
        client.close()


def test_three_replicas_bill_the_fleet_once(redis_url: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    tenants = {f"acme-{run}": f"sk-acme-{run}", f"globex-{run}": f"sk-globex-{run}"}
    sims = {f"h100-{run}": SimBackend("h100-llama3.1-8b", tmp_path, seed=1),
            f"l4-{run}": SimBackend("l4-llama3.1-8b", tmp_path, seed=2)}
    proxies: list[ProxyProc] = []
    served: list[tuple[str, int, str, str]] = []  # (request id, proxy, backend, tenant)
    try:
        config = "backends:\n"
        for name, sim in sims.items():
            config += (f"  - {{name: {name}, url: '{sim.url}/v1', models: [{MODEL}], "
                       f"power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}}}\n")
        config += "routing: {policy: round_robin}\n"
        config += f"ledger: {redis_url}\ncluster: {{heartbeat_s: 0.1}}\ntenants:\n"
        for tenant, key in tenants.items():
            config += f"  - {{name: {tenant}, api_keys_sha256: ['{sha256(key)}']}}\n"
        config += f"admin_api_keys_sha256: ['{sha256(ADMIN_KEY)}']\n"
        proxies = [ProxyProc(config, tmp_path) for _ in range(3)]
        wait_until(lambda: all(_replicas_seen(p) == 3 for p in proxies), 15,
                   "every replica to see the other two")

        started = time.monotonic()
        served = asyncio.run(_workload(proxies, list(tenants.items()), n=90))
        load_s = time.monotonic() - started

        billed: dict[str, float] = {}
        by_tenant: dict[str, float] = {t: 0.0 for t in tenants}
        truth_by_tenant: dict[str, float] = {t: 0.0 for t in tenants}
        truth_j = 0.0
        for request_id, k, backend, tenant in served:
            final = _final(proxies[k], request_id, tenants[tenant])
            billed[request_id] = final["joules"]
            by_tenant[tenant] += final["joules"]
            truth = sims[backend].truth(request_id)
            assert final["completion_tokens"] == truth["completion_tokens"]
            truth_j += truth["joules"]
            truth_by_tenant[tenant] += truth["joules"]
        fleet_j = math.fsum(billed.values())
        # The simulators served nothing else: their busy energy is these requests' truth.
        busy_j = sum(httpx.get(f"{s.url}/sim/energy").json()["attributed_joules"]
                     for s in sims.values())
        assert truth_j == pytest.approx(busy_j, rel=1e-6)
        fleet_err = (fleet_j - truth_j) / truth_j
        tenant_err = {t: (by_tenant[t] - truth_by_tenant[t]) / truth_by_tenant[t] for t in tenants}
        print(f"\nthree replicas, {len(served)} requests in {load_s:.1f} s: billed {fleet_j:.1f} J, "
              f"truth {truth_j:.1f} J, fleet error {100 * fleet_err:+.2f} %; per tenant "
              + ", ".join(f"{t.split('-')[0]} {100 * e:+.2f} %" for t, e in tenant_err.items()))
        # Without the exchange each replica bills the whole backend (+143 % measured here).
        # Measured with it: -0.4 to -0.7 %, as one proxy alone (-0.4 %); the bounds leave room
        # for a loaded 2-core machine, the figure printed above is the one to report.
        assert abs(fleet_err) < 0.02
        assert all(abs(e) < 0.05 for e in tenant_err.values())

        # The ledger (shared Redis) holds exactly the final values, micro-joule for micro-joule.
        for tenant in tenants:
            mine = [rid for rid, _, _, t in served if t == tenant]
            want_uj = sum(round(billed[rid] * 1e6) for rid in mine)

            def booked(tenant: str = tenant, n: int = len(mine)) -> dict:
                total = httpx.get(f"{proxies[0].url}/v1/energy/usage", params={"tenant": tenant},
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["total"]
                return total if total["requests"] == n else {}

            wait_until(lambda b=booked: bool(b()), 15, f"{tenant}'s requests in the ledger")
            assert round(booked()["joules"] * 1e6) == want_uj
    finally:
        for p in proxies:
            p.stop()
        for s in sims.values():
            s.stop()
        _cleanup_redis(redis_url, list(sims), list(tenants), [s[0] for s in served])
    for p in proxies:
        assert "Traceback" not in p.log(), p.log()[-3000:]


def _replicas_seen(proxy: ProxyProc) -> int:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    seen = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("joulegate_cluster_replicas{")]
    return int(min(seen)) if seen else 0


async def _workload(proxies: list[ProxyProc], tenants: list[tuple[str, str]], n: int
                    ) -> list[tuple[str, int, str, str]]:
    """n requests through the three proxies at once: streamed and not, two tenants."""
    clients = {(k, tenant): openai.AsyncOpenAI(base_url=p.url + "/v1", api_key=key, max_retries=0)
               for k, p in enumerate(proxies) for tenant, key in tenants}
    gate = asyncio.Semaphore(30)
    messages = [{"role": "user", "content": "How many joules does this sentence take?"}]

    async def one(i: int) -> tuple[str, int, str, str]:
        k, (tenant, _) = i % 3, tenants[(i // 3) % 2]
        c = clients[(k, tenant)]
        async with gate:
            await asyncio.sleep(0.01 * (i % 7))
            if i % 2 == 0:
                raw = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages * (1 + i % 3), max_tokens=20 + (i * 7) % 60,
                    stream=True)
                async for _ in raw.parse():
                    pass
            else:
                raw = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages * (1 + i % 4), max_tokens=15 + (i * 11) % 50)
        return raw.headers["x-request-id"], k, raw.headers["x-energy-backend"], tenant

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for c in clients.values():
            await c.close()


def _final(proxy: ProxyProc, request_id: str, key: str) -> dict:
    result: dict = {}

    def measured() -> bool:
        nonlocal result
        result = httpx.get(f"{proxy.url}/v1/energy/requests/{request_id}", timeout=5,
                           headers={"Authorization": f"Bearer {key}"}).json()
        return result.get("method") == "measured"

    wait_until(measured, 30, f"request {request_id} to be measured")
    return result
