"""Hostile requests for every public endpoint, as hypothesis strategies of raw HTTP/1.1 bytes.

Each `Case` is the exact bytes written on the socket, so it can say what httpx refuses to:
invalid header bytes, path tricks, content-length lies. `bench/fuzz.py` sends them and judges
the answers; `tests/test_fuzz.py` runs a small sample of the same strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import strategies as st

from tests.conftest import ADMIN_KEY, KEYS, MODEL

#: server.max_body_bytes in the fuzz config: small, so bodies near and over it stay cheap.
MAX_BODY = 64 * 1024
#: The id of a request the runner makes before the cases, so lookups can hit a real record.
KNOWN_ID = "fuzz-known-request-0001"
#: Methods httptools parses; anything else is not HTTP it knows (uvicorn answers plain 400).
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


@dataclass(frozen=True, slots=True)
class Case:
    """One request as written on the wire, and what the oracle may accept for it."""

    family: str  # the table row it is counted under
    raw: bytes
    note: str  # short, for failure reports
    valid_http: bool = True  # False: uvicorn may answer a plain-text 400 before the app sees it
    complete: bool = True  # False: the body is shorter than declared; no answer is owed
    may_forward: bool = True  # False: must be answered by the proxy, never reach a backend


def request(method: str, target: bytes | str, headers: list[tuple[bytes, bytes]] | None = None,
            body: bytes | None = None, length: bytes | None = None) -> bytes:
    """HTTP/1.1 request bytes with Host and `Connection: close`; Content-Length is the body's
    unless `length` overrides it (b"" leaves it out)."""
    if isinstance(target, str):
        target = target.encode()
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: fuzz", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers or []]
    if length is None and body is not None:
        length = str(len(body)).encode()
    if length:
        lines.append(b"Content-Length: " + length)
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


# -- building blocks ----------------------------------------------------------------------------

_AUTH: dict[str, bytes | None] = {
    "acme": f"Bearer {KEYS['acme']}".encode(), "globex": f"Bearer {KEYS['globex']}".encode(),
    "admin": f"Bearer {ADMIN_KEY}".encode(), "wrong": b"Bearer sk-wrong-key", "none": None,
    "basic": b"Basic dXNlcjpwYXNz", "empty": b"Bearer ", "bare": b"Bearer",
    "latin1": b"Bearer sk-\xe9\xff\xfe", "utf8": "Bearer sk-ключ".encode(), "long": b"Bearer " + b"k" * 20_000,
    "spaces": f"bearer    {KEYS['acme']}   ".encode(),
}
#: Mostly valid keys, so bodies get past authentication to validation and upstream.
auth_names = st.sampled_from(["acme"] * 6 + ["admin"] * 2 + list(_AUTH))


def auth_headers(name: str) -> list[tuple[bytes, bytes]]:
    value = _AUTH[name]
    return [] if value is None else [(b"Authorization", value)]


class Raw(str):
    """A JSON literal spliced into a body verbatim (orjson cannot write 1e400 or 10**400)."""


_RAW_NUMBERS = ["1e308", "1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 400, "1E-400", "-0", "0.0",
                "18446744073709551616", "9223372036854775808", "-9223372036854775809", "NaN", "Infinity"]
huge_numbers = st.sampled_from(_RAW_NUMBERS).map(Raw) | st.sampled_from(
    [2**63 - 1, 2**64 - 1, -(2**63), 1e308, -1e308, 5e-324, 2**31, -1])
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=20) | huge_numbers)
junk = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=8), kids, max_size=4), max_leaves=12)
#: Token limits: small valid ones (the simulator decodes them in real time) or hostile ones.
limits = st.integers(-3, 24) | st.sampled_from([2**31, 2**63 - 1, 2**64 - 1, 10**6]) | junk


def encode(obj: Any) -> bytes:
    """orjson, with `Raw` strings written as bare literals."""
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(str(value))
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    out = orjson.dumps(mark(obj))
    for i, raw in enumerate(raws):
        out = out.replace(orjson.dumps(f"\x00raw{i}\x00"), raw.encode())
    return out


_BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
}
_FAMILY = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
_FIELDS = ("model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens",
           "max_completion_tokens", "n", "temperature", "top_p", "stop", "user", "tools", "logprobs",
           "dimensions", "encoding_format", "seed", "response_format")
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([MODEL, "", "gpt-4", MODEL.upper(), MODEL + "\x00", "../" + MODEL]) | junk,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]) | junk,
                                                "content": st.text(max_size=40) | junk}), max_size=3) | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
    "max_tokens": limits, "max_completion_tokens": limits, "n": limits,
    "dimensions": st.integers(-2, 9000) | junk,
    "encoding_format": st.sampled_from(["float", "base64"]) | junk,
}


@st.composite
def json_body(draw: st.DrawFn, path: str) -> bytes:
    """A mostly valid body for `path` with some fields replaced by junk, or deleted."""
    body = dict(_BASES.get(path, {"model": MODEL, "input": "hi"}))
    for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            body.pop(field, None)
        else:
            body[field] = draw(_FIELD_VALUES.get(field, junk))
    return encode(body)


@st.composite
def broken_body(draw: st.DrawFn, path: str) -> tuple[bytes, str]:
    """Bodies that are not a valid JSON object: each with a note saying how."""
    valid = encode(_BASES.get(path, {"model": MODEL, "input": "hi"}))
    how = draw(st.sampled_from(["empty", "scalar", "truncated", "garbage", "utf8", "nesting", "binary",
                                "nan", "dupkeys", "bom"]))
    if how == "empty":
        return b"", how
    if how == "scalar":
        return draw(st.sampled_from([b"null", b"[]", b"1", b'"x"', b"true", b"1e400", b"[" + valid + b"]"])), how
    if how == "truncated":
        return valid[:draw(st.integers(1, len(valid) - 1))], how
    if how == "garbage":
        return valid + draw(st.sampled_from([b"x", b",", b"}", b" {}", b"\x00"])), how
    if how == "utf8":  # an invalid UTF-8 sequence inside a string value
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return valid.replace(b'"hi"', b'"h' + bad + b'i"'), how
    if how == "nesting":
        depth = draw(st.sampled_from([100, 1023, 1025, 10_000, 30_000]))
        inner = b"[" * depth + b"]" * depth if draw(st.booleans()) else b"[" * depth
        return valid.replace(b'"hi"', inner) if draw(st.booleans()) else inner, how
    if how == "binary":
        return draw(st.binary(min_size=1, max_size=64)), how
    if how == "nan":
        return valid.replace(b'"hi"', b"NaN"), how
    if how == "dupkeys":
        return valid[:-1] + b',"model":[1]}', how
    return b"\xef\xbb\xbf" + valid, how


@st.composite
def big_body(draw: st.DrawFn, path: str) -> tuple[bytes, str]:
    """A valid-looking body whose size is at, just over or far over server.max_body_bytes."""
    size = draw(st.sampled_from([MAX_BODY - 200, MAX_BODY, MAX_BODY + 1, 2 * MAX_BODY, 1 << 20]))
    head = encode(_BASES.get(path, {"model": MODEL, "input": "hi"}))
    pad = max(0, size - len(head) - 12)
    body = head[:-1] + b',"user":"' + b"a" * pad + b'"}'
    return body, f"{len(body)} bytes"


# -- one strategy per endpoint family -------------------------------------------------------------

@st.composite
def inference(draw: st.DrawFn, path: str) -> Case:
    """POST to an inference route: junk fields, broken JSON, big bodies, chunked bodies."""
    auth = draw(auth_names)
    headers = auth_headers(auth) + [(b"Content-Type", b"application/json")]
    kind = draw(st.sampled_from(["fields", "fields", "fields", "broken", "big", "chunked", "length"]))
    family = _FAMILY[path]
    if kind == "fields":
        return Case(family, request("POST", path, headers, draw(json_body(path))), f"fields auth={auth}")
    if kind == "broken":
        body, how = draw(broken_body(path))
        return Case(family, request("POST", path, headers, body), f"broken:{how} auth={auth}")
    if kind == "big":
        body, how = draw(big_body(path))
        return Case(family, request("POST", path, headers, body), f"big:{how} auth={auth}")
    if kind == "chunked":  # no Content-Length: the size is only known while reading
        body, how = draw(big_body(path))
        step = draw(st.sampled_from([1000, 16 * 1024, 70_000]))
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                          for i in range(0, len(body), step)) + b"0\r\n\r\n"
        raw = request("POST", path, headers + [(b"Transfer-Encoding", b"chunked")], chunks, length=b"")
        return Case(family, raw, f"chunked:{how} auth={auth}")
    # Content-Length lies: shorter than the body (the rest is read as a next request), longer
    # (the body never completes), or not a number at all.
    body = draw(json_body(path))
    lie = draw(st.sampled_from(["short", "long", "junk", "two"]))
    if lie == "short":
        return Case(family, request("POST", path, headers, body, str(len(body) // 2).encode()),
                    "length:short", valid_http=False)
    if lie == "long":
        return Case(family, request("POST", path, headers, body, str(len(body) + 100).encode()),
                    "length:long", complete=False)
    if lie == "junk":
        value = draw(st.sampled_from([b"-1", b"abc", b"1e3", b"99999999999999999999999", b"0x10", b" "]))
        return Case(family, request("POST", path, headers, body, value), "length:junk", valid_http=False)
    raw = request("POST", path, headers + [(b"Content-Length", b"1")], body)
    return Case(family, raw, "length:two", valid_http=False)


_OTHER_V1 = ["/v1/responses", "/v1/moderations", "/v1/audio/speech", "/v1/images/generations",
             "/v1/rerank", "/v1/score", "/v1/tokenize", "/v1/chat/completions/extra", "/v1/x"]


@st.composite
def passthrough(draw: st.DrawFn) -> Case:
    """Other `/v1/*` POSTs, which pass through to a backend when they name a model."""
    path = draw(st.sampled_from(_OTHER_V1))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["a=1", "model=x&&", "%ff=%00", "x=" + "y" * 5000]))
    auth = draw(auth_names)
    body = draw(json_body("other") | broken_body("other").map(lambda pair: pair[0]))
    return Case("passthrough", request("POST", path, auth_headers(auth), body), f"{path[:60]} auth={auth}")


_TIMES = ["", "0", "-1", "1e308", "1e400", "-1e400", "nan", "inf", "-inf", "1" + "0" * 400,
          "2026-11-27", "2026-11-27T04:00:00Z", "2026-11-27T04:00:00+14:00", "0001-01-01", "9999-12-31T23:59:59",
          "2026-13-45", "yesterday", "%00", "%ff%fe", "1%2e5", "2026-11-27T04:00:00z", "+5+", "0x10"]
_GROUPS = ["", "model", "model,backend,hour", "tenant,model,backend,hour", "hour,hour", ",,,", "nope",
           "model,", "MODEL", "%00", "model%2Cbackend", "tenant"]


@st.composite
def usage_query(draw: st.DrawFn) -> str:
    """A query string for /v1/energy/usage: known keys with garbage, repeats, junk keys."""
    params = []
    for key in draw(st.lists(st.sampled_from(["since", "until", "group_by", "format", "tenant", "x", ""]),
                             max_size=5)):
        value = draw(st.sampled_from(_TIMES) if key in ("since", "until") else
                     st.sampled_from(_GROUPS) if key == "group_by" else
                     st.sampled_from(["csv", "json", "CSV", "", "%ff"]) if key == "format" else
                     st.sampled_from(["acme", "globex", "nobody", "", "%00", "a" * 300]))
        params.append(f"{key}={value}" if draw(st.integers(0, 6)) else key)
    return "&".join(params)


@st.composite
def energy(draw: st.DrawFn) -> Case:
    """GET /v1/energy/{requests/ID, usage, backends} with garbage ids, queries and keys."""
    auth = draw(auth_names)
    which = draw(st.sampled_from(["request", "usage", "usage", "backends", "other"]))
    if which == "request":
        rid = draw(st.sampled_from([KNOWN_ID, "", "x", "%00", "%2e%2e", "a/b", "%ff", "a" * 5000, _quote("🙂"),
                                    KNOWN_ID + "%20"]) | st.text(max_size=30).map(_quote))
        path, family = "/v1/energy/requests/" + rid, "energy-request"
    elif which == "usage":
        path, family = "/v1/energy/usage?" + draw(usage_query()), "energy-usage"
    elif which == "backends":
        path, family = "/v1/energy/backends" + draw(st.sampled_from(["", "?x=1", "/"])), "energy-backends"
    else:
        path, family = "/v1/energy/" + draw(st.sampled_from(["", "nope", "usage/", "requests", "requests/"])), \
            "energy-backends"
    method = draw(st.sampled_from(["GET"] * 10 + list(_METHODS)))
    body = b'{"model": "%s"}' % MODEL.encode() if method in ("POST", "PUT", "PATCH") else None
    return Case(family, request(method, path, auth_headers(auth), body), f"{method} {path[:80]} auth={auth}")


def _quote(text: str) -> str:
    return "".join(c if c.isalnum() and c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


@st.composite
def control(draw: st.DrawFn) -> Case:
    """Models, metrics and probes, with any method and key."""
    path = draw(st.sampled_from(["/v1/models", "/v1/models/" + MODEL, "/v1/models/nope", "/v1/models/",
                                 "/v1/models/%00", "/metrics", "/healthz", "/readyz", "/metrics?x=%ff"]))
    method = draw(st.sampled_from(["GET"] * 4 + list(_METHODS)))
    auth = draw(auth_names)
    family = "models" if path.startswith("/v1/models") else "probes"
    return Case(family, request(method, path, auth_headers(auth)), f"{method} {path} auth={auth}")


_TRICKS = [b"/v1/../admin", b"/v1/%2e%2e/metrics", b"/v1/%2E%2E/%2E%2E/etc/passwd", b"//v1/chat/completions",
           b"/v1//chat/completions", b"/v1/chat//completions", b"/v1/chat/completions%00", b"/v1/%00",
           b"/%ff%fe", b"/v1/models/%2F..%2F..%2Fmetrics", b"/v1/./chat/completions",
           b"/v1/chat/completions/..", b"/v1/x%3Fa=b", b"/v1/x%23frag", b"/v1/x%0d%0aX-Injected:%201",
           b"/v1/%2e%2e%2fsim/requests/x", b"/v1/x/../../health", b"/v1/x?" + b"q" * 70_000,
           b"/" + b"a" * 70_000, b"/v1/" + b"%41" * 20_000, b"/v1/\xc3\xa9t\xc3\xa9", b"/v1/x y",
           b"*", b"http://evil.example/v1/models", b"/v1/embeddings#frag", b"v1/models", b"/v1/x\x00y",
           b"/v1/chat/completions;param", b"/v1/energy/../../v1/x", b"/V1/CHAT/COMPLETIONS", b"/v1"]


@st.composite
def paths(draw: st.DrawFn) -> Case:
    """Path tricks and unknown paths, with the methods that reach them."""
    target = draw(st.sampled_from(_TRICKS) | st.text(max_size=40).map(lambda t: ("/" + _quote(t)).encode()))
    method = draw(st.sampled_from(["GET", "POST", "POST"] + list(_METHODS) + ["FOO", "CONNECT", "TRACE"]))
    auth = draw(auth_names)
    body = encode(_BASES["/v1/embeddings"]) if method in ("POST", "PUT", "PATCH") else None
    # Raw bytes outside visible ASCII, a non-origin form, or a target past the parser's limit
    # (httptools refuses ~64 KiB; 8 KiB is the usual server limit) are not accepted HTTP.
    plain = (all(33 <= b < 127 for b in target) and target.startswith(b"/") and method in _METHODS
             and len(target) <= 8192)
    return Case("paths", request(method, target, auth_headers(auth), body), f"{method} {target[:80]!r}",
                valid_http=plain, may_forward=b"#" in target)  # a raw fragment is not part of the path


_RID = [b"", b" ", b"a" * 128, b"a" * 129, b"a" * 10_000, b"\xe9t\xe9", "ключ".encode(), b"a\tb", b"a\x01b",
        b"a\x7fb", b"x-request-id", b"../../etc", b"%00", KNOWN_ID.encode(), b'"quoted"']


@st.composite
def headers(draw: st.DrawFn) -> Case:
    """Huge, duplicated, many and invalid headers on a valid chat request."""
    auth = draw(auth_names)
    extra: list[tuple[bytes, bytes]] = []
    plain = True
    for kind in draw(st.lists(st.sampled_from(["rid", "rid", "huge", "many", "dup-auth", "dup-rid", "bad-name",
                                               "bad-value", "ctype", "expect"]), min_size=1, max_size=3)):
        if kind == "rid":
            value = draw(st.sampled_from(_RID))
            extra.append((b"X-Request-Id", value))
            plain = plain and not any(b < 32 and b != 9 or b == 127 for b in value)
        elif kind == "huge":
            extra.append((b"X-Big", b"b" * draw(st.sampled_from([8 * 1024, 64 * 1024, 1 << 20]))))
        elif kind == "many":
            extra += [(b"X-H%d" % i, b"v") for i in range(draw(st.sampled_from([100, 1000, 5000])))]
        elif kind == "dup-auth":
            extra.append((b"Authorization", draw(st.sampled_from([v for v in _AUTH.values() if v]))))
        elif kind == "dup-rid":
            extra += [(b"X-Request-Id", b"first-id"), (b"X-Request-Id", b"second-id")]
        elif kind == "bad-name":
            extra.append((draw(st.sampled_from([b"X Bad", b"X:Bad", b"\xffX", b"", b"X\x00"])), b"v"))
            plain = False
        elif kind == "bad-value":
            extra.append((b"X-Bad", draw(st.sampled_from([b"a\x00b", b"a\rb", b"\xff\xfe", b"a\x0bb"]))))
            plain = False
        elif kind == "ctype":
            extra.append((b"Content-Type", draw(st.sampled_from([b"text/plain", b"application/json; charset=latin-1",
                                                                 b"multipart/form-data; boundary=x", b"\xff"]))))
        else:
            extra.append((b"Expect", b"100-continue"))
    path = draw(st.sampled_from(list(_BASES)))
    body = draw(json_body(path))
    return Case("headers", request("POST", path, auth_headers(auth) + extra, body), f"headers auth={auth}",
                valid_http=plain)


FAMILIES: dict[str, st.SearchStrategy[Case]] = {
    "chat": inference("/v1/chat/completions"),
    "completions": inference("/v1/completions"),
    "embeddings": inference("/v1/embeddings"),
    "passthrough": passthrough(),
    "energy": energy(),
    "control": control(),
    "paths": paths(),
    "headers": headers(),
}
cases: st.SearchStrategy[Case] = st.one_of(*FAMILIES.values())
