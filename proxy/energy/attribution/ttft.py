"""Time to first token against prompt length, fitted online from a backend's streams.

A non-streamed request shows no first token; where its prefill lay in time is guessed from the
TTFT recent streams of similar prompt length saw on the same backend (a line in prompt length,
older streams forgotten geometrically).

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math

__all__ = ["TtftFit"]

_KTOK = 1000.0  # prompt lengths in thousands of tokens: well-conditioned sums
_KEEP = 0.98  # per observed stream: weight kept by older observations


class TtftFit:
    """Least-squares line TTFT (s) ~ prompt tokens, forgotten sums of 1, L, L^2, ttft, L*ttft."""

    __slots__ = ("_sums",)

    def __init__(self) -> None:
        self._sums = [0.0] * 5

    def observe(self, prompt_tokens: int, ttft_s: float) -> None:
        """A stream of this prompt length saw its first token `ttft_s` after it was sent."""
        n, sums = prompt_tokens / _KTOK, self._sums
        for i, v in enumerate((1.0, n, n * n, ttft_s, n * ttft_s)):
            sums[i] = sums[i] * _KEEP + v

    @property
    def sums(self) -> list[float]:
        """The forgotten sums (1, L, L^2, ttft, L*ttft), for saving the fit."""
        return list(self._sums)

    @sums.setter
    def sums(self, values: list[float]) -> None:
        if len(values) != 5 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError("TtftFit sums: five finite numbers")
        self._sums = [float(v) for v in values]

    @property
    def seen(self) -> bool:
        return self._sums[0] > 0

    def ttft_s(self, prompt_tokens: int) -> float:
        """Expected TTFT (s) for a prompt this long; 0 before any stream was seen."""
        s0, s1, s2, sy, sxy = self._sums
        if s0 <= 0:
            return 0.0
        n = prompt_tokens / _KTOK
        det = s0 * s2 - s1 * s1
        if det <= 1e-9 * s0 * s0:  # one prompt length so far: the mean
            return max(0.0, sy / s0)
        slope = max(0.0, (s0 * sxy - s1 * sy) / det)
        return max(0.0, (sy - slope * s1) / s0 + slope * n)
