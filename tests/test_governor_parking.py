"""Parking live: the proxy under uvicorn governing two simulated backends in `apply` mode with
`park:`. With no load one is parked (vLLM sleep mode on the sim: is_sleeping, lower power) and
never routed to; it is woken when the other stops (the next request waits for it) and when the
proxy stops. `via: command` runs its commands; `advise` never parks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

import tests.conftest as c
from proxy.config import ParkConfig, check_passthrough_path
from proxy.sim.profiles import get_profile
from proxy.sim.sleep_api import SLEEP_POWER_RATIO

PROFILES = {"h100": "h100-llama3.1-8b", "a100": "a100-llama3.1-8b"}
WAKE_S = 1.0


@pytest.fixture(autouse=True)
def _quick_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOULEGATE_SIM_WAKE_S", str(WAKE_S))  # read by the sims started below


def _config(sims: dict[str, c.SimBackend], mode: str, park: str) -> str:
    out = "backends:\n"
    for name, sim in sims.items():
        extra = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}, park: {park}"
        out += c.backend_yaml(name, sim.url, [c.MODEL], extra)
    return out + c.tenants_yaml() + f"governor: {{mode: {mode}, interval_s: 0.5}}\n"


def _sleeping(sim: c.SimBackend) -> bool:
    return bool(httpx.get(f"{sim.url}/is_sleeping", timeout=5).json()["is_sleeping"])


def _power_w(sim: c.SimBackend) -> float:
    return float(httpx.get(f"{sim.url}/v1/power", timeout=5).json()["gpus"][0]["power_w"])


def _views(proxy: c.ProxyProc) -> dict[str, dict]:
    body = httpx.get(f"{proxy.url}/v1/energy/backends", headers={"Authorization": f"Bearer {c.ADMIN_KEY}"},
                     timeout=5).json()
    return {v["name"]: v for v in body["data"]}


def _parked(proxy: c.ProxyProc) -> list[str]:
    return [name for name, v in _views(proxy).items() if v["parked"]]


def _ask(proxy: c.ProxyProc) -> str:
    """One chat completion through the proxy; the backend that served it."""
    raw = c.sdk_client(proxy).chat.completions.with_raw_response.create(
        model=c.MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    raw.parse()
    return raw.headers["x-energy-backend"]


def _samples(proxy: c.ProxyProc) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{proxy.url}/metrics", headers={"Authorization": f"Bearer {c.ADMIN_KEY}"}, timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@contextmanager
def fleet(tmp_path: Path, mode: str, park: str = "{via: vllm, wake_timeout_s: 10}",
          configure: Callable[[str, dict[str, c.SimBackend]], str] | None = None,
          ) -> Iterator[tuple[dict[str, c.SimBackend], c.ProxyProc]]:
    """Two sims and a proxy; `configure` rewrites the proxy's config (given the sims)."""
    sims: dict[str, c.SimBackend] = {}
    try:
        for name, profile in PROFILES.items():
            sims[name] = c.SimBackend(profile, tmp_path)
        config = _config(sims, mode, park)
        proxy = c.ProxyProc(configure(config, sims) if configure else config, tmp_path)
        try:
            yield sims, proxy
        finally:
            proxy.stop()
        assert "Traceback" not in proxy.log()
    finally:
        for sim in sims.values():
            sim.stop()


def test_sim_sleep_mode_refuses_inference_draws_less_and_wakes_after_the_wake_time(tmp_path: Path) -> None:
    sim = c.SimBackend(PROFILES["h100"], tmp_path)
    try:
        idle_w = get_profile(PROFILES["h100"]).idle_w
        body = {"model": c.MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{sim.url}/sleep", params={"level": 3}, timeout=5).status_code == 400
        assert httpx.post(f"{sim.url}/sleep", params={"level": 1}, timeout=5).status_code == 200
        assert _sleeping(sim) and _power_w(sim) == pytest.approx(idle_w * SLEEP_POWER_RATIO)
        refused = httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_sleeping"
        assert httpx.get(f"{sim.url}/v1/models", timeout=5).status_code == 200  # as vLLM: no weights needed
        started = time.monotonic()
        assert httpx.post(f"{sim.url}/wake_up", timeout=10).status_code == 200
        assert time.monotonic() - started >= WAKE_S * 0.9
        assert not _sleeping(sim) and _power_w(sim) == pytest.approx(idle_w)
        assert httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=10).status_code == 200
    finally:
        sim.stop()


def test_apply_parks_an_idle_backend_serves_from_the_other_and_wakes_it_on_stop(tmp_path: Path) -> None:
    with fleet(tmp_path, "apply") as (sims, proxy):
        c.wait_until(lambda: len(_parked(proxy)) == 1, 20, "the governor to park one backend")
        parked = _parked(proxy)[0]
        awake = next(n for n in sims if n != parked)
        sim = sims[parked]
        assert _sleeping(sim) and not _sleeping(sims[awake])
        assert _power_w(sim) == pytest.approx(get_profile(PROFILES[parked]).idle_w * SLEEP_POWER_RATIO)
        view = _views(proxy)[parked]["governor"]["parking"]
        assert view["parked"] and view["parked_since"] and view["via"] == "vllm" and view["error"] is None
        assert all(_ask(proxy) == awake for _ in range(4))  # routing never picks the parked one
        assert _samples(proxy)[("joulegate_governor_parked", (("backend", parked),))] == 1
        assert _parked(proxy) == [parked]  # one park per interval, and the last one stays up
        # The engine's sleep routes are never reachable through the proxy, whatever the key.
        assert httpx.post(f"{proxy.url}/wake_up", headers={"Authorization": f"Bearer {c.ADMIN_KEY}"},
                          timeout=5).status_code == 404
        assert _sleeping(sim)
        proxy.stop()
        assert not _sleeping(sim)  # woken when the proxy stopped
        assert "woke up" in proxy.log()


def test_parking_only_never_sets_a_power_limit(tmp_path: Path) -> None:
    def no_caps(config: str, _: dict[str, c.SimBackend]) -> str:
        return config.replace("governor: {mode: apply", "governor: {caps: false, mode: apply")

    with fleet(tmp_path, "apply", configure=no_caps) as (sims, proxy):
        board_w = {n: httpx.get(f"{s.url}/v1/power/limits", timeout=5).json()["gpus"][0]["power_limit_w"]
                   for n, s in sims.items()}
        c.wait_until(lambda: len(_parked(proxy)) == 1, 20, "the governor to park one backend")
        for _ in range(4):
            _ask(proxy)
        for name, sim in sims.items():
            now_w = httpx.get(f"{sim.url}/v1/power/limits", timeout=5).json()["gpus"][0]["power_limit_w"]
            assert now_w == board_w[name], name  # parked or not, never capped
        assert all(v["governor"].get("applied_cap_w") is None for v in _views(proxy).values())


def test_a_request_with_only_the_parked_backend_left_waits_for_its_wake_up(tmp_path: Path) -> None:
    with fleet(tmp_path, "apply") as (sims, proxy):
        c.wait_until(lambda: len(_parked(proxy)) == 1, 20, "the governor to park one backend")
        parked = _parked(proxy)[0]
        awake = next(n for n in sims if n != parked)
        sims[awake].stop()
        assert _ask(proxy) == parked  # waited for the wake-up, then served
        assert not _sleeping(sims[parked])
        view = _views(proxy)[parked]["governor"]["parking"]
        assert not view["parked"] and view["wakes"] == 1 and view["last_wake_s"] >= WAKE_S * 0.9
        samples = _samples(proxy)
        assert samples[("joulegate_governor_wakes_total", (("backend", parked), ("outcome", "ok")))] == 1
        assert samples[("joulegate_governor_parked", (("backend", parked),))] == 0
        assert samples[("joulegate_governor_wake_seconds_count", (("backend", parked),))] == 1


def test_park_via_command_runs_the_sleep_and_wake_commands(tmp_path: Path) -> None:
    slept, woke = tmp_path / "slept", tmp_path / "woke"
    park = f"{{via: command, sleep_command: [touch, '{slept}'], wake_command: [touch, '{woke}'], wake_timeout_s: 5}}"
    with fleet(tmp_path, "apply", park) as (sims, proxy):
        c.wait_until(lambda: len(_parked(proxy)) == 1, 20, "the governor to park one backend")
        parked = _parked(proxy)[0]
        assert slept.exists() and not woke.exists()
        assert all(_ask(proxy) != parked for _ in range(3))
        proxy.stop()
        assert woke.exists()


def test_sleep_routes_cannot_be_added_to_the_passthrough_allowlist() -> None:
    for path in ("/sleep", "/wake_up", "/is_sleeping"):
        with pytest.raises(ValueError):
            check_passthrough_path(path)


def test_park_via_command_needs_both_commands() -> None:
    with pytest.raises(ValidationError):
        ParkConfig(via="command", sleep_command=["true"])


def test_advise_never_parks(tmp_path: Path) -> None:
    with fleet(tmp_path, "advise") as (sims, proxy):
        c.wait_until(lambda: any((v["governor"] or {}).get("park") for v in _views(proxy).values()), 20,
                     "parking advice")
        views = _views(proxy)
        assert not any(v["parked"] for v in views.values())
        assert all(v["governor"]["parking"] is None for v in views.values())
        assert not any(_sleeping(s) for s in sims.values())
        assert "could be parked (advice only)" in proxy.log()


def test_carbon_objective_wakes_a_parked_backend_whose_grid_turned_clean(tmp_path: Path) -> None:
    # The h100's grid is dirty until `clean_at`, then 40x cleaner than the a100's. Idle at
    # first, the h100 (more idle grams) is parked and the a100 serves; once the h100's grid is
    # clean, the governor wakes it to take the load back, though the a100 has room to spare.
    clean_at = time.time() + 10.0
    (tmp_path / "solar.csv").write_text(f"timestamp,gco2e_per_kwh\n0,800\n{clean_at:.0f},10\n")

    def sited(config: str, sims: dict[str, c.SimBackend]) -> str:
        for name, site in (("h100", "solar"), ("a100", "steady")):
            power = f"url: '{sims[name].url}', interval_s: 0.05}}"
            config = config.replace(power, f"{power}, site: {site}")
        return config + (f"sites:\n  - {{name: solar, pue: 1.1, carbon: {{csv: '{tmp_path / 'solar.csv'}'}}}}\n"
                         "  - {name: steady, pue: 1.1, carbon: {gco2e_per_kwh: 400}}\n"
                         "routing: {policy: efficiency, objective: carbon}\n")

    with fleet(tmp_path, "apply", configure=sited) as (sims, proxy):
        c.wait_until(lambda: _parked(proxy) == ["h100"], 15, "the governor to park the h100")
        assert time.time() < clean_at, "parked too late for the test's schedule"
        # A trickle of load on the a100 until the h100's grid turns clean and it takes over.
        c.wait_until(lambda: _ask(proxy) == "h100", 30, "the h100 to wake and serve")
        assert not _sleeping(sims["h100"]) and time.time() >= clean_at
        assert "cleaner grid" in proxy.log()
        # The relieved a100 drains (nothing new routed to it) and, empty, is parked in turn.
        c.wait_until(lambda: _parked(proxy) == ["a100"], 15, "the relieved a100 to be parked")
        # Drained first, or, where the h100 took every request at once, idle for a whole
        # interval before the handover's tick (seen on a loaded machine): parked either way.
        log = proxy.log()
        assert "a100 drains: h100 serves in its place" in log or "backend a100 parked: idle" in log
        assert _sleeping(sims["a100"])
        assert _ask(proxy) == "h100"
