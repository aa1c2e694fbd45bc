"""The governor live: the proxy under uvicorn with a simulated backend (its power through the
sim's agent API). `apply` at light load lowers the sim's power limit and restores it when the
proxy stops; `advise` changes nothing but exports its decision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

import tests.conftest as c

PROFILE = "h100-llama3.1-8b"


def _config(sim: c.SimBackend, mode: str) -> str:
    power = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}"
    return ("backends:\n" + c.backend_yaml("h100", sim.url, [c.MODEL], power) + c.tenants_yaml()
            + f"governor: {{mode: {mode}, interval_s: 1}}\n")


def _limit_w(sim: c.SimBackend) -> float:
    return httpx.get(f"{sim.url}/v1/power/limits", timeout=5).json()["gpus"][0]["power_limit_w"]


def _governor_view(proxy: c.ProxyProc, key: str = c.ADMIN_KEY) -> dict:
    body = httpx.get(f"{proxy.url}/v1/energy/backends", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
    return body["data"][0]


def _light_load(proxy: c.ProxyProc) -> None:
    client = c.sdk_client(proxy)
    for _ in range(3):
        client.chat.completions.create(model=c.MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)


@contextmanager
def governed(tmp_path: Path, mode: str) -> Iterator[tuple[c.SimBackend, c.ProxyProc, float]]:
    """A sim backend and a proxy governing it in `mode` after a light load; both stopped on exit
    (the proxy may be stopped earlier)."""
    sim = c.SimBackend(PROFILE, tmp_path)
    try:
        board_w = _limit_w(sim)
        proxy = c.ProxyProc(_config(sim, mode), tmp_path)
        try:
            _light_load(proxy)
            yield sim, proxy, board_w
        finally:
            proxy.stop()
        assert "Traceback" not in proxy.log()
    finally:
        sim.stop()


def test_apply_lowers_the_cap_at_light_load_and_restores_it_on_stop(tmp_path: Path) -> None:
    with governed(tmp_path, "apply") as (sim, proxy, board_w):
        c.wait_until(lambda: _limit_w(sim) < board_w, 20, "the governor to lower the sim's cap")
        view = _governor_view(proxy)["governor"]
        assert view["mode"] == "apply" and view["applied_cap_w"] == _limit_w(sim)
        assert view["original_limits_w"] == {"0": board_w} and "J/token" in view["reason"]
        assert "governor" not in _governor_view(proxy, c.KEYS["acme"])  # admin-only detail
        proxy.stop()
        assert _limit_w(sim) == board_w  # put back when the proxy stopped
        assert "power limits restored" in proxy.log()


def test_advise_changes_nothing_but_exports_the_decision(tmp_path: Path) -> None:
    with governed(tmp_path, "advise") as (sim, proxy, board_w):
        c.wait_until(lambda: (_governor_view(proxy)["governor"] or {}).get("action") == "lower", 20,
                     "an advised lower cap")
        view = _governor_view(proxy)["governor"]
        assert view["cap_w"] < board_w and view["applied_cap_w"] is None and view["original_limits_w"] is None
        text = httpx.get(f"{proxy.url}/metrics", headers={"Authorization": f"Bearer {c.ADMIN_KEY}"}, timeout=5).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("joulegate_governor_cap_watts", (("backend", "h100"),))] < board_w
        assert samples[("joulegate_governor_decisions_total", (("action", "lower"), ("backend", "h100")))] >= 1
        proxy.stop()
        assert _limit_w(sim) == board_w  # advice only
