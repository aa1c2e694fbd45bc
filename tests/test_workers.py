"""`joulegate serve --workers N`: one port, several processes, one view of the metrics, and
only with a ledger every worker shares."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    REPO,
    ProxyProc,
    SimBackend,
    backend_yaml,
    free_port,
    tenants_yaml,
    wait_until,
)
from tests.postgres_support import fresh_database, usable_postgres
from tests.redis_support import usable_redis


def _requests_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^joulegate_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with usable_redis(tmp_path_factory, "redis-workers") as url:
        yield url


@pytest.mark.parametrize("own_port", [False, True], ids=["api-port", "metrics-port"])
def test_several_workers_share_one_metrics_view(sims: dict[str, SimBackend], tmp_path: Path,
                                                redis_url: str, own_port: bool) -> None:
    # server.metrics_port: every worker binds it (SO_REUSEPORT), any one answers for all.
    metrics_port = free_port() if own_port else None
    prefix = f"jgtest-workers-{uuid.uuid4().hex[:8]}:"
    config = f"server: {{metrics_port: {metrics_port}}}\n" if own_port else ""
    config += "backends:\n" + backend_yaml("h100", sims["h100"].url, [MODEL])
    config += f"routing: {{policy: least_loaded}}\nledger: '{redis_url}?key_prefix={prefix}'\n" + tenants_yaml()
    config += f"cluster: {{key_prefix: '{prefix}'}}\n"
    proxy = ProxyProc(config, tmp_path, extra_args=("--workers", "2"))
    try:
        # A new connection per request so both workers take some.
        for _ in range(12):
            with openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0) as c:
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        # Whichever worker answers /metrics counts every worker's requests.
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if own_port else proxy.url + "/metrics"
        for _ in range(4):
            assert _requests_total(httpx.get(metrics_url).text) == 12
        if own_port:
            assert httpx.get(proxy.url + "/metrics").status_code == 404
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("ledger", [None, "memory://", "sqlite:///LEDGER"])
def test_workers_refuse_a_ledger_they_cannot_share(ledger: str | None, tmp_path: Path) -> None:
    config = "backends:\n" + backend_yaml("h100", "http://127.0.0.1:9", [MODEL]) + tenants_yaml()
    if ledger is not None:
        config += f"ledger: '{ledger.replace('LEDGER', str(tmp_path / 'l.db'))}'\n"
    path = tmp_path / "joulegate.yaml"
    path.write_text(config)
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "-c", str(path), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis://" in lines[0] and "postgresql://" in lines[0], done.stderr


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with usable_postgres() as url:
        yield url


def test_workers_share_a_postgres_ledger(sims: dict[str, SimBackend], tmp_path: Path,
                                         postgres_url: str) -> None:
    """`--workers 2` accepts a PostgreSQL ledger; every request either worker served is billed
    once, and the API (any worker) and `joulegate usage` read the same totals."""
    with fresh_database(postgres_url) as db_url:
        config = "backends:\n" + backend_yaml("h100", sims["h100"].url, [MODEL])
        config += f"routing: {{policy: least_loaded}}\nledger: '{db_url}?flush_interval_s=0.2'\n"
        config += tenants_yaml() + "cluster: {enabled: false}\n"
        proxy = ProxyProc(config, tmp_path, extra_args=("--workers", "2"))
        try:
            for _ in range(12):  # a new connection per request so both workers take some
                with openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0) as c:
                    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)

            def booked() -> int:
                resp = httpx.get(proxy.url + "/v1/energy/usage",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
                assert resp.status_code == 200, resp.text
                return int(resp.json()["total"]["requests"])

            wait_until(lambda: booked() == 12, 20, "12 requests booked by the workers")
            for _ in range(4):  # whichever worker answers
                assert booked() == 12
        finally:
            proxy.stop()
        assert "Traceback" not in proxy.log()
        done = subprocess.run([sys.executable, "-m", "proxy", "usage", "-c", str(proxy.config_path),
                               "--format", "json"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["total"]["requests"] == 12
