"""Compensated (Neumaier) running sums: a large total never swallows a tiny increment."""

from __future__ import annotations

__all__ = ["ZERO", "neumaier", "span"]

#: An empty running sum: (total, compensation).
ZERO = (0.0, 0.0)


def neumaier(total: float, comp: float, x: float) -> tuple[float, float]:
    """Compensated addition: (total, compensation) after adding `x`."""
    t = total + x
    if abs(total) >= abs(x):
        comp += (total - t) + x
    else:
        comp += (x - t) + total
    return t, comp


def span(start: tuple[float, float], end: tuple[float, float]) -> float:
    """Difference of two compensated running sums."""
    return (end[0] - start[0]) + (end[1] - start[1])
