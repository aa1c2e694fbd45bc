"""Managed API keys: what is stored of one (never the key itself), and the store interface.

A managed key is made through the admin API (`POST /v1/admin/keys`); the store keeps its id,
tenant, limits, energy budget, times and the SHA-256 of the secret, as one JSON document per
key (a field added later reads as its default from a document written before it), plus a
version number that every change bumps, so replicas notice a change with one cheap read
(`KeyStore.version`) and reload the table only then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class ManagedKey:
    """One managed key as stored; times are wall-clock seconds since the epoch."""

    id: str
    sha256: str  # hex digest of the secret: the only form the secret is kept in
    tenant: str
    name: str | None
    created_at_s: float
    expires_at_s: float | None = None  # None: never
    rpm: int | None = None  # requests per minute for this key; None: no limit
    tpm: int | None = None  # tokens per minute for this key; None: no limit
    revoked_at_s: float | None = None
    # Its own energy budget, as the config's `energy_budget` (`{"joules": 5000.0, "per": "day"}`);
    # None: only its tenant's.
    energy_budget: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ManagedKey:
        fields = orjson.loads(raw)
        known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}  # a newer version's extras
        return cls(**known)

    def revoked(self, now_s: float) -> ManagedKey:
        return self if self.revoked_at_s is not None else replace(self, revoked_at_s=now_s)

    def usable_until_s(self) -> float:
        """Until when (wall-clock s) the key authenticates: -inf once revoked."""
        if self.revoked_at_s is not None:
            return float("-inf")
        return float("inf") if self.expires_at_s is None else self.expires_at_s

    def view(self) -> dict[str, Any]:
        """The admin API's object for this key: never the secret, nor its digest."""
        return {"id": self.id, "object": "api_key", "tenant": self.tenant, "name": self.name,
                "created_at": iso(self.created_at_s), "expires_at": iso(self.expires_at_s),
                "rpm": self.rpm, "tpm": self.tpm, "energy_budget": self.energy_budget,
                "revoked": self.revoked_at_s is not None, "revoked_at": iso(self.revoked_at_s)}


def iso(t_s: float | None) -> str | None:
    """ISO 8601 in UTC, to the second (`2025-01-31T12:00:00Z`); None stays None."""
    if t_s is None:
        return None
    return datetime.fromtimestamp(t_s, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class KeyStore(ABC):
    """Where managed keys live: the ledger's store. Every method may raise on a store failure."""

    async def start(self) -> None:  # noqa: B027 - an optional hook: memory stores have nothing to open
        """Connect, and create the schema where the store has one."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, as start
        """Release the store's connections."""

    @abstractmethod
    async def put(self, key: ManagedKey) -> None:
        """Insert or replace the key with this id, and bump the version, in one atomic step."""

    @abstractmethod
    async def get(self, key_id: str) -> ManagedKey | None: ...

    @abstractmethod
    async def all(self) -> list[ManagedKey]:
        """Every key, revoked and expired ones included."""

    @abstractmethod
    async def version(self) -> int:
        """A number that changes whenever any key is put (0 before the first)."""


class MemoryKeyStore(KeyStore):
    """`memory://` ledgers: the keys live in this process and are gone when it stops."""

    def __init__(self) -> None:
        self._keys: dict[str, ManagedKey] = {}
        self._version = 0

    async def put(self, key: ManagedKey) -> None:
        self._keys[key.id] = key
        self._version += 1

    async def get(self, key_id: str) -> ManagedKey | None:
        return self._keys.get(key_id)

    async def all(self) -> list[ManagedKey]:
        return list(self._keys.values())

    async def version(self) -> int:
        return self._version
