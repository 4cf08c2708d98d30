"""Server-rendered inline SVG: the admin page's charts and progress bars.

No styles in here (the page's Content-Security-Policy forbids inline ones): shapes carry
classes that ``admin.css`` colours, and geometry is plain attributes. Every coordinate is
clamped inside the ``viewBox``.

Scaling: the top of a chart is a round number just above the data. One spike must not
flatten the rest: when the peak is far above the 90th percentile of the other columns, the
top follows that percentile instead, the spike is drawn clipped (to the top, marked) with
its value in its tooltip and in the chart's ``peak`` figure, and any column above zero
keeps at least ``MIN_VISIBLE`` of height.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 600.0, 150.0
LEFT, RIGHT, TOP, BOTTOM = 46.0, 8.0, 8.0, 18.0
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
MIN_VISIBLE = 1.5  # a non-zero value is never drawn flatter than this
SPIKE_RATIO = 4.0  # a peak this far above the 90th percentile is clipped
Format = Callable[[float], str]


@dataclass(frozen=True)
class Series:
    """One data series: ``values`` per column (None: no data), drawn with ``css``."""

    name: str
    values: Sequence[float | None]
    css: str


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 (times a power of ten) at or above ``value``."""
    if not value > 0 or math.isinf(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10.0 * power


def scale_top(values: Sequence[float | None]) -> float:
    """The chart's top: a round number above the data, or above its 90th percentile when
    one spike towers over everything else."""
    positive = sorted(v for v in values if v is not None and v > 0 and math.isfinite(v))
    if not positive:
        return 1.0
    peak = positive[-1]
    if len(positive) >= 5:
        reference = positive[int(0.9 * (len(positive) - 1))]
        if peak > SPIKE_RATIO * reference:
            return nice_ceiling(reference * 1.5)
    return nice_ceiling(peak)


def _y(value: float, top: float) -> float:
    """The y coordinate of ``value``: clamped to the plot, non-zero never flat."""
    if not value > 0:
        return TOP + PLOT_H
    height = min(value, top) / top * PLOT_H
    return TOP + PLOT_H - max(height, MIN_VISIBLE)


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def chart(
    series: Sequence[Series],
    *,
    label: str,
    fmt: Format,
    x_labels: Sequence[str] = ("\u221215m", "\u221210m", "\u22125m", "now"),
    bars: bool = False,
    tips: Sequence[str] | None = None,
) -> str:
    """A chart of one or more series over the same columns: bars for the first series
    when ``bars``, else lines (gaps where a value is None)."""
    columns = max((len(s.values) for s in series), default=0)
    top = scale_top([v for s in series for v in s.values])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH:g} '
        f'{HEIGHT:g}" role="img" aria-label="{escape(label)}">',
        _grid(top, fmt, x_labels),
    ]
    for index, one in enumerate(series):
        if bars and index == 0:
            parts.append(_bars(one, top, columns, tips))
        else:
            parts.append(_line(one, top, columns))
    if columns == 0 or not any(v for s in series for v in s.values):
        parts.append(
            f'<text class="empty" x="{LEFT + PLOT_W / 2:g}" y="{TOP + PLOT_H / 2:g}" '
            'text-anchor="middle">no requests yet</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _grid(top: float, fmt: Format, x_labels: Sequence[str]) -> str:
    bottom = TOP + PLOT_H
    out = [f'<g class="grid"><rect class="plot" x="{LEFT:g}" y="{TOP:g}" width="{PLOT_W:g}" '
           f'height="{PLOT_H:g}"/>']  # fmt: skip
    for fraction in (0.0, 0.5, 1.0):
        y = bottom - fraction * PLOT_H
        out.append(f'<line x1="{LEFT:g}" y1="{y:g}" x2="{LEFT + PLOT_W:g}" y2="{y:g}"/>')
        out.append(
            f'<text class="axis" x="{LEFT - 4:g}" y="{y + 3:g}" text-anchor="end">'
            f"{escape(fmt(top * fraction))}</text>"
        )
    for i, text in enumerate(x_labels):
        x = LEFT + PLOT_W * i / max(1, len(x_labels) - 1)
        anchor = "start" if i == 0 else "end" if i == len(x_labels) - 1 else "middle"
        out.append(
            f'<text class="axis" x="{x:g}" y="{HEIGHT - 4:g}" text-anchor="{anchor}">'
            f"{escape(text)}</text>"
        )
    out.append("</g>")
    return "".join(out)


def _bars(series: Series, top: float, columns: int, tips: Sequence[str] | None) -> str:
    width = PLOT_W / max(1, columns)
    bottom = TOP + PLOT_H
    out = [f'<g class="bars {escape(series.css)}">']
    for i, value in enumerate(series.values):
        if value is None or not value > 0:
            continue
        y = _y(value, top)
        x = LEFT + i * width
        css = ' class="clipped"' if value > top else ""
        tip = tips[i] if tips is not None and i < len(tips) else _num(value)
        out.append(
            f'<rect{css} x="{x:.2f}" y="{y:.2f}" '
            f'width="{max(width - 0.6, 0.6):.2f}" height="{bottom - y:.2f}">'
            f"<title>{escape(tip)}</title></rect>"
        )
    out.append("</g>")
    return "".join(out)


def _line(series: Series, top: float, columns: int) -> str:
    width = PLOT_W / max(1, columns)
    commands: list[str] = []
    pen_down = False
    for i, value in enumerate(series.values):
        if value is None:
            pen_down = False
            continue
        x, y = LEFT + (i + 0.5) * width, _y(value, top)
        # A lone point (gaps on both sides) still shows: a tiny segment with a round cap.
        commands.append(f"L{x:.2f} {y:.2f}" if pen_down else f"M{x:.2f} {y:.2f}h0.1")
        pen_down = True
    if not commands:
        return ""
    return (
        f'<path class="line {escape(series.css)}" d="{" ".join(commands)}">'
        f"<title>{escape(series.name)}</title></path>"
    )


def progress_bar(fraction: float, *, css: str, label: str) -> str:
    """A horizontal bar filled to ``fraction`` (clamped to 0..1), as SVG: a CSP that
    forbids inline styles rules out ``style="width: ..%"``."""
    filled = max(0.0, min(1.0, fraction)) * 100.0
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="progress {escape(css)}" '
        f'viewBox="0 0 100 6" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(label)}"><rect class="track" width="100" height="6" rx="3"/>'
        f'<rect class="fill" width="{filled:.2f}" height="6" rx="3"/></svg>'
    )
