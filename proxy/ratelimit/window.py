"""Rate limits as pure functions: fixed 60 s windows, the admission rule, OpenAI's headers.

A window is the minute since the epoch a request arrived in (`window_of`). Each limited scope (a
managed key, a tenant) counts requests and tokens per window; a request is admitted when, for
every scope, one more request and its estimated tokens fit. Fixed windows let a client send up
to twice a limit across a minute boundary; in exchange each check is one counter read and write
per scope in any store, and the reset time is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

WINDOW_S = 60
#: Completion tokens a request without max_tokens counts on admission (corrected when it ends).
DEFAULT_COMPLETION_TOKENS = 256

Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class RateScope:
    """One set of limits a request counts against: a managed key's or a tenant's.

    `id` names its counters in the store (`key:<id>` or `tenant:<name>`); None limits are off."""

    id: str
    tenant: str
    rpm: int | None = None
    tpm: int | None = None

    @property
    def level(self) -> str:
        """`key` or `tenant`: which kind of scope this is (a metric label)."""
        return self.id.partition(":")[0]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The limit a request would break: which scope (index into the scopes) and which kind."""

    index: int
    kind: Kind
    too_large: bool  # the request alone is over the token limit: waiting will not help


def window_of(now_s: float) -> int:
    """The fixed window (minutes since the epoch) `now_s` falls in."""
    return int(now_s // WINDOW_S)


def reset_s(window: int, now_s: float) -> float:
    """Seconds from `now_s` until `window` ends and its counts start again from zero."""
    return max((window + 1) * WINDOW_S - now_s, 0.0)


def token_estimate(prompt_tokens: int, max_tokens: int | None) -> int:
    """Tokens a request counts on admission: its prompt and the most it may generate."""
    return prompt_tokens + (DEFAULT_COMPLETION_TOKENS if max_tokens is None else max_tokens)


def refusal(scopes: Sequence[RateScope], counts: Sequence[tuple[int, int]], tokens: int) -> Refusal | None:
    """The first limit one more request of `tokens` would break, given each scope's (requests,
    tokens) in the window so far; None: admit it. The Redis script applies the same rule."""
    for i, (scope, (requests, used)) in enumerate(zip(scopes, counts, strict=True)):
        if scope.rpm is not None and requests + 1 > scope.rpm:
            return Refusal(i, "requests", False)
        if scope.tpm is not None and used + tokens > scope.tpm:
            return Refusal(i, "tokens", tokens > scope.tpm)
    return None


def go_duration(seconds: float) -> str:
    """A duration the way OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1s`,
    `17.5s`, `6m0s` (Go's time.Duration format, to the millisecond)."""
    ms = max(math.ceil(seconds * 1000), 0)
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def limit_headers(scopes: Sequence[RateScope], counts: Sequence[tuple[int, int]],
                  reset_in_s: float, retry_after: bool = True) -> list[tuple[bytes, bytes]]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (and `retry-after`, for a
    refusal) for the counts after a decision: per kind, the scope with the least left (the
    binding one)."""
    headers: list[tuple[bytes, bytes]] = []
    reset = go_duration(reset_in_s).encode()
    for kind, slot in (("requests", 0), ("tokens", 1)):
        tightest: tuple[int, int] | None = None  # (remaining, limit)
        for scope, count in zip(scopes, counts, strict=True):
            limit = scope.rpm if slot == 0 else scope.tpm
            if limit is not None:
                left = (max(limit - count[slot], 0), limit)
                tightest = left if tightest is None or left < tightest else tightest
        if tightest is not None:
            headers += [(f"x-ratelimit-limit-{kind}".encode(), str(tightest[1]).encode()),
                        (f"x-ratelimit-remaining-{kind}".encode(), str(tightest[0]).encode()),
                        (f"x-ratelimit-reset-{kind}".encode(), reset)]
    if retry_after:
        headers.append((b"retry-after", str(max(math.ceil(reset_in_s), 1)).encode()))
    return headers
