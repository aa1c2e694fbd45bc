"""Which `POST /v1/...` routes besides the proxy's own are relayed to a backend: an allowlist.

An inference engine serves more than inference under `/v1/` (vLLM: `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, and with dev mode `/v1/sleep`, `/v1/reset_prefix_cache`...), and the
relay sends the backend's own key with them. Only the routes named here are relayed; any other
path is the proxy's 404 and never leaves it. `server.passthrough` in the config changes the list:
a list of paths replaces it, `{add: [...], remove: [...]}` edits it.
"""

from __future__ import annotations

import re

#: OpenAI-style inference routes relayed by default (chat/completions, completions and
#: embeddings are the proxy's own routes and always served).
DEFAULT_PASSTHROUGH: tuple[str, ...] = (
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/moderations",
    "/v1/rerank",
    "/v1/score",
    "/v1/tokenize",
    "/v1/detokenize",
)

#: A path that may be listed: `/v1/` and plain segments, at most 1 KiB. The path is appended
#: to the backend's URL, so a dot segment (`/v1/../metrics`) would reach the engine's non-API
#: routes, and `?`, `#` or control characters would change the URL.
PATH_RE = re.compile(r"/v1(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9._~@:,=+-]+){1,16}")
MAX_PATH_BYTES = 1024


def check_path(path: str) -> str:
    """`path` if it may be passed through, else ValueError saying why."""
    if len(path) > MAX_PATH_BYTES or not PATH_RE.fullmatch(path):
        raise ValueError(f"{path!r} is not a /v1/... path of plain segments")
    return path


def resolve(replace: list[str] | None, add: list[str], remove: list[str]) -> frozenset[str]:
    """The allowlist: `replace` (or the default) plus `add`, less `remove`."""
    base = DEFAULT_PASSTHROUGH if replace is None else replace
    return frozenset(check_path(p) for p in (*base, *add)) - set(remove)
