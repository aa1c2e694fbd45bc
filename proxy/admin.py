"""The admin API for managed keys: `POST /v1/admin/keys` (make one; its secret is in this answer
only), `GET /v1/admin/keys` (list them, never a secret or digest), `GET|DELETE
/v1/admin/keys/{id}` (read one, revoke it). Admin keys only: a tenant key gets 403.

A managed key may name any tenant, configured or not: its requests are billed to that name, and
the config's limits and budget for a tenant of that name apply to it. A key may carry its own
rpm, tpm and `energy_budget` (the config's shape) on top: a request must fit both.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from proxy.auth import Authenticator
from proxy.config import EnergyBudget
from proxy.errors import ProxyError, bad_request, send_error
from proxy.inbound import ClientGone, read_body, scan_headers
from proxy.keystore.table import KeyTable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_MAX_BODY_BYTES = 64 * 1024
_MAX_NAME_CHARS = 200
#: A tenant name: printable, no control characters (it becomes a ledger key and a metric label).
_TENANT_RE = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
_FIELDS = frozenset(("tenant", "name", "expires_at", "rpm", "tpm", "energy_budget"))
PREFIX = "/v1/admin/keys"


class KeysAdmin:
    """Handlers for the admin keys routes, on top of the key table."""

    def __init__(self, auth: Authenticator, table: KeyTable, siteless: Sequence[str] = ()) -> None:
        self.auth = auth
        self.table = table
        self.siteless = tuple(siteless)  # backends without a site: they book no grams

    async def keys(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`/v1/admin/keys`: GET lists, POST creates."""
        try:
            self._admin_only(scope)
            if scope["method"] == "GET":
                keys = await self._store(self.table.list())
                await _send_json(send, 200, {"object": "list", "data": [k.view() for k in keys]})
                return
            fields = _create_fields(await _read_json(scope, receive), self.siteless)
            key, secret = await self._store(self.table.create(**fields))
            await _send_json(send, 201, {**key.view(), "key": secret})
        except ProxyError as exc:
            await send_error(send, exc, "")
        except ClientGone:
            return

    async def key(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`/v1/admin/keys/{id}`: GET reads one, DELETE revokes it."""
        try:
            self._admin_only(scope)
            key_id = scope["path"][len(PREFIX) + 1:]
            if scope["method"] == "DELETE":
                key = await self._store(self.table.revoke(key_id))
            else:
                key = await self._store(self.table.store.get(key_id))
            if key is None:
                shown = key_id if len(key_id) <= 64 else key_id[:64] + "..."
                raise ProxyError(404, f"No API key with id `{shown}`.", param="id", code="key_not_found")
            await _send_json(send, 200, key.view())
        except ProxyError as exc:
            await send_error(send, exc, "")

    def _admin_only(self, scope: Scope) -> None:
        principal = self.auth.authenticate(scan_headers(scope["headers"])[0])
        if not principal.is_admin:
            raise ProxyError(403, "Managing API keys needs an admin key.", code="forbidden")

    @staticmethod
    async def _store(work: Awaitable[Any]) -> Any:
        try:
            return await work
        except Exception as exc:  # any store failure (redis-py's errors are not OSErrors)
            raise ProxyError(503, f"The key store is unavailable: {type(exc).__name__}.",
                             code="key_store_unavailable", headers=[(b"retry-after", b"1")]) from None


async def _read_json(scope: Scope, receive: Receive) -> dict[str, Any]:
    body = await read_body(receive, scan_headers(scope["headers"])[2], _MAX_BODY_BYTES)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("The body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise bad_request("The body must be a JSON object.")
    return obj


def _create_fields(obj: dict[str, Any], siteless: Sequence[str] = ()) -> dict[str, Any]:
    """The `KeyTable.create` arguments of a POST body, or a 400 naming the bad field.
    `siteless`: backends without a site, which rule out a budget in grams."""
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise bad_request(f"Unknown field `{unknown[0][:64]}`; known: {', '.join(sorted(_FIELDS))}.",
                          param=unknown[0][:64])
    tenant = obj.get("tenant")
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant.strip()) or tenant.strip() == "admin":
        raise bad_request("`tenant` must be a tenant name (1-200 printable characters; 'admin' is "
                          "reserved).", param="tenant")
    name = obj.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME_CHARS):
        raise bad_request(f"`name` must be a string of at most {_MAX_NAME_CHARS} characters.", param="name")
    return {"tenant": tenant.strip(), "name": name, "expires_at_s": parse_expiry(obj.get("expires_at")),
            "rpm": _limit(obj, "rpm"), "tpm": _limit(obj, "tpm"),
            "energy_budget": parse_budget(obj.get("energy_budget"), siteless)}


def parse_budget(value: Any, siteless: Sequence[str] = ()) -> EnergyBudget | None:
    """`energy_budget` as the config's model validates it (`{"joules": 5000, "per": "day"}`);
    None stays None. 400 naming the param otherwise."""
    if value is None:
        return None
    try:
        budget = EnergyBudget.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request(f"`energy_budget`{'.' + where if where else ''}: {first['msg']} (expected "
                          "{\"joules\" or \"gco2e\": amount, \"per\": \"hour\"|\"day\"|\"month\"}).",
                          param="energy_budget") from None
    if budget.unit == "gco2e" and siteless:
        # As the config's check: a backend without a site books no grams, so the budget would
        # never see those requests.
        raise bad_request(f"`energy_budget` in gco2e needs a site on every backend (backend "
                          f"'{siteless[0]}' has none).", param="energy_budget")
    return budget


def _limit(obj: dict[str, Any], field: str) -> int | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**53:
        raise bad_request(f"`{field}` must be a whole number of at least 1, or null.", param=field)
    return value


def parse_expiry(value: Any, now_s: float | None = None) -> float | None:
    """`expires_at` as wall-clock seconds: ISO 8601 (UTC unless it names an offset) or Unix
    seconds, in the future; None stays None. 400 otherwise."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        expires_s = float(value) if abs(value) < 1e15 else math.inf  # no OverflowError on 10**400
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise bad_request("`expires_at` must be an ISO 8601 time (2025-12-31T23:59:59Z) or Unix "
                              "seconds.", param="expires_at") from None
        expires_s = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    else:
        raise bad_request("`expires_at` must be an ISO 8601 string or Unix seconds.", param="expires_at")
    if not math.isfinite(expires_s) or expires_s <= (time.time() if now_s is None else now_s):
        raise bad_request("`expires_at` must be in the future.", param="expires_at")
    return expires_s


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": orjson.dumps(obj)})
