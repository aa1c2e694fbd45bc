"""Attribution accuracy benchmark: the proxy's per-request joules vs the simulator's ground truth.

Per configuration (power source x sampling interval) it starts, each in its own process on
loopback: three simulated GPUs of different profiles serving the same model
(`joulegate sim-backend`: h100, a100, l4) and one proxy (`routing: least_loaded`, three tenants,
every backend on the chosen power source). It drives one seeded, bursty, mixed workload through
the proxy with the official `openai` AsyncOpenAI client (chat and legacy completions, streamed
with and without usage, non-streamed, embeddings; short and long prompts and outputs; up to
`--concurrency` in flight), waits until every request's `GET /v1/energy/requests/{id}` is
`measured`, and compares each with `GET /sim/requests/{id}` of the simulator that served it.

Prints one table (fleet total error, conservation, per-tenant totals error, per-request median
and p90 absolute error, method share at response time), PASS/FAIL per target, a breakdown of
the error by request kind and backend, the worst requests of any configuration that missed a
target, and writes bench/results/attribution-<timestamp>.json.

Conservation needs the proxy's idle joules, which it does not publish. The proxy therefore runs
as `python -m bench.attribution --serve-proxy CONFIG --port P`: `joulegate serve`'s app
(`proxy.app.create_app`) under the same uvicorn settings, plus one read-only route
(`GET /_bench/books`) that returns each backend attributor's books. `--plain-serve` runs the
stock `python -m proxy serve` instead; conservation then falls back to the external check
(sum of attributed + the simulators' idle joules vs the simulators' joules).

Run: ``python -m bench.attribution [--quick] [--requests N] [--seed S]``.

Modules: `workload` (configurations, request classes, the seeded plan), `fleet` (simulators,
the proxy, `--serve-proxy`), `measure` (driving the SDK, finals, truths), `figures` (errors,
conservation, breakdowns), `report` (targets, tables, JSON helpers), `cli` (the command).
"""

from __future__ import annotations

from bench.attribution.cli import (
    main,
    parse_args,
    run_setup,
)
from bench.attribution.figures import (
    _pct,
    _quantile,
    annotate,
    breakdown,
    calibration,
    class_figures,
    energy_books,
    summarize,
)
from bench.attribution.fleet import (
    BOOKS_PATH,
    Fleet,
    Run,
    _get_json,
    _ok,
    proxy_config,
    serve_proxy,
    serve_with_route,
    sha256,
    start_sims,
    wait_powered,
)
from bench.attribution.measure import (
    Outcome,
    drive,
    fetch_truth,
    send_one,
    wait_measured,
)
from bench.attribution.report import (
    TARGET_1S_TENANT_PCT,
    TARGET_100MS_MEDIAN_PCT,
    TARGET_100MS_P90_PCT,
    TARGET_100MS_TENANT_PCT,
    TARGET_CONSERVATION_PCT,
    print_breakdown,
    print_classes,
    print_table,
    print_worst,
    targets_for,
)
from bench.attribution.workload import (
    ADMIN_KEY,
    BACKENDS,
    CLASSES,
    DEFAULT_SETUPS,
    LONG_PROMPT_TOKENS,
    MODEL,
    QUICK_SETUPS,
    TENANT_KEYS,
    TENANT_MIX,
    Planned,
    Setup,
    make_plan,
)

__all__ = [
    "ADMIN_KEY",
    "BACKENDS",
    "BOOKS_PATH",
    "CLASSES",
    "DEFAULT_SETUPS",
    "Fleet",
    "LONG_PROMPT_TOKENS",
    "MODEL",
    "Outcome",
    "Planned",
    "QUICK_SETUPS",
    "Run",
    "Setup",
    "TARGET_100MS_MEDIAN_PCT",
    "TARGET_100MS_P90_PCT",
    "TARGET_100MS_TENANT_PCT",
    "TARGET_1S_TENANT_PCT",
    "TARGET_CONSERVATION_PCT",
    "TENANT_KEYS",
    "TENANT_MIX",
    "_get_json",
    "_ok",
    "_pct",
    "_quantile",
    "annotate",
    "breakdown",
    "calibration",
    "class_figures",
    "drive",
    "energy_books",
    "fetch_truth",
    "main",
    "make_plan",
    "parse_args",
    "print_breakdown",
    "print_classes",
    "print_table",
    "print_worst",
    "proxy_config",
    "run_setup",
    "send_one",
    "serve_proxy",
    "serve_with_route",
    "sha256",
    "start_sims",
    "summarize",
    "targets_for",
    "wait_measured",
    "wait_powered",
]
