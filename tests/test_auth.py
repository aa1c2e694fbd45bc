"""proxy/auth.py: Authorization header -> tenant by the key's SHA-256; 401s that never echo the key."""

from __future__ import annotations

import hashlib
import json

import pytest

from proxy.auth import Authenticator, Principal, key_digest
from proxy.config import parse_config
from proxy.errors import ProxyError

ACME_KEYS = ("sk-acme-0001-secretvalue", "sk-acme-0002-othervalue")
GLOBEX_KEY = "sk-globex-0003-secretvalue"
ADMIN_KEY = "sk-admin-0004-secretvalue"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_auth(*, anonymous: str | None = None, tenants: bool = True, admin: bool = True,
              upper: bool = False) -> Authenticator:
    lines = ["backends:", "  - {name: a, url: 'http://127.0.0.1:8000/v1'}"]
    if tenants:
        acme = ", ".join(f'"{sha(k).upper() if upper else sha(k)}"' for k in ACME_KEYS)
        lines += [
            "tenants:",
            f"  - {{name: acme, api_keys_sha256: [{acme}]}}",
            f'  - {{name: globex, api_keys_sha256: ["{sha(GLOBEX_KEY)}"]}}',
        ]
    if admin:
        lines.append(f'admin_api_keys_sha256: ["{sha(ADMIN_KEY)}"]')
    if anonymous is not None:
        lines.append(f"anonymous_tenant: {anonymous}")
    return Authenticator(parse_config("\n".join(lines) + "\n", env={}))


def bearer(key: str) -> bytes:
    return b"Bearer " + key.encode()


def rejected(auth: Authenticator, header: bytes | None) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        auth.authenticate(header)
    err = info.value
    assert err.status == 401
    assert err.type == "authentication_error"
    return err


def assert_key_not_leaked(err: ProxyError, key: str) -> None:
    for text in (str(err), err.message, err.body().decode(), repr(err.args)):
        assert key not in text
        assert key[-12:] not in text  # not even a tail of it


def test_key_digest_is_hex_sha256() -> None:
    assert key_digest("sk-x") == hashlib.sha256(b"sk-x").hexdigest()
    assert len(key_digest("")) == 64


@pytest.mark.parametrize("key", ACME_KEYS)
def test_each_tenant_key_maps_to_its_tenant(key: str) -> None:
    assert make_auth().authenticate(bearer(key)) == Principal("acme", is_admin=False)


def test_second_tenant() -> None:
    principal = make_auth().authenticate(bearer(GLOBEX_KEY))
    assert principal.tenant == "globex" and not principal.is_admin


def test_admin_key() -> None:
    principal = make_auth().authenticate(bearer(ADMIN_KEY))
    assert principal.is_admin


def test_scheme_is_case_insensitive_and_whitespace_tolerated() -> None:
    auth = make_auth()
    assert auth.authenticate(b"bearer " + GLOBEX_KEY.encode()).tenant == "globex"
    assert auth.authenticate(b"BEARER   " + GLOBEX_KEY.encode() + b"  ").tenant == "globex"


def test_upper_case_digests_in_config_still_match() -> None:
    assert make_auth(upper=True).authenticate(bearer(ACME_KEYS[0])).tenant == "acme"


def test_upper_case_admin_digest_in_config_still_matches() -> None:
    """Config hex is case-insensitive for tenant digests; admin digests must behave the same."""
    text = (
        "backends: [{name: a, url: 'http://127.0.0.1:8000/v1'}]\n"
        f'admin_api_keys_sha256: ["{sha(ADMIN_KEY).upper()}"]\n'
    )
    assert Authenticator(parse_config(text, env={})).authenticate(bearer(ADMIN_KEY)).is_admin


def test_no_key_goes_to_the_anonymous_tenant() -> None:
    auth = make_auth(anonymous="public")
    assert auth.authenticate(None) == Principal("public")
    assert auth.authenticate(b"") == Principal("public")
    # A known key is still its own tenant.
    assert auth.authenticate(bearer(GLOBEX_KEY)).tenant == "globex"


def test_missing_key_without_anonymous_tenant_is_401() -> None:
    auth = make_auth()
    for header in (None, b""):
        err = rejected(auth, header)
        assert err.code == "missing_api_key"
        assert "Bearer" in err.message


def test_unknown_key_is_401_and_not_echoed() -> None:
    key = "sk-wrong-9999-dontshowme"
    err = rejected(make_auth(), bearer(key))
    assert err.code == "invalid_api_key"
    assert_key_not_leaked(err, key)


def test_unknown_key_is_401_even_with_an_anonymous_tenant() -> None:
    """A wrong key is a mistake to report, not a reason to bill the anonymous tenant."""
    key = "sk-wrong-9999-dontshowme"
    err = rejected(make_auth(anonymous="public"), bearer(key))
    assert_key_not_leaked(err, key)


def test_any_key_is_anonymous_when_no_keys_are_configured() -> None:
    auth = make_auth(anonymous="public", tenants=False, admin=False)
    assert auth.authenticate(bearer("sk-whatever")) == Principal("public")


@pytest.mark.parametrize(
    "header",
    [
        b"Basic dXNlcjpzay1zZWNyZXQtdmFsdWUtMTIz",
        b"Bearer",
        b"Bearer ",
        b"Bearer    ",
        b"sk-secret-value-123",
        b"Token sk-secret-value-123",
    ],
)
def test_malformed_header_is_401_and_not_echoed(header: bytes) -> None:
    err = rejected(make_auth(), header)
    assert err.code == "invalid_api_key"
    secret = header.split(b" ", 1)[-1].decode()
    if len(secret) >= 12:
        assert_key_not_leaked(err, secret)


def test_malformed_header_rejected_even_with_anonymous_tenant() -> None:
    rejected(make_auth(anonymous="public"), b"Basic dXNlcjpwYXNz")


def test_a_tenant_key_is_not_an_admin_key_and_vice_versa() -> None:
    auth = make_auth()
    assert not auth.authenticate(bearer(ACME_KEYS[1])).is_admin
    assert auth.authenticate(bearer(ADMIN_KEY)).tenant not in ("acme", "globex")


def test_key_differing_by_one_character_is_rejected() -> None:
    near = GLOBEX_KEY[:-1] + ("x" if GLOBEX_KEY[-1] != "x" else "y")
    err = rejected(make_auth(), bearer(near))
    assert_key_not_leaked(err, near)


def test_error_body_is_openai_shaped() -> None:
    err = rejected(make_auth(), bearer("sk-nope-nope-nope-nope"))
    body = json.loads(err.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
