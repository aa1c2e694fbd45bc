"""One request's attribution: its state while unsettled, its estimate, its final value."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Estimate", "Final", "Method", "RequestState"]

Method = Literal["measured", "estimated"]


@dataclass(slots=True, frozen=True)
class Estimate:
    """A request's joules as known when it closes; `measured` only if nothing was guessed."""

    joules: float
    method: Method


@dataclass(slots=True, frozen=True)
class Final:
    """A request's settled attribution: joules and what it was computed from (times in s)."""

    request_id: str
    joules: float
    prompt_tokens: int
    completion_tokens: int
    start_s: float
    first_token_s: float | None
    end_s: float
    # `estimated` only where weights had to be guessed (forced) or samples never covered it.
    method: Method = "measured"
    host_joules: float = 0.0  # host (CPU, DRAM) joules split like the GPU's; 0 without a host timeline


@dataclass(slots=True)
class RequestState:
    """One request's attribution state while any of its energy is unsettled."""

    request_id: str
    stream: bool
    start_s: float
    prompt_tokens: int
    first_token_s: float | None = None
    end_s: float | None = None  # None while open
    embedding: bool = False  # an embedding request: its prompt weighs as an encoder pass
    completion_tokens: int = 0
    prefill_density: float | None = None  # weight/s on [prefill_from_s, first]; None: not yet
    prefill_from_s: float = 0.0  # a stream's prefill lies after this (>= start_s)
    flat_density: float | None = None  # weight/s on [start, end] (non-streamed); None: open
    # Non-streamed, once closed, where the step clock saw steps: prefill weight on
    # [start, decode_from_s], decode weight over the steps seen on [decode_from_s, end]
    # (`decode_steps` of them). None: spread flat at `flat_density`.
    placed: tuple[float, float, float, float] | None = None  # (decode_from_s, prefill, decode, steps)
    arrivals: deque[tuple[float, float]] = field(default_factory=deque)  # unsettled (t_s, weight)
    pending_tokens: float = 0.0  # sum of weights in `arrivals`
    timed: bool = False  # a chunk after the first came: its TTFT is a real one
    emitted: int = 0  # tokens seen so far: the next one's context is prompt + this
    last_token_s: float | None = None  # when its latest tokens came (`arrivals` is drained)
    joules: float = 0.0  # settled share so far
    host_joules: float = 0.0  # settled host share so far (Attributor.host)
    guessed: bool = False  # a forced interval used provisional weights for it
    key: str = ""  # its key in `Attributor._requests` (the id, unless a namesake is settling)
    final: Final | None = None  # once settled
    leaving: bool = False  # its end lies in a weighed interval: it settles when that is split
