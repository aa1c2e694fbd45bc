"""proxy/governor/actuate.py against the simulator's limits API on a real socket (in-process):
an agent that goes away and comes back with its limits reset is not mistaken for the
governor's own cap, and what is restored on close is what the agent had then; two governors
on one GPU (two replicas) do not fight: the second advises until the first lets go; `off` runs
nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from proxy.backends import BackendPool
from proxy.config import parse_config
from proxy.governor.actuate import Governor
from proxy.metrics import Metrics
from proxy.sim.server import make_app
from tests.conftest import free_port

PROFILE = "h100-llama3.1-8b"


@asynccontextmanager
async def sim_on(port: int) -> AsyncIterator[str]:
    runner = web.AppRunner(make_app(PROFILE))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def governor(url: str, mode: str) -> Governor:
    config = parse_config(f"backends:\n  - {{name: h100, url: '{url}/v1', models: [m], "
                          f"power: {{source: sim, url: '{url}'}}}}\ngovernor: {{mode: {mode}, interval_s: 3600}}\n")
    return Governor(config, BackendPool(config), Metrics())


async def limit_w(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"{url}/v1/power/limits")).json()["gpus"][0]["power_limit_w"]


def test_agent_lost_and_back_then_restored_on_close() -> None:
    async def go() -> None:
        port = free_port()
        async with sim_on(port) as url:
            gov = governor(url, "apply")
            await gov.start()
            board_w = await limit_w(url)
            [d] = await gov.tick()
            assert d.action == "lower" and await limit_w(url) == d.cap_w < board_w
            await gov.tick()  # within the hold: no second change
            assert gov.targets[0].last_change_s is not None and await limit_w(url) == d.cap_w
        # The agent is gone: the governor says so and keeps its originals to restore.
        assert await gov.tick() == []
        assert "unreadable" in (gov.view("h100") or {})["error"]
        assert gov.targets[0].original_w == {0: board_w}
        async with sim_on(port) as url:  # back, with its limits reset (a restart)
            await limit_w(url)
            gov.targets[0].last_change_s = None  # let it change again at once
            [again] = await gov.tick()
            assert gov.view("h100")["error"] is None and again.action == "lower"
            await gov.close()
            assert await limit_w(url) == board_w
            assert gov.targets[0].original_w == {}

    asyncio.run(asyncio.wait_for(go(), 30))


def test_two_governors_on_one_gpu_the_second_only_advises_until_the_first_lets_go(
        caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with sim_on(free_port()) as url:
            first, second = governor(url, "apply"), governor(url, "apply")  # two replicas, one GPU
            await first.start()
            await second.start()
            board_w = await limit_w(url)
            [d] = await first.tick()
            assert d.action == "lower" and await limit_w(url) == d.cap_w < board_w
            [same] = await second.tick()  # it finds the first's cap where it wants it: holds
            assert same.action == "hold" and (second.view("h100") or {})["error"] is None
            with caplog.at_level(logging.WARNING, logger="joulegate.governor"):
                for _ in range(3):  # any change of its own is refused, said once, shown throughout
                    assert await second.targets[0].read_limits()
                    assert not await second.targets[0].set_cap(board_w)
                    view = second.view("h100") or {}
                    assert "another governor holds these power limits" in view["error"]
            assert sum("another governor holds" in r.getMessage() for r in caplog.records) == 1
            assert view["applied_cap_w"] is None and second.targets[0].original_w == {}
            assert await limit_w(url) == d.cap_w  # the first's cap stands
            await second.close()
            await first.close()  # the first puts the board limit back and lets go
            assert await limit_w(url) == board_w
            third = governor(url, "apply")
            await third.start()
            [taken] = await third.tick()
            assert taken.action == "lower" and await limit_w(url) == taken.cap_w
            assert (third.view("h100") or {})["error"] is None
            await third.close()
            assert await limit_w(url) == board_w

    asyncio.run(asyncio.wait_for(go(), 30))


def test_off_runs_nothing() -> None:
    async def go() -> None:
        async with sim_on(free_port()) as url:
            gov = governor(url, "off")
            await gov.start()
            assert gov._task is None and gov.view("h100") is None
            await gov.close()
            assert await limit_w(url) == 700.0

    asyncio.run(asyncio.wait_for(go(), 30))
