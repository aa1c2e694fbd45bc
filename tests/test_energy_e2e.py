"""Energy on responses, end to end: the openai SDK, the proxy, simulated GPUs with power APIs."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    stream_chat_raw,
    tenants_yaml,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "Count the joules in this sentence, please."}]


@pytest.fixture(scope="module")
def energy_proxy(sims: dict[str, SimBackend], session_tmp: Path) -> Iterator[ProxyProc]:
    config = "backends:\n"
    for name, sim in sims.items():
        config += backend_yaml(name, sim.url, [MODEL], f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}")
    config += "routing: {policy: least_loaded}\nledger: memory://\n" + tenants_yaml()
    proc = ProxyProc(config, session_tmp)
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


def _get(proxy: ProxyProc, path: str, key: str) -> httpx.Response:
    return httpx.get(proxy.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _final(proxy: ProxyProc, request_id: str, key: str = KEYS["acme"]) -> dict:
    """The request's attribution once it is `measured`."""
    result: dict = {}

    def measured() -> bool:
        nonlocal result
        result = _get(proxy, f"/v1/energy/requests/{request_id}", key).json()
        return result.get("method") == "measured"

    wait_until(measured, 20, f"request {request_id} to be measured")
    return result


def test_headers_on_non_streamed_responses(energy_proxy: ProxyProc, sims: dict[str, SimBackend]) -> None:
    c = openai.OpenAI(base_url=energy_proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=40)
    tokens = raw.parse().usage.completion_tokens
    joules = float(raw.headers["x-energy-joules"])
    assert raw.headers["x-energy-method"] in ("measured", "estimated")
    assert raw.headers["x-energy-backend"] in sims
    # Plausible for an 8B model on one GPU: between 0.01 and 10 J per generated token.
    assert 0.01 * tokens < joules < 10 * tokens
    assert float(raw.headers["x-energy-tokens-per-joule"]) == pytest.approx(tokens / joules, rel=1e-9)

    emb = c.embeddings.with_raw_response.create(model=MODEL, input="joules")
    e_joules = float(emb.headers["x-energy-joules"])
    assert e_joules > 0
    prompt = emb.parse().usage.prompt_tokens
    assert float(emb.headers["x-energy-tokens-per-joule"]) == pytest.approx(prompt / e_joules, rel=1e-9)


def test_streamed_energy_in_the_usage_chunk(energy_proxy: ProxyProc) -> None:
    _, body = stream_chat_raw(
        energy_proxy, {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "stream": True,
                       "stream_options": {"include_usage": True}})
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    usage = orjson.loads(events[-1][6:])["usage"]
    assert usage["completion_tokens"] == 12
    energy = usage["energy"]
    assert set(energy) == {"joules", "tokens_per_joule", "backend", "method", "joules_all_in"}
    assert energy["joules"] > 0
    assert b": energy" not in body


def test_streamed_energy_as_a_comment_when_usage_was_not_asked(energy_proxy: ProxyProc) -> None:
    _, body = stream_chat_raw(
        energy_proxy, {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "stream": True})
    assert body.endswith(b"data: [DONE]\n\n")
    comment = [e for e in body.split(b"\n\n") if e.startswith(b": energy ")]
    assert len(comment) == 1
    assert body.index(comment[0]) < body.index(b"data: [DONE]")
    energy = orjson.loads(comment[0][len(b": energy "):])
    assert energy["joules"] > 0 and energy["method"] in ("measured", "estimated")
    assert b'"usage":{' not in body
    # The SDK ignores the comment and still parses the stream.
    c = openai.OpenAI(base_url=energy_proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, stream=True))
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == 5


def test_final_attribution_matches_ground_truth(energy_proxy: ProxyProc, sims: dict[str, SimBackend]) -> None:
    """A concurrent mixed workload: the proxy's measured joules track the simulator's truth."""

    async def workload() -> list[tuple[str, str]]:
        c = openai.AsyncOpenAI(base_url=energy_proxy.url + "/v1", api_key=KEYS["globex"], max_retries=0)

        async def one(i: int) -> tuple[str, str]:
            if i % 3 == 0:
                stream = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=30 + 7 * i, stream=True)
                async for _ in stream.parse():
                    pass
                raw = stream
            else:
                raw = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES * (1 + i % 4), max_tokens=20 + 5 * i)
            return raw.headers["x-request-id"], raw.headers["x-energy-backend"]

        done = await asyncio.gather(*(one(i) for i in range(24)))
        await c.close()
        return done

    served = asyncio.run(workload())
    errors, total_mine, total_truth = [], 0.0, 0.0
    for request_id, backend in served:
        mine = _final(energy_proxy, request_id, KEYS["globex"])
        truth = sims[backend].truth(request_id)
        assert mine["completion_tokens"] == truth["completion_tokens"]
        errors.append(abs(mine["joules"] - truth["joules"]) / truth["joules"])
        total_mine += mine["joules"]
        total_truth += truth["joules"]
    # Loose bounds for a test on a shared 2-core machine; bench/attribution reports the figures.
    assert abs(total_mine - total_truth) / total_truth < 0.10
    assert statistics.median(errors) < 0.25


def test_tenants_see_only_their_own_requests(energy_proxy: ProxyProc) -> None:
    c = openai.OpenAI(base_url=energy_proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    request_id = raw.headers["x-request-id"]
    assert _get(energy_proxy, f"/v1/energy/requests/{request_id}", KEYS["acme"]).status_code == 200
    other = _get(energy_proxy, f"/v1/energy/requests/{request_id}", KEYS["globex"])
    assert other.status_code == 404
    assert _get(energy_proxy, f"/v1/energy/requests/{request_id}", ADMIN_KEY).json()["tenant"] == "acme"
    assert _get(energy_proxy, f"/v1/energy/requests/{request_id}", "sk-nobody").status_code == 401


def test_backends_endpoint_and_metrics(energy_proxy: ProxyProc, sims: dict[str, SimBackend]) -> None:
    def all_powered() -> bool:
        data = _get(energy_proxy, "/v1/energy/backends", ADMIN_KEY).json()["data"]  # power: admins only
        return all(b["power_w"] for b in data)

    wait_until(all_powered, 10, "power readings from every backend")
    data = {b["name"]: b for b in _get(energy_proxy, "/v1/energy/backends", ADMIN_KEY).json()["data"]}
    assert set(data) == set(sims)
    assert all(b["healthy"] and b["power_source"] == "sim" for b in data.values())
    assert all(b["split_weights"]["prefill_weight"] >= 0 for b in data.values())  # energy.learn
    tenant_view = _get(energy_proxy, "/v1/energy/backends", KEYS["acme"]).json()["data"]
    assert all("split_weights" not in b for b in tenant_view)  # operators only
    # Different GPUs draw differently: an L4 never reaches an H100's idle power.
    assert data["l4"]["power_w"] < data["h100"]["power_w"] or data["l4"]["power_w"] < 100
    text = httpx.get(energy_proxy.url + "/metrics").text
    assert 'joulegate_backend_power_watts{backend="h100"}' in text
