"""`joulegate serve --workers N`: one port, several processes, one view of the metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import KEYS, MODEL, ProxyProc, SimBackend, backend_yaml, free_port, tenants_yaml


def _requests_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^joulegate_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M))


@pytest.mark.parametrize("own_port", [False, True], ids=["api-port", "metrics-port"])
def test_several_workers_share_one_metrics_view(sims: dict[str, SimBackend], tmp_path: Path, own_port: bool) -> None:
    # server.metrics_port: every worker binds it (SO_REUSEPORT), any one answers for all.
    metrics_port = free_port() if own_port else None
    config = f"server: {{metrics_port: {metrics_port}}}\n" if own_port else ""
    config += "backends:\n" + backend_yaml("h100", sims["h100"].url, [MODEL])
    config += "routing: {policy: least_loaded}\nledger: memory://\n" + tenants_yaml()
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
