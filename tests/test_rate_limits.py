"""Rate limits per managed key and per tenant: requests and tokens per minute, enforced before
a backend sees the request (429 `rate_limit_exceeded` with OpenAI's `x-ratelimit-*` headers),
shared by replicas through Redis or PostgreSQL, token counts corrected to what was billed.

The window is the minute: a test that counts requests first waits, if fewer than a few seconds
of the current minute are left, for the next one to begin (`fresh_window`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.auth import Principal
from proxy.config import parse_config
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.ratelimit.limiter import RateLimiter
from proxy.ratelimit.stores import MemoryRateStore
from proxy.ratelimit.window import (
    RateScope,
    go_duration,
    limit_headers,
    refusal,
    token_estimate,
    window_of,
)
from proxy.records import RequestRecord
from tests.conftest import (
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    free_port,
    sha256,
    tenants_yaml,
    wait_until,
)
from tests.test_budget_holds import counter
from tests.test_managed_keys import (  # noqa: F401 - fixtures shared_ledger asks for
    admin,
    create,
    keys_config,
    postgres_server,
    redis_base,
    shared_ledger,
)

METERED_KEY = "sk-test-metered-0006"
MESSAGES = [{"role": "user", "content": "hi"}]
RESET = re.compile(r"^(\d+m)?\d+(\.\d+)?s$|^\d+ms$")


def fresh_window(needed_s: float = 3.0) -> None:
    """Return at once if `needed_s` of this minute's window are left, else when the next begins."""
    if 60 - time.time() % 60 < needed_s:
        start = window_of(time.time())
        wait_until(lambda: window_of(time.time()) != start, needed_s + 1, "the next minute")


def sdk(proxy: ProxyProc, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat(proxy: ProxyProc, key: str, **extra: object) -> int:
    with sdk(proxy, key) as client:
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **extra)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code


def knows_key(proxy: ProxyProc, key: str) -> bool:
    """Whether `proxy` authenticates `key`, without counting a request: a body that fails
    validation is refused (400) after authentication and before any limit."""
    resp = httpx.post(proxy.url + "/v1/chat/completions", content=b"{", timeout=10,
                      headers={"Authorization": f"Bearer {key}"})
    return resp.status_code == 400


# -- the rule and the headers, as pure functions -----------------------------------------------

def test_reset_durations_are_written_as_openai_does() -> None:
    assert [go_duration(s) for s in (0, 0.0204, 0.9999, 1, 17.5, 59.25, 60, 360, 361.5)] == [
        "0ms", "21ms", "1s", "1s", "17.5s", "59.25s", "1m0s", "6m0s", "6m1.5s"]


def test_the_first_broken_limit_refuses() -> None:
    key, tenant = RateScope("key:k", "t", rpm=2, tpm=100), RateScope("tenant:t", "t", rpm=10)
    assert refusal((key, tenant), [(1, 50), (9, 0)], 50) is None
    assert refusal((key, tenant), [(2, 0), (0, 0)], 1) == (r := refusal((key, tenant), [(2, 0), (0, 0)], 1))
    assert r is not None and (r.index, r.kind, r.too_large) == (0, "requests", False)
    r = refusal((key, tenant), [(1, 60), (10, 0)], 50)
    assert r is not None and (r.index, r.kind) == (0, "tokens")
    r = refusal((key, tenant), [(0, 0), (10, 0)], 1)
    assert r is not None and (r.index, r.kind) == (1, "requests")
    r = refusal((key,), [(0, 0)], 101)
    assert r is not None and r.too_large
    assert token_estimate(10, None) == 266 and token_estimate(10, 5) == 15


def test_headers_name_the_tightest_scope() -> None:
    scopes = (RateScope("key:k", "t", rpm=5, tpm=1000), RateScope("tenant:t", "t", rpm=3))
    headers = dict(limit_headers(scopes, [(1, 400), (3, 0)], 12.5))
    assert headers == {
        b"x-ratelimit-limit-requests": b"3", b"x-ratelimit-remaining-requests": b"0",
        b"x-ratelimit-reset-requests": b"12.5s", b"x-ratelimit-limit-tokens": b"1000",
        b"x-ratelimit-remaining-tokens": b"600", b"x-ratelimit-reset-tokens": b"12.5s",
        b"retry-after": b"13"}


def test_tokens_are_corrected_to_those_billed() -> None:
    config = parse_config("backends: [{name: b, url: 'http://127.0.0.1:9/v1'}]\n", env={})
    scope = RateScope("key:k", "t", tpm=1000)

    async def body() -> None:
        store = MemoryRateStore()
        limiter = RateLimiter(config, store, Metrics())
        record = RequestRecord(request_id="r", tenant="t", model="m", kind="chat", stream=False,
                               start_s=time.time(), prompt_estimate=40)
        await limiter.admit(Principal("t", limits=(scope,)), record, 400)  # counts 440
        assert record.rate is not None and record.rate.tokens == 440
        record.backend, record.prompt_tokens, record.completion_tokens = "b", 42, 100
        limiter.settle(record)
        await limiter.close()  # waits for the correction
        window = window_of(time.time())
        assert (await store.admit((scope,), window, 0))[1] == [(1, 142)]
        unserved = RequestRecord(request_id="u", tenant="t", model="m", kind="chat", stream=False,
                                 start_s=time.time(), prompt_estimate=10)
        await limiter.admit(Principal("t", limits=(scope,)), unserved, 5)
        limiter.settle(unserved)  # no backend had it: it counts no tokens at all
        await limiter.close()
        assert (await store.admit((scope,), window, 0))[1] == [(3, 142)]
        with pytest.raises(ProxyError) as info:  # 142 + 40 + 900 > 1000
            await limiter.admit(Principal("t", limits=(scope,)), record, 900)
        assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"

    asyncio.run(body())


# -- end to end ----------------------------------------------------------------------------

def metered_tenants(extra: str = "") -> str:
    """The default tenants plus `metered`, limited to 3 requests a minute as a tenant."""
    return tenants_yaml().replace("admin_api_keys_sha256", (
        f"  - {{name: metered, api_keys_sha256: ['{sha256(METERED_KEY)}'], rate_limit: {{rpm: 3}}}}\n"
        "admin_api_keys_sha256")) + extra


@pytest.fixture(scope="module")
def proxy(sims: dict[str, SimBackend], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    """One proxy on a memory ledger with the `metered` tenant; each test makes keys of its own."""
    started = ProxyProc(keys_config(sims["h100"], "memory://", metered_tenants()), tmp_path_factory.mktemp("rl"))
    yield started
    started.stop()
    assert "Traceback" not in started.log()


def test_rpm_refuses_with_openai_headers(proxy: ProxyProc) -> None:
    keyed = create(proxy, tenant="acme", rpm=2, tpm=10_000)["key"]
    managed = create(proxy, tenant="metered")["key"]  # no limit of its own: the tenant's applies
    fresh_window()
    # Admitted answers say where the client stands too (streamed and not), as OpenAI's do.
    with sdk(proxy, keyed) as client:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]) == ("2", "1")
        assert RESET.match(raw.headers["x-ratelimit-reset-tokens"]) and "retry-after" not in raw.headers
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=2, stream=True) as streamed:
            assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
            assert int(streamed.headers["x-ratelimit-remaining-tokens"]) < 10_000
    with sdk(proxy, keyed) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert info.value.code == "rate_limit_exceeded"
    headers = info.value.response.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert RESET.match(headers["x-ratelimit-reset-requests"]) and RESET.match(headers["x-ratelimit-reset-tokens"])
    assert 1 <= int(headers["retry-after"]) <= 60
    assert chat(proxy, KEYS["acme"]) == 200  # acme's config key has no limit of its own

    # The tenant's limit counts its config and managed keys together.
    assert [chat(proxy, METERED_KEY), chat(proxy, managed), chat(proxy, METERED_KEY)] == [200] * 3
    assert [chat(proxy, managed), chat(proxy, METERED_KEY)] == [429, 429]
    assert counter(proxy, "joulegate_rate_limited_requests", 'kind="requests",scope="key",tenant="acme"') == 1
    assert counter(proxy, "joulegate_rate_limited_requests", 'scope="tenant",tenant="metered"') == 2


def test_tpm_counts_the_billed_tokens(proxy: ProxyProc) -> None:
    key = create(proxy, tenant="acme", tpm=5000)["key"]
    fresh_window()
    with sdk(proxy, key) as client:
        # No max_tokens: admitted as prompt + 256, billed as the engine's usage says.
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.usage is not None
        billed = answer.usage.prompt_tokens + answer.usage.completion_tokens
        assert billed != token_estimate(answer.usage.prompt_tokens, None)

        def remaining() -> int:
            # Larger than the limit alone: refused without counting, showing what is left.
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)
            assert "too large" in str(info.value)
            return int(info.value.response.headers["x-ratelimit-remaining-tokens"])

        wait_until(lambda: remaining() == 5000 - billed, 5, "the count to be corrected to the billed tokens")


@pytest.mark.parametrize("store", ["redis", "postgresql"])
def test_replicas_share_the_limit(store: str, sims: dict[str, SimBackend], tmp_path: Path,
                                  request: pytest.FixtureRequest) -> None:
    ledgers = shared_ledger(store, request)
    ledger = next(ledgers)
    a = ProxyProc(keys_config(sims["h100"], ledger), tmp_path)
    b = ProxyProc(keys_config(sims["h100"], ledger), tmp_path)
    try:
        key = create(a, tenant="acme", rpm=4)["key"]
        wait_until(lambda: knows_key(b, key), 5, "replica B to know the key")
        fresh_window()
        statuses = [chat(proxy, key) for proxy in (a, b, a, b, a, b)]
        assert sorted(statuses) == [200] * 4 + [429] * 2, statuses
        assert statuses[:4] == [200] * 4
    finally:
        a.stop()
        b.stop()
        for _ in ledgers:
            pass
    assert "Traceback" not in a.log() + b.log()


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_store_that_is_down(mode: str, sims: dict[str, SimBackend], tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0?socket_timeout_s=0.2"
    proxy = ProxyProc(keys_config(sims["h100"], dead, metered_tenants(f"rate_limit_failure: {mode}\n")), tmp_path)
    try:
        assert chat(proxy, METERED_KEY) == (200 if mode == "open" else 503)
        assert chat(proxy, KEYS["acme"]) == 200  # no limit: never asks the store
        assert counter(proxy, "joulegate_rate_limit_store_failures", f'mode="{mode}"') == 1
        created = admin(proxy, "POST", json={"tenant": "acme"})
        assert created.status_code == 503 and created.json()["error"]["code"] == "key_store_unavailable"
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()

