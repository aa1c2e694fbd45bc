"""What the proxy remembers of one finished request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    """One request as served: who, where, how many tokens, when (wall-clock seconds)."""

    request_id: str
    tenant: str
    model: str
    kind: str  # chat | completion | embedding | other
    stream: bool
    start_s: float
    backend: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False  # False: tokens were counted from deltas or estimated
    first_token_s: float | None = None
    end_s: float | None = None
    error: str | None = None
