"""Time-weighted load of one backend between two power samples. Pure; times in s."""

from __future__ import annotations

__all__ = ["LoadTracker"]


class LoadTracker:
    """Time-weighted load between two power samples: mean requests in flight, mean requests
    decoding (past their first token), output tokens emitted. Times in s."""

    __slots__ = ("in_flight", "decoding", "_since_s", "_last_s", "_area", "_dec_area", "_tokens")

    def __init__(self, t_s: float = 0.0) -> None:
        self.in_flight = 0
        self.decoding = 0
        self._since_s = self._last_s = t_s
        self._area = self._dec_area = 0.0  # request-seconds since `_since_s`
        self._tokens = 0

    def change(self, t_s: float, in_flight: int = 0, decoding: int = 0) -> None:
        """At `t_s`, `in_flight` requests were sent (+) or ended (-); `decoding` got their
        first token (+) or ended after it (-)."""
        if t_s > self._last_s:
            span_s = t_s - self._last_s
            self._area += self.in_flight * span_s
            self._dec_area += self.decoding * span_s
            self._last_s = t_s
        self.in_flight += in_flight
        self.decoding += decoding

    def tokens(self, count: int) -> None:
        """`count` output tokens were emitted (in the interval open now)."""
        self._tokens += count

    def close(self, t_s: float) -> tuple[float, float, float] | None:
        """End the interval at `t_s`: (mean in flight, mean decoding, output tokens/s); None
        for an empty interval. The next interval starts at `t_s`. A sample stamped before
        the last event (it travelled slower) closes the interval at that event instead."""
        t_s = max(t_s, self._last_s)
        span_s = t_s - self._since_s
        if span_s <= 0:
            return None
        self.change(t_s)
        result = (self._area / span_s, self._dec_area / span_s, self._tokens / span_s)
        self._since_s = self._last_s = t_s
        self._area = self._dec_area = 0.0
        self._tokens = 0
        return result
