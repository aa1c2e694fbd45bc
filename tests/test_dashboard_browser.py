"""GET /dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium): the admin key shows every backend's power and each tenant's row, and they update
live; a tenant key shows its own row only; no console errors.

`make test` installs chromium when missing (apt); without it (and selenium) this test skips,
except under CI=true, where it fails. JOULEGATE_DASHBOARD_PNG=path saves a screenshot there
(docs/dashboard.png is made that way).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    sdk_client,
)
from tests.test_energy_stream import power_config

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the test extra has it
    webdriver = None  # type: ignore[assignment]

MISSING = None if webdriver and CHROMIUM and CHROMEDRIVER else "chromium, chromium-driver or selenium missing"
if MISSING and IN_CI:
    raise RuntimeError(f"{MISSING}: required under CI=true (make test installs them)")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

MESSAGES = [{"role": "user", "content": "Draw me a power curve, please."}]


@pytest.fixture(scope="module")
def proxy(sims: dict[str, SimBackend], session_tmp: Path) -> Iterator[ProxyProc]:
    proc = ProxyProc(power_config(sims, names=tuple(sims)), session_tmp)
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


@pytest.fixture()
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _load(proxy: ProxyProc, tenant: str, n: int, stop: threading.Event | None = None) -> None:
    """`n` chat requests as `tenant` (until `stop`, if given)."""
    client = sdk_client(proxy, tenant)
    for _ in range(n):
        if stop is not None and stop.is_set():
            return
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=48)


def _table(driver: webdriver.Chrome, table_id: str) -> dict[str, list[str]]:
    """Rows of a table by their first cell, read in one script call (the page replaces its rows
    every update, so element handles go stale)."""
    rows: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map("
        "(tr) => [...tr.cells].map((td) => td.textContent))", f"#{table_id} tbody tr")
    return {row[0]: row[1:] for row in rows if row}


def _log_in(driver: webdriver.Chrome, proxy: ProxyProc, key: str) -> None:
    driver.get(proxy.url + "/dashboard")
    field = driver.find_element(By.NAME, "api_key")
    assert field.get_attribute("type") == "password"
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()


def test_dashboard_live_in_chromium(proxy: ProxyProc, browser: webdriver.Chrome) -> None:
    _load(proxy, "acme", 3)
    _load(proxy, "globex", 2)
    _log_in(browser, proxy, ADMIN_KEY)
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    wait.until(lambda d: set(_table(d, "backends")) == {"h100", "a100", "l4"}
               and {"acme", "globex"} <= set(_table(d, "tenants")))
    backends = _table(browser, "backends")
    assert all(row[0] == "healthy" for row in backends.values())
    wait.until(lambda d: any(row[2] not in ("–", "") and float(row[2]) > 0 for row in _table(d, "backends").values()))
    first_power = {name: row[2] for name, row in _table(browser, "backends").items()}
    first_acme = _table(browser, "tenants")["acme"]
    assert browser.execute_script("return sessionStorage.getItem('joulegate_api_key')") == ADMIN_KEY
    assert ADMIN_KEY not in browser.current_url

    stop = threading.Event()
    loaders = [threading.Thread(target=_load, args=(proxy, "acme", 200, stop)) for _ in range(4)]
    for t in loaders:
        t.start()
    try:
        # Under load the power figures and acme's row change, without a reload.
        wait.until(lambda d: {n: r[2] for n, r in _table(d, "backends").items()} != first_power
                   and _table(d, "tenants")["acme"][1] != first_acme[1])
        wait.until(lambda d: int(_table(d, "tenants")["acme"][1]) >= int(first_acme[1]) + 8)
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-power polyline")
        shot = os.environ.get("JOULEGATE_DASHBOARD_PNG")
        if shot:
            browser.save_screenshot(shot)
    finally:
        stop.set()
        for t in loaders:
            t.join(60)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    # A tenant key, in a fresh session: its own row only, no power figures.
    browser.execute_script("sessionStorage.clear()")
    _log_in(browser, proxy, KEYS["globex"])
    wait.until(lambda d: list(_table(d, "tenants")) == ["globex"] and len(_table(d, "backends")) == 3)
    assert all(row[2] == "–" for row in _table(browser, "backends").values())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
