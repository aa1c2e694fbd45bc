"""Every replica's copy of the managed keys, kept fresh from the store.

The hot path never reads the store: the authenticator looks a key's digest up in a dict
(`Authenticator.managed`) that this table replaces whole. A background task reads the store's
version every `refresh_s` (0.5 s) and reloads the keys when it moved, so a key made or revoked
through any replica sharing the store works, or stops working, on every replica within about
`refresh_s` plus one store round trip. The replica that made the change installs it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from pydantic import ValidationError

from proxy.auth import Authenticator, KeyBudget, key_digest
from proxy.config import EnergyBudget
from proxy.keys import new_key
from proxy.keystore.base import KeyStore, ManagedKey, MemoryKeyStore
from proxy.ledger.record import key_subject

log = logging.getLogger("joulegate.keys")

#: Seconds between version reads: revocation reaches every replica within this plus a round trip.
REFRESH_S = 0.5
#: The first load waits at most this long for the store at start-up; later refreshes retry.
_FIRST_LOAD_TIMEOUT_S = 5.0


class KeyTable:
    """Managed keys: made, listed and revoked in the store, mirrored into the authenticator."""

    def __init__(self, store: KeyStore, auth: Authenticator, refresh_s: float = REFRESH_S) -> None:
        self.store = store
        self.auth = auth
        self.refresh_s = refresh_s
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        try:
            async with asyncio.timeout(_FIRST_LOAD_TIMEOUT_S):
                await self.store.start()
                await self.refresh()
        except Exception as exc:  # the store is down: config keys work; managed ones once it is back
            self._note_failure(exc)
        if not isinstance(self.store, MemoryKeyStore):  # in-process keys never change elsewhere
            self._task = asyncio.create_task(self._loop(), name="joulegate-keys-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    async def refresh(self, force: bool = False) -> list[ManagedKey] | None:
        """Reload the keys if the store's version moved (or `force`); the keys when reloaded."""
        version = await self.store.version()
        if version == self._version and not force:
            return None
        keys = await self.store.all()
        self._install(keys)
        self._version = version
        return keys

    def _install(self, keys: list[ManagedKey]) -> None:
        principal = self.auth.principal
        managed = {}
        for key in keys:
            try:
                budget = key_budget(key)
            except ValidationError:
                # A budget this version cannot read is not enforced as nothing: the key stops.
                log.error("managed key %s: unreadable energy_budget %r; key disabled", key.id,
                          key.energy_budget)
                continue
            managed[key.sha256] = (principal(key.tenant, key.id, key.rpm, key.tpm, budget),
                                   key.usable_until_s())
        self.auth.managed = managed

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last table; try again next round
                self._note_failure(exc)
            else:
                if self._failing:
                    log.info("managed keys: store reachable again")
                self._failing = False

    def _note_failure(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("managed keys: cannot read the store (%s); keeping the last %d keys",
                        type(exc).__name__, len(self.auth.managed))
        self._failing = True

    # -- the admin API's operations ------------------------------------------------------------

    async def create(self, tenant: str, name: str | None, expires_at_s: float | None,
                     rpm: int | None, tpm: int | None,
                     energy_budget: EnergyBudget | None = None) -> tuple[ManagedKey, str]:
        """A new key for `tenant`: stored (as its SHA-256) and usable here at once; returns it
        with the secret, which is shown this once and kept nowhere."""
        secret = new_key()
        budget = None if energy_budget is None else energy_budget.model_dump(exclude_none=True)
        key = ManagedKey(id="key_" + secrets.token_hex(8), sha256=key_digest(secret), tenant=tenant,
                         name=name, created_at_s=time.time(), expires_at_s=expires_at_s, rpm=rpm, tpm=tpm,
                         energy_budget=budget)
        await self.store.put(key)
        await self.refresh(force=True)
        return key, secret

    async def list(self) -> list[ManagedKey]:
        """Every key, oldest first, as the store has it now."""
        keys = await self.refresh(force=True) or []
        return sorted(keys, key=lambda k: (k.created_at_s, k.id))

    async def revoke(self, key_id: str) -> ManagedKey | None:
        """Revoke the key (idempotent); None if there is no such key."""
        key = await self.store.get(key_id)
        if key is None:
            return None
        if key.revoked_at_s is None:
            key = key.revoked(time.time())
            await self.store.put(key)
        await self.refresh(force=True)
        return key


def key_budget(key: ManagedKey) -> KeyBudget | None:
    """The key's own budget as the accounting enforces it; None without one. ValidationError
    for a stored budget that is not a valid `energy_budget`."""
    if key.energy_budget is None:
        return None
    label = f"'{key.name}' ({key.id})" if key.name else key.id
    return KeyBudget(key_subject(key.id), label, EnergyBudget.model_validate(key.energy_budget))
