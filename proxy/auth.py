"""API keys → tenants. Keys are known only by their SHA-256; the key itself is never kept.

Two kinds of tenant keys: the config's (`tenants[].api_keys_sha256`) and managed ones, made
through the admin API and mirrored into `Authenticator.managed` by proxy/keystore/table.py.
Either way a request is authenticated by a dict lookup on the key's digest.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from proxy.config import Config, EnergyBudget, RateLimit
from proxy.errors import ProxyError
from proxy.ratelimit.window import RateScope


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """A managed key's own energy budget, on top of its tenant's."""

    subject: str  # what the ledger books the key's spend and holds under (`key_subject`)
    label: str  # how a refusal names the key: its id and name, never the secret
    budget: EnergyBudget


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant billed, whether the key is an admin key, the managed key's id
    (None for config keys), the rate limits the request counts against (empty: none) and the
    key's own energy budget (None: only the tenant's, if any)."""

    tenant: str
    is_admin: bool = False
    key_id: str | None = None
    limits: tuple[RateScope, ...] = ()
    key_budget: KeyBudget | None = None


def key_digest(api_key: str) -> str:
    """Hex SHA-256 of a key, the only form in which keys appear in config and memory."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


class Authenticator:
    """Maps an `Authorization: Bearer KEY` header to a Principal."""

    def __init__(self, config: Config) -> None:
        self._tenant_limits: dict[str, RateLimit] = {
            t.name: t.rate_limit for t in config.tenants
            if t.rate_limit is not None and (t.rate_limit.rpm or t.rate_limit.tpm)}
        # Built once per tenant: authenticating a config key allocates nothing.
        self._by_digest: dict[str, Principal] = {}
        for tenant in config.tenants:
            principal = self.principal(tenant.name)
            for digest in tenant.api_keys_sha256:
                self._by_digest[digest] = principal
        self._admin_digests = list(config.admin_api_keys_sha256)
        self._admin = Principal("admin", is_admin=True)
        self._anonymous = config.anonymous_tenant
        self._anonymous_principal = None if self._anonymous is None else self.principal(self._anonymous)
        # Managed keys: digest -> (principal, wall-clock s until which the key works; -inf once
        # revoked). Replaced whole by the key table's refresh, never mutated in place.
        self.managed: dict[str, tuple[Principal, float]] = {}

    def principal(self, tenant: str, key_id: str | None = None, rpm: int | None = None,
                  tpm: int | None = None, key_budget: KeyBudget | None = None) -> Principal:
        """The principal of a key of `tenant`: with the key's own limits and budget (managed
        keys) and the tenant's limits from the config, key first."""
        limits: list[RateScope] = []
        if key_id is not None and (rpm or tpm):
            limits.append(RateScope(f"key:{key_id}", tenant, rpm, tpm))
        tenant_limit = self._tenant_limits.get(tenant)
        if tenant_limit is not None:
            limits.append(RateScope(f"tenant:{tenant}", tenant, tenant_limit.rpm, tenant_limit.tpm))
        return Principal(tenant, key_id=key_id, limits=tuple(limits), key_budget=key_budget)

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The caller, or a 401 ProxyError. The key never appears in an error message."""
        if not authorization:
            if self._anonymous_principal is not None:
                return self._anonymous_principal
            raise ProxyError(
                401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key",
            )
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise ProxyError(401, "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key")
        digest = hashlib.sha256(token).hexdigest()
        # Admin digests: compared in constant time, every one of them (no early exit).
        if sum(hmac.compare_digest(digest, admin) for admin in self._admin_digests):
            return self._admin
        # Tenant keys: a dict lookup on the digest. Its timing depends on the digest of the
        # presented key, not on how much of a real key it matches, and SHA-256 gives an attacker
        # no way to steer a digest toward a stored one, so it leaks nothing a guess could use.
        principal = self._by_digest.get(digest)
        if principal is not None:
            return principal
        managed = self.managed.get(digest)
        if managed is not None:
            if time.time() < managed[1]:
                return managed[0]
            raise ProxyError(401, "Incorrect API key provided: it has expired or was revoked.",
                             code="invalid_api_key")
        if self._anonymous_principal is not None and not self._by_digest and not self._admin_digests:
            # No keys configured at all: any key is accounted to the anonymous tenant, as an
            # upstream without auth would accept it.
            return self._anonymous_principal
        raise ProxyError(401, "Incorrect API key provided.", code="invalid_api_key")
