"""GET|PUT /v1/power/limits: the agent on the fake pynvml (token, clamping, restore on stop) and
the simulated backend (its API, and that a cap lowers power more than speed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from proxy.agent import make_app
from proxy.energy.sources.nvml import NvmlReader
from proxy.governor import capmodel as capping
from proxy.power_limits import HOLD_HEADER, HOLD_S, HOLDER_HEADER, Claim, claim, release
from proxy.sim.engine import Engine, Request
from proxy.sim.profiles import get_profile
from tests.conftest import SimBackend, free_port
from tests.test_sources import FAKE  # the fake pynvml, loaded once

TOKEN = "agent-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}



def _script() -> dict[str, Any]:
    return {"gpus": [
        {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "NVIDIA H100 80GB HBM3", "power_w": 300.0,
         "power_limit_w": 700.0, "min_limit_w": 200.0, "max_limit_w": 700.0},
        {"uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "name": "NVIDIA L4", "power_w": 60.0,
         "power_limit_w": 72.0, "min_limit_w": 40.0, "max_limit_w": 72.0}]}


@asynccontextmanager
async def agent(token: str | None, lease_s: float = 0.0) -> AsyncIterator[tuple[str, NvmlReader]]:
    FAKE.fake_reset()
    FAKE.fake_load(_script())
    reader = NvmlReader(nvml=FAKE)
    runner = web.AppRunner(make_app(reader, None, 0.02, token=token, limits_lease_s=lease_s))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/v1/power/limits"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(250):  # the sampler initialises NVML
                if (await client.get(url, headers=AUTH)).status_code == 200:
                    break
                await asyncio.sleep(0.02)
        yield url, reader
    finally:
        await runner.cleanup()
        reader.shutdown()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


def test_agent_get_limits_shape() -> None:
    async def go() -> None:
        async with agent(TOKEN) as (url, _), httpx.AsyncClient(timeout=5) as client:
            body = (await client.get(url, headers=AUTH)).json()
            assert body == {"gpus": [
                {"index": 0, "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "power_limit_w": 700.0,
                 "min_w": 200.0, "max_w": 700.0, "default_w": 700.0},
                {"index": 1, "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "power_limit_w": 72.0,
                 "min_w": 40.0, "max_w": 72.0, "default_w": 72.0}]}
            assert (await client.get(url)).status_code == 401  # every route wants the token
    run(go)


def test_agent_put_clamps_and_restores_on_stop() -> None:
    async def go() -> None:
        async with agent(TOKEN) as (url, _), httpx.AsyncClient(timeout=5) as client:
            resp = await client.put(url, headers=AUTH, json={"gpus": [{"index": 0, "power_limit_w": 420},
                                                                       {"index": 1, "power_limit_w": 10}]})
            assert resp.status_code == 200, resp.text
            limits = [g["power_limit_w"] for g in resp.json()["gpus"]]
            assert limits == [420.0, 40.0]  # 10 W is below the L4's minimum: clamped to 40 W
            power = (await client.get(url.replace("/limits", ""), headers=AUTH)).json()
            assert [g["power_limit_w"] for g in power["gpus"]] == [420.0, 40.0]
            # A second change keeps the first originals for the restore.
            await client.put(url, headers=AUTH, json={"gpus": [{"index": 0, "power_limit_w": 9999}]})
            assert (await client.get(url, headers=AUTH)).json()["gpus"][0]["power_limit_w"] == 700.0
            await client.put(url, headers=AUTH, json={"gpus": [{"index": 0, "power_limit_w": 300}]})
            for bad in ({"gpus": [{"index": 7, "power_limit_w": 300}]}, {"gpus": [{"index": 0}]},
                        {"gpus": [{"index": 0, "power_limit_w": "x"}]}, [1], {"gpus": []}):
                resp = await client.put(url, headers=AUTH, json=bad)
                assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_power_limits"
            resp = await client.put(url, headers=AUTH, content=b"{not json")
            assert resp.status_code == 400
            assert [g["power_limit_w"] for g in (await client.get(url, headers=AUTH)).json()["gpus"]] == [300.0, 40.0]
        # Stopped: both GPUs are back at the limits they had before the first PUT.
        assert FAKE.set_calls[-2:] == [(0, 700_000), (1, 72_000)]
    run(go)


def test_agent_without_token_refuses_put_even_on_loopback() -> None:
    async def go() -> None:
        async with agent(None) as (url, _), httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(url)).status_code == 200
            resp = await client.put(url, json={"gpus": [{"index": 0, "power_limit_w": 420}]})
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "token_required"
            assert TOKEN not in resp.text
        assert FAKE.set_calls == []
    run(go)


def test_agent_lease_restores_limits_nobody_renews() -> None:
    async def go() -> None:
        async with agent(TOKEN, lease_s=0.5) as (url, _), httpx.AsyncClient(timeout=5) as client:
            put = {"gpus": [{"index": 0, "power_limit_w": 420}]}
            assert (await client.put(url, headers=AUTH, json=put)).status_code == 200
            for _ in range(4):  # renewed in time: it stays
                await asyncio.sleep(0.2)
                await client.put(url, headers=AUTH, json=put)
                assert (await client.get(url, headers=AUTH)).json()["gpus"][0]["power_limit_w"] == 420.0
            for _ in range(300):  # then silence: the lease runs out and the original comes back
                if (await client.get(url, headers=AUTH)).json()["gpus"][0]["power_limit_w"] == 700.0:
                    break
                await asyncio.sleep(0.02)
            assert (await client.get(url, headers=AUTH)).json()["gpus"][0]["power_limit_w"] == 700.0
    run(go)


def test_agent_takes_limits_from_one_governor_at_a_time() -> None:
    async def go() -> None:
        async with agent(TOKEN) as (url, _), httpx.AsyncClient(timeout=5) as client:
            def put(watts: float, who: str | None, **params: str) -> Awaitable[httpx.Response]:
                claim = {HOLDER_HEADER: who, HOLD_HEADER: "5"} if who else {}
                return client.put(url, headers={**AUTH, **claim}, params=params,
                                  json={"gpus": [{"index": 0, "power_limit_w": watts}]})

            def limit_w() -> Awaitable[httpx.Response]:
                return client.get(url, headers=AUTH)

            assert (await put(420, "governor-a")).status_code == 200
            refused = await put(300, "governor-b")  # a's claim is live: b changes nothing
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "limits_held"
            assert (await limit_w()).json()["gpus"][0]["power_limit_w"] == 420.0
            assert (await put(400, "governor-a")).status_code == 200  # a renews its own
            assert (await put(380, None)).status_code == 200  # an operator's PUT is not refused
            assert (await put(300, "governor-b")).status_code == 409
            # a puts its originals back as it stops, ending its claim: b may take over at once.
            assert (await put(700, "governor-a", release="true")).status_code == 200
            assert (await put(300, "governor-b")).status_code == 200
            assert (await limit_w()).json()["gpus"][0]["power_limit_w"] == 300.0
    run(go)


def test_a_claim_lasts_its_hold_and_no_longer() -> None:
    held = Claim()
    assert claim(held, {HOLDER_HEADER: "a", HOLD_HEADER: "10"}, 100.0) is None and held.until_s == 110.0
    assert claim(held, {HOLDER_HEADER: "b"}, 109.0) is not None
    assert claim(held, {HOLDER_HEADER: "b"}, 110.5) is None and held.holder == "b"
    assert held.until_s == 110.5 + HOLD_S  # no hold header: the default
    clamped = Claim()
    assert claim(clamped, {HOLDER_HEADER: "c", HOLD_HEADER: "1e9"}, 0.0) is None
    assert clamped.until_s == 86400.0  # clamped ...
    for nonsense in ("nan", "abc", "", "-5"):
        clamped = Claim()
        assert claim(clamped, {HOLDER_HEADER: "c", HOLD_HEADER: nonsense}, 0.0) is None
        assert clamped.until_s == (5.0 if nonsense == "-5" else HOLD_S)  # ... and nonsense is the default
    release(held, {HOLDER_HEADER: "a"}, {"release": "true"})  # only the holder ends its claim
    assert held.holder == "b"


# -- the simulator -------------------------------------------------------------------------


def _run_engine(cap_w: float | None, batch: int, prompt_tokens: int = 200, output_tokens: int = 200
                ) -> tuple[float, float, float]:
    """(mean power W, prefill s of the first step, s per decode step) for `batch` requests."""
    engine = Engine(get_profile("h100-llama3.1-8b"))
    engine.power_cap_w = cap_w
    for i in range(batch):
        engine.add(Request(request_id=f"r{i}", prompt_tokens=prompt_tokens, max_output_tokens=output_tokens), 0.0)
    steps = []
    while (step := engine.plan_step(0.0)) is not None:
        steps.append(step)
        engine.finish_step(step)
    energy_j = sum(s.energy_j for s in steps)
    duration_s = steps[-1].end_s - steps[0].start_s
    decode = [s for s in steps if not s.prefill]
    return energy_j / duration_s, steps[0].duration_s, sum(s.duration_s for s in decode) / len(decode)


def test_sim_cap_lowers_power_more_than_speed() -> None:
    free_w, free_prefill_s, free_decode_s = _run_engine(None, 64)
    cap_w = free_w * 0.75
    capped_w, capped_prefill_s, capped_decode_s = _run_engine(cap_w, 64)
    assert capped_w <= cap_w + 1e-6 < free_w
    decode_slowdown = capped_decode_s / free_decode_s
    prefill_slowdown = capped_prefill_s / free_prefill_s
    assert 1.0 < decode_slowdown < prefill_slowdown  # decode is memory-bound: it loses less
    assert decode_slowdown < free_w / capped_w  # so joules per token fall
    # A cap above what the GPU draws changes nothing.
    assert _run_engine(free_w * 2, 64) == pytest.approx((free_w, free_prefill_s, free_decode_s))


def test_capping_shape() -> None:
    assert capping.clock_ratio(400, None, 100) == 1.0 and capping.clock_ratio(400, 500, 100) == 1.0
    assert capping.clock_ratio(400, 175, 100) == pytest.approx(0.5)  # 75/300 of dynamic power: r^2
    seconds, watts = capping.capped(1.0, 400, 175, 100, capping.DECODE_CLOCK_SENSITIVITY)
    assert watts == pytest.approx(175) and seconds == pytest.approx(0.65 + 0.35 / 0.5)
    assert capping.min_limit_w(700) == 200.0


def test_sim_backend_limits_api(tmp_path: Path) -> None:
    sim = SimBackend("h100-llama3.1-8b", tmp_path)
    try:
        url = f"{sim.url}/v1/power/limits"
        gpu = httpx.get(url, timeout=5).json()["gpus"][0]
        board_w = get_profile("h100-llama3.1-8b").board_limit_w
        assert (gpu["index"], gpu["power_limit_w"], gpu["max_w"], gpu["default_w"]) == (0, board_w, board_w, board_w)
        assert gpu["min_w"] == capping.min_limit_w(board_w)
        resp = httpx.put(url, json={"gpus": [{"index": 0, "power_limit_w": 1.0}]}, timeout=5)
        assert resp.json()["gpus"][0]["power_limit_w"] == gpu["min_w"]  # clamped
        assert httpx.get(f"{sim.url}/v1/power", timeout=5).json()["gpus"][0]["power_limit_w"] == gpu["min_w"]
        assert httpx.put(url, json={"gpus": [{"index": 1, "power_limit_w": 300}]}, timeout=5).status_code == 400
        resp = httpx.put(url, json={"gpus": [{"index": 0, "power_limit_w": None}]}, timeout=5)
        assert resp.json()["gpus"][0]["power_limit_w"] == board_w  # null: the default
    finally:
        sim.stop()
