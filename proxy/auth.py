"""API keys → tenants. Keys are known only by their SHA-256; the key itself is never kept."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from proxy.config import Config
from proxy.errors import ProxyError


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant billed, and whether the key is an admin key."""

    tenant: str
    is_admin: bool = False


def key_digest(api_key: str) -> str:
    """Hex SHA-256 of a key, the only form in which keys appear in config and memory."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


class Authenticator:
    """Maps an `Authorization: Bearer KEY` header to a Principal."""

    def __init__(self, config: Config) -> None:
        self._tenant_by_digest: dict[str, str] = {}
        for tenant in config.tenants:
            for digest in tenant.api_keys_sha256:
                self._tenant_by_digest[digest] = tenant.name
        self._admin_digests = list(config.admin_api_keys_sha256)
        self._anonymous = config.anonymous_tenant

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The caller, or a 401 ProxyError. The key never appears in an error message."""
        if not authorization:
            if self._anonymous is not None:
                return Principal(self._anonymous)
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
            return Principal("admin", is_admin=True)
        # Tenant keys: a dict lookup on the digest. Its timing depends on the digest of the
        # presented key, not on how much of a real key it matches, and SHA-256 gives an attacker
        # no way to steer a digest toward a stored one, so it leaks nothing a guess could use.
        tenant = self._tenant_by_digest.get(digest)
        if tenant is not None:
            return Principal(tenant)
        if self._anonymous is not None and not self._tenant_by_digest and not self._admin_digests:
            # No keys configured at all: any key is accounted to the anonymous tenant, as an
            # upstream without auth would accept it.
            return Principal(self._anonymous)
        raise ProxyError(401, "Incorrect API key provided.", code="invalid_api_key")
