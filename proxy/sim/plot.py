"""Hand-written SVG charts for `joulegate simulate --plot` and bench/routing (no matplotlib).

Two shapes: grouped bars (one value per policy, a single trace) and lines (a value per policy
against offered load, a sweep). Plain SVG 1.1 with inline styles; opens in any browser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from xml.sax.saxutils import escape

__all__ = ["svg_bars", "svg_lines"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_W, _H = 720, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 170, 40, 60


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"


def _frame(title: str, x_label: str, y_label: str, y_ticks: list[float],
           y_of: Callable[[float], float]) -> list[str]:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_W}" height="{_H}" fill="white"/>',
        f'<text x="{_W / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<text x="{_LEFT + (_W - _LEFT - _RIGHT) / 2}" y="{_H - 15}" '
        f'text-anchor="middle">{escape(x_label)}</text>',
        f'<text transform="translate(18,{_TOP + (_H - _TOP - _BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>',
    ]
    for t in y_ticks:
        y = y_of(t)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<line x1="{_LEFT}" y1="{_H - _BOTTOM}" x2="{_W - _RIGHT}" y2="{_H - _BOTTOM}" '
               f'stroke="black"/>')
    out.append(f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_H - _BOTTOM}" stroke="black"/>')
    return out


def _legend(names: Sequence[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        y = _TOP + 10 + 20 * i
        colour = _COLOURS[i % len(_COLOURS)]
        out.append(f'<rect x="{_W - _RIGHT + 15}" y="{y - 9}" width="12" height="12" '
                   f'fill="{colour}"/>')
        out.append(f'<text x="{_W - _RIGHT + 33}" y="{y + 1}">{escape(name)}</text>')
    return out


def svg_bars(values: Mapping[str, float], *, title: str = "", y_label: str = "") -> str:
    """One bar per name (e.g. tokens/J per policy on one trace)."""
    names = list(values)
    top = max([*values.values(), 0.0])
    ticks = _nice_ticks(0.0, top or 1.0)
    span = ticks[-1] or 1.0
    plot_h = _H - _TOP - _BOTTOM

    def y_of(v: float) -> float:
        return _H - _BOTTOM - plot_h * v / span

    out = _frame(title, "policy", y_label, ticks, y_of)
    slot = (_W - _LEFT - _RIGHT) / max(len(names), 1)
    for i, name in enumerate(names):
        v = values[name]
        x = _LEFT + slot * i + slot * 0.2
        colour = _COLOURS[i % len(_COLOURS)]
        out.append(f'<rect x="{x:.1f}" y="{y_of(v):.1f}" width="{slot * 0.6:.1f}" '
                   f'height="{_H - _BOTTOM - y_of(v):.1f}" fill="{colour}"/>')
        out.append(f'<text x="{x + slot * 0.3:.1f}" y="{y_of(v) - 5:.1f}" '
                   f'text-anchor="middle">{v:.3g}</text>')
        out.append(f'<text x="{x + slot * 0.3:.1f}" y="{_H - _BOTTOM + 16}" '
                   f'text-anchor="middle">{escape(name)}</text>')
    out += _legend(names)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def svg_lines(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "",
              x_label: str = "", y_label: str = "") -> str:
    """One line with markers per name through its (x, y) points (e.g. tokens/J vs load)."""
    names = list(series)
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    x_ticks = _nice_ticks(min(xs), max(xs))
    y_ticks = _nice_ticks(0.0, max(ys))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    x_lo, x_span = x_ticks[0], (x_ticks[-1] - x_ticks[0]) or 1.0
    y_span = y_ticks[-1] or 1.0

    def x_of(v: float) -> float:
        return _LEFT + plot_w * (v - x_lo) / x_span

    def y_of(v: float) -> float:
        return _H - _BOTTOM - plot_h * v / y_span

    out = _frame(title, x_label, y_label, y_ticks, y_of)
    for t in x_ticks:
        out.append(f'<text x="{x_of(t):.1f}" y="{_H - _BOTTOM + 16}" '
                   f'text-anchor="middle">{_fmt(t)}</text>')
    for i, name in enumerate(names):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = sorted(series[name])
        path = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{colour}"/>')
    out += _legend(names)
    out.append("</svg>")
    return "\n".join(out) + "\n"
