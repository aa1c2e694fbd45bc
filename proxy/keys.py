"""New API keys for tenants: the key is shown once; the config keeps only its SHA-256."""

from __future__ import annotations

import secrets

from proxy.auth import key_digest

#: Random bytes in a key: 256 bits, base64url-encoded (43 characters) after the prefix.
KEY_BYTES = 32
KEY_PREFIX = "sk-"


def new_key() -> str:
    """A fresh random API key: `sk-` + 32 random bytes, URL-safe base64 without padding."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def new_key_record(tenant: str) -> dict[str, str]:
    """`{"tenant", "key", "sha256"}` for a fresh key; `sha256` goes in `api_keys_sha256`."""
    key = new_key()
    return {"tenant": tenant, "key": key, "sha256": key_digest(key)}
