"""`joulegate` commands: each a thin call into the modules that do the work."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from proxy.config import Config, ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    """Bad flags exit 2 with one line, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="joulegate", description="Energy-aware OpenAI-compatible inference proxy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("-c", "--config", default=os.environ.get("JOULEGATE_CONFIG"),
                       help="config YAML (default: $JOULEGATE_CONFIG)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=_port, help="listen port (overrides server.port)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="uvicorn worker processes")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    demo = sub.add_parser("demo", help="three simulated GPUs, the proxy, a two-tenant workload, a table")
    demo.add_argument("--port", type=_port, default=8080, help="proxy port")
    demo.add_argument("--requests", type=_positive_int, default=60, help="requests to send")
    demo.add_argument("--keep-running", action="store_true", help="leave everything up until Ctrl-C")

    sim = sub.add_parser("sim-backend", help="one simulated OpenAI-compatible GPU inference server")
    sim.add_argument("--profile", required=True, help="GPU profile, e.g. h100-llama3.1-8b")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8000)
    sim.add_argument("--model", default=None, help="model name to serve (default: the profile's)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--wake-s", type=float, default=None,
                     help="seconds POST /wake_up takes (sleep mode; default $JOULEGATE_SIM_WAKE_S or 2)")

    agent = sub.add_parser("agent", help="NVML power agent for a GPU host (/v1/power, /v1/power/stream, /metrics)")
    from proxy.agent import add_agent_arguments

    add_agent_arguments(agent)

    keys = sub.add_parser("keys", help="API keys for tenants")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    keys_new = keys_sub.add_parser("new", help="make a random key; print it once with its sha256 for the config")
    keys_new.add_argument("--tenant", required=True, help="the tenant the key is for")
    keys_new.add_argument("--json", action="store_true", help='print {"tenant", "key", "sha256"}')
    # Managed keys, through a running proxy's admin API (proxy/keys_cli.py).
    from proxy.keys_cli import add_arguments, add_budget_arguments, iso_time

    keys_create = keys_sub.add_parser("create", help="make a managed key through the admin API; print it once")
    keys_create.add_argument("--tenant", required=True, help="the tenant the key bills to")
    keys_create.add_argument("--name", help="a label for the key")
    keys_create.add_argument("--rpm", type=_positive_int, help="requests per minute for this key")
    keys_create.add_argument("--tpm", type=_positive_int, help="tokens per minute for this key")
    keys_create.add_argument("--expires", type=iso_time, help="when it stops working (ISO 8601; default never)")
    add_budget_arguments(keys_create)
    keys_create.add_argument("--json", action="store_true", help="print the admin API's answer as JSON")
    keys_list = keys_sub.add_parser("list", help="list managed keys (never their secrets)")
    keys_list.add_argument("--json", action="store_true", help="print the admin API's answer as JSON")
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a managed key by its id")
    keys_revoke.add_argument("id", help="the key's id (key_...)")
    for managed in (keys_create, keys_list, keys_revoke):
        add_arguments(managed)

    usage = sub.add_parser("usage", help="read the energy ledger")
    usage.add_argument("-c", "--config", default=os.environ.get("JOULEGATE_CONFIG"),
                       help="config YAML whose `ledger:` to read (default: $JOULEGATE_CONFIG)")
    usage.add_argument("--tenant", help="one tenant (default: all)")
    usage.add_argument("--since", help="ISO 8601 time or epoch seconds (rounded down to the hour)")
    usage.add_argument("--until", help="ISO 8601 time or epoch seconds (rounded up to the hour)")
    usage.add_argument("--group-by", default="tenant,model", help="any of tenant,model,backend,hour,site")
    usage.add_argument("--format", default="table", choices=["table", "json", "csv"])

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("config")

    sub.add_parser("config-schema", help="print the config's JSON Schema (docs/config.md is made from it)")

    from proxy.sim.simulate_cli import add_simulate_parser
    from proxy.sim.traces import add_trace_parser

    add_simulate_parser(sub)
    add_trace_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"joulegate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def load_checked_config(path: str) -> Config:
    """`load_config`, plus the files the config names (sites' CSV schedules) read once now."""
    from proxy.carbon import check_site_files

    config = load_config(path)
    try:
        check_site_files(config)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not args.config:
        print("joulegate: error: no config: pass -c CONFIG or set $JOULEGATE_CONFIG", file=sys.stderr)
        return 2
    config = load_checked_config(args.config)
    from proxy.telemetry import check_available

    check_available(config)  # tracing configured without the `otel` extra: exit now, saying so
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    server = config.server.model_copy(update=overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    common = dict(
        host=server.host, port=server.port, loop="uvloop", http="httptools", access_log=False,
        log_level=args.log_level, timeout_graceful_shutdown=server.drain_timeout_s or None,
        timeout_keep_alive=server.keepalive_timeout_s,
        lifespan="on",
    )
    if args.workers > 1:
        if not (config.ledger or "memory://").startswith(("redis://", "rediss://", "postgresql://",
                                                           "postgres://")):
            # Each worker would keep its own ledger, budgets and in-flight weights: every
            # budget multiplied by N and shared GPUs billed once per worker.
            print(f"joulegate: error: --workers {args.workers} needs a ledger all workers share: set "
                  "`ledger: redis://HOST:6379/0` or `ledger: postgresql://USER@HOST/DB` (memory and SQLite "
                  "ledgers are per process)", file=sys.stderr)
            return 2
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Workers share their metrics through files here (prometheus-client multiprocess mode).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="joulegate-metrics-")
        os.environ["JOULEGATE_CONFIG"] = os.path.abspath(args.config)
        os.environ["JOULEGATE_SERVER_OVERRIDES"] = json.dumps(overrides)
        uvicorn.run("proxy.app:app_from_env", factory=True, workers=args.workers, **common)
        return 0
    from proxy.app import create_app

    config.server = server
    uvicorn.run(create_app(config), **common)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(port=args.port, requests=args.requests, keep_running=args.keep_running)


def _sim_backend(args: argparse.Namespace) -> int:
    from proxy.sim.profiles import PROFILES
    from proxy.sim.server import run

    if args.profile not in PROFILES:
        print(f"joulegate: error: unknown profile {args.profile!r}; choose from {', '.join(sorted(PROFILES))}",
              file=sys.stderr)
        return 2
    if args.wake_s is not None and args.wake_s < 0:
        print("joulegate: error: --wake-s must be >= 0", file=sys.stderr)
        return 2
    run(profile=args.profile, host=args.host, port=args.port, model=args.model, seed=args.seed, wake_s=args.wake_s)
    return 0


def _agent(args: argparse.Namespace) -> int:
    from proxy.agent import run_from_args

    if args.interval_s <= 0:
        print("joulegate: error: --interval-s must be positive", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"joulegate: error: {args.port} is not a TCP port", file=sys.stderr)
        return 2
    run_from_args(args)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from proxy.keys import new_key_record

    if args.keys_command != "new":
        from proxy.keys_cli import run

        return run(args)

    tenant = args.tenant.strip()
    if not tenant or tenant == "admin":
        print("joulegate: error: --tenant needs a tenant name ('admin' is reserved)", file=sys.stderr)
        return 2
    record = new_key_record(tenant)
    if args.json:
        print(json.dumps(record))
    else:
        # The key is shown here once and stored nowhere: the config keeps only its digest.
        print(f"key:    {record['key']}")
        print(f"sha256: {record['sha256']}")
        print(f"# in the config, under tenants: - name: {tenant}")
        print(f"#   api_keys_sha256: [\"{record['sha256']}\"]")
    return 0


def _usage(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.ledger import open_ledger, redacted_url
    from proxy.ledger.usage import (
        UsageRow,
        format_table,
        parse_group_by,
        parse_time_s,
        rows_to_csv,
        usage_payload,
    )

    if not args.config:
        print("joulegate: error: no config: pass -c CONFIG or set $JOULEGATE_CONFIG", file=sys.stderr)
        return 2
    config = load_checked_config(args.config)
    try:
        group_by = parse_group_by(args.group_by)
        since_s, until_s = parse_time_s(args.since), parse_time_s(args.until)
    except ValueError as exc:
        print(f"joulegate: error: {exc}", file=sys.stderr)
        return 2

    async def query() -> list[UsageRow]:
        # A reader only: a short flush interval and nothing recorded, so close() writes nothing.
        ledger = open_ledger(config.ledger or "memory://")
        await ledger.start()
        try:
            return await ledger.usage(tenant=args.tenant, since_s=since_s, until_s=until_s, group_by=group_by,
                                      site_of={b.name: b.site for b in config.backends if b.site})
        finally:
            await ledger.close()

    try:
        rows = asyncio.run(query())
    except Exception as exc:  # a store that cannot be reached: one line, no traceback
        # The URL may hold a Redis password; the error text never does (redis-py prints host:port).
        print(f"joulegate: error: cannot read the ledger {redacted_url(config.ledger or 'memory://')}: "
              f"{type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(usage_payload(rows, group_by), indent=2))
    elif args.format == "csv":
        print(rows_to_csv(rows, group_by), end="")
    else:
        print(format_table(rows, group_by))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from proxy.sim.simulate_cli import run_simulate

    return run_simulate(args)


def _trace(args: argparse.Namespace) -> int:
    from proxy.sim.traces import run_trace

    return run_trace(args)


def _check_config(args: argparse.Namespace) -> int:
    config = load_checked_config(args.config)
    names = ", ".join(b.name for b in config.backends)
    print(f"{args.config}: OK ({len(config.backends)} backends: {names}; policy {config.routing.policy})")
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    from proxy.config import Config

    print(json.dumps(Config.model_json_schema(), indent=2))
    return 0


_COMMANDS = {"serve": _serve, "demo": _demo, "sim-backend": _sim_backend, "check-config": _check_config,
             "config-schema": _config_schema, "agent": _agent, "usage": _usage, "keys": _keys,
             "simulate": _simulate, "trace": _trace}
