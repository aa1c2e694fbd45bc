"""`joulegate keys create|list|revoke`: managed API keys through a running proxy's admin API.

The proxy's URL comes from `--url` (default http://127.0.0.1:8080) and the admin key from the
environment variable `--admin-key-env` names (default JOULEGATE_ADMIN_KEY), never from a flag:
flags end up in shell history and process lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_ENV = "JOULEGATE_ADMIN_KEY"
_COLUMNS = ("id", "tenant", "name", "created_at", "expires_at", "rpm", "tpm", "energy_budget", "revoked")
#: How `keys list` shows a budget's unit.
_UNIT = {"joules": "J", "gco2e": "gCO2e"}


def iso_time(text: str) -> str:
    """argparse type of `--expires`: an ISO 8601 time, passed on as given."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2025-12-31T23:59:59Z") from None
    return text


def positive_amount(text: str) -> float:
    """argparse type of a budget amount: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """`keys create`'s energy budget: an amount in one unit, and its period."""
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--energy-budget-joules", type=positive_amount, metavar="J",
                        help="joules this key may use per period (on top of its tenant's budget)")
    amount.add_argument("--energy-budget-gco2e", type=positive_amount, metavar="G",
                        help="grams CO2e this key may emit per period (on top of its tenant's budget)")
    parser.add_argument("--energy-budget-per", choices=("hour", "day", "month"),
                        help="the budget's period, UTC (default day)")


def budget_body(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `energy_budget` object of `keys create`'s flags; None without one. SystemExit 2
    for a period without an amount."""
    joules, gco2e, per = args.energy_budget_joules, args.energy_budget_gco2e, args.energy_budget_per
    if joules is None and gco2e is None:
        if per is not None:
            print("joulegate: error: --energy-budget-per needs --energy-budget-joules or "
                  "--energy-budget-gco2e", file=sys.stderr)
            raise SystemExit(2)
        return None
    unit = {"joules": joules} if joules is not None else {"gco2e": gco2e}
    return {**unit, "per": per or "day"}


def http_url(text: str) -> str:
    """argparse type of `--url`: the proxy's base URL."""
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every admin-API command shares."""
    parser.add_argument("--url", type=http_url, default=DEFAULT_URL,
                        help=f"the proxy's base URL (default {DEFAULT_URL})")
    parser.add_argument("--admin-key-env", default=DEFAULT_KEY_ENV, metavar="NAME",
                        help=f"environment variable holding an admin key (default {DEFAULT_KEY_ENV})")


def run(args: argparse.Namespace) -> int:
    """One admin-API call for `keys create|list|revoke`: 0; 1 (one line) when the call fails;
    2 without an admin key."""
    budget = budget_body(args) if args.keys_command == "create" else None
    admin_key = os.environ.get(args.admin_key_env, "").strip()
    if not admin_key:
        print(f"joulegate: error: no admin key: set ${args.admin_key_env} (or name another variable "
              "with --admin-key-env)", file=sys.stderr)
        return 2
    if args.keys_command == "create":
        body = {"tenant": args.tenant, "name": args.name, "rpm": args.rpm, "tpm": args.tpm,
                "expires_at": args.expires, "energy_budget": budget}
        answer = _call(args.url, admin_key, "POST", "", {k: v for k, v in body.items() if v is not None})
    elif args.keys_command == "list":
        answer = _call(args.url, admin_key, "GET", "")
    else:
        answer = _call(args.url, admin_key, "DELETE", "/" + args.id)
    if answer is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(answer))
    elif args.keys_command == "create":
        # The secret is in this answer only: the proxy keeps its SHA-256.
        print(f"id:     {answer['id']}")
        print(f"key:    {answer['key']}")
        print(f"tenant: {answer['tenant']}")
        if answer.get("energy_budget"):
            print(f"budget: {format_budget(answer['energy_budget'])}")
        print("# the key is shown this once; `joulegate keys revoke ID` ends it")
    elif args.keys_command == "list":
        print(format_table(answer["data"]))
    else:
        print(f"revoked {answer['id']} (tenant {answer['tenant']})")
    return 0


def _call(url: str, admin_key: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The JSON answer, or None after printing one line saying what went wrong."""
    try:
        resp = httpx.request(method, f"{url}/v1/admin/keys{path}", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {admin_key}"})
    except httpx.HTTPError as exc:
        print(f"joulegate: error: cannot reach {url}: {type(exc).__name__}", file=sys.stderr)
        return None
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code >= 400 or not isinstance(answer, dict):
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        print(f"joulegate: error: HTTP {resp.status_code}: {message or resp.reason_phrase}", file=sys.stderr)
        return None
    return answer


def format_budget(budget: dict[str, Any]) -> str:
    """An `energy_budget` object as `5000 J/day` or `12.5 gCO2e/month`."""
    unit = "joules" if budget.get("joules") is not None else "gco2e"
    return f"{budget.get(unit):g} {_UNIT[unit]}/{budget.get('per', 'day')}"


def format_table(keys: list[dict[str, Any]]) -> str:
    """Managed keys as an aligned text table, one row each."""
    def cell(key: dict[str, Any], column: str) -> str:
        value = key.get(column)
        if value is None:
            return "-"
        return format_budget(value) if column == "energy_budget" else str(value)

    rows = [list(_COLUMNS)] + [[cell(k, c) for c in _COLUMNS] for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
