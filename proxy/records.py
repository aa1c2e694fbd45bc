"""What the proxy remembers of one finished request."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.ratelimit.limiter import RateTicket
    from proxy.telemetry import SpanStart


@dataclass(slots=True)
class RequestRecord:
    """One request as served: who, where, how many tokens, when (wall-clock seconds)."""

    request_id: str
    tenant: str
    model: str
    kind: str  # chat | completion | embedding | response | other
    stream: bool
    start_s: float
    # Not streamed to the client but asked upstream as a stream and gathered (proxy/gather.py):
    # its tokens were timed as a stream's.
    gathered: bool = False
    backend: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False  # False: tokens were counted from deltas or estimated
    reasoning_tokens: int = 0  # of completion_tokens, when the engine reports them
    prompt_estimate: int = 0  # prompt tokens guessed before the answer (routing, the meter)
    first_token_s: float | None = None
    end_s: float | None = None
    error: str | None = None
    joules: float | None = None  # attributed energy; None where the backend has no power source
    energy_method: str | None = None  # measured | estimated
    # What was left when the request started of its budgets in joules (the least of its
    # tenant's and its managed key's), and of those in grams CO2e; None: no such budget.
    budget_left_j: float | None = None
    budget_left_g: float | None = None
    key_subject: str = ""  # its managed key's budget subject, where that key has a budget
    # Carbon (proxy/carbon.py): host J billed like GPU J, (GPU + host) x PUE, and grams CO2e
    # of that at the site's grid intensity; None where unknown.
    host_joules: float | None = None
    joules_all_in: float | None = None
    gco2e: float | None = None
    site: str | None = None
    # The proxy's own id for this request, unique per request served: the meter's, the
    # accounting's and the ledger's key. `request_id` is the client's x-request-id when it sent
    # one, which any client may repeat or copy from another tenant, so it keys nothing inside.
    key: str = field(default_factory=lambda: os.urandom(12).hex())
    # Its span's ids, taken before it went upstream; None while tracing is off (proxy/telemetry.py).
    trace: SpanStart | None = None
    # Its tokens as counted by a token-per-minute limit, corrected when it ends; None: no such
    # limit applies (proxy/ratelimit/).
    rate: RateTicket | None = None
    rate_headers: list[tuple[bytes, bytes]] | None = None  # x-ratelimit-* for an admitted answer

    @property
    def billed_tokens(self) -> int:
        """The tokens tokens-per-joule counts: prompt tokens for embeddings, else completion."""
        return self.prompt_tokens if self.kind == "embedding" else self.completion_tokens

    def energy(self) -> dict[str, float | str] | None:
        """The contract's energy object for this request, if it has one."""
        if self.joules is None or self.energy_method is None:
            return None
        tpj = self.billed_tokens / self.joules if self.joules > 0 else 0.0
        out: dict[str, float | str] = {"joules": self.joules, "tokens_per_joule": tpj,
                                       "backend": self.backend or "", "method": self.energy_method}
        if self.joules_all_in is not None:
            out["joules_all_in"] = self.joules_all_in
        if self.gco2e is not None:
            out["gco2e"] = self.gco2e
        return out
