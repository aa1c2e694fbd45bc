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
_COLUMNS = ("id", "tenant", "name", "created_at", "expires_at", "rpm", "tpm", "revoked")


def iso_time(text: str) -> str:
    """argparse type of `--expires`: an ISO 8601 time, passed on as given."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2025-12-31T23:59:59Z") from None
    return text


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
    admin_key = os.environ.get(args.admin_key_env, "").strip()
    if not admin_key:
        print(f"joulegate: error: no admin key: set ${args.admin_key_env} (or name another variable "
              "with --admin-key-env)", file=sys.stderr)
        return 2
    if args.keys_command == "create":
        body = {"tenant": args.tenant, "name": args.name, "rpm": args.rpm, "tpm": args.tpm,
                "expires_at": args.expires}
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


def format_table(keys: list[dict[str, Any]]) -> str:
    """Managed keys as an aligned text table, one row each."""
    rows = [list(_COLUMNS)] + [["-" if k.get(c) is None else str(k.get(c)) for c in _COLUMNS] for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
