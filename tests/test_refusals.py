"""Every request the proxy refuses itself is counted by reason in
`joulegate_requests_refused_total{reason=...}`; answers relayed from a backend are not."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import KEYS, MODEL, ProxyProc, SimBackend, backend_yaml, tenants_yaml


@pytest.fixture(scope="module")
def proxy(sims: dict[str, SimBackend], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    config = ("server: {max_body_bytes: 2048}\nbackends:\n" + backend_yaml("h100", sims["h100"].url, [MODEL])
              + "ledger: memory://\n" + tenants_yaml())
    proc = ProxyProc(config, tmp_path_factory.mktemp("refusals"))
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


def _refused(proxy: ProxyProc) -> dict[str, float]:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    return {m[0]: float(m[1]) for m in re.findall(
        r'^joulegate_requests_refused_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}


def test_refusals_are_counted_by_reason(proxy: ProxyProc) -> None:
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    chat = proxy.url + "/v1/chat/completions"
    expected = {  # reason -> (status, how to provoke it)
        "invalid_api_key": (401, lambda: httpx.post(chat, json={"model": MODEL}, headers={
            "Authorization": "Bearer sk-wrong"})),
        "model_not_found": (404, lambda: httpx.post(chat, headers=auth, json={
            "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})),
        "request_too_large": (413, lambda: httpx.post(chat, headers=auth, content=b"x" * 4096)),
        "not_found": (404, lambda: httpx.get(proxy.url + "/nowhere")),
        "method_not_allowed": (405, lambda: httpx.get(chat)),
        "forbidden": (403, lambda: httpx.get(proxy.url + "/v1/energy/usage?tenant=globex", headers=auth)),
    }
    before = _refused(proxy)
    for reason, (status, call) in expected.items():
        resp = call()
        assert resp.status_code == status, (reason, resp.text)
        assert resp.json()["error"]["code"] == reason
    # A request the backend answers (even one it refuses) is not the proxy's refusal.
    ok = httpx.post(chat, headers=auth, timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200
    after = _refused(proxy)
    for reason in expected:
        assert after.get(reason, 0) - before.get(reason, 0) == 1, (reason, after)
    assert sum(after.values()) - sum(before.values()) == len(expected)
