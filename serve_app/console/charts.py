"""Bar charts as inline SVG, drawn on the server: no script and nothing from the internet.

Each chart is an `<svg role="img">` with a title naming what it shows; each bar carries a
`<title>` with its label and value (a tooltip on hover). The same numbers are in the tables
beside the charts, for screen readers and for copying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH = 640
BAR_GAP = 2
LABEL_W = 160  # horizontal charts: room for the labels on the left
ROW_H = 22


@dataclass(frozen=True)
class Bar:
    label: str
    value: int


def _fmt(text: str) -> str:
    return str(escape(text))


def columns(
    title: str, bars: Sequence[Bar], shown: Callable[[int], str], height: int = 180
) -> Markup:
    """Vertical bars (e.g. one per day), with the first and last labels under the axis."""
    top = max((b.value for b in bars), default=0) or 1
    plot_h = height - 40
    step = WIDTH / max(len(bars), 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{_fmt(title)}"><title>{_fmt(title)}</title>',
        f'<text x="0" y="12" class="chart-max">{_fmt(shown(top if top > 1 else 0))}</text>',
        f'<line x1="0" y1="{plot_h + 16}" x2="{WIDTH}" y2="{plot_h + 16}" class="chart-axis"/>',
    ]
    for i, bar in enumerate(bars):
        h = round(plot_h * bar.value / top, 1)
        x = round(i * step + BAR_GAP / 2, 1)
        w = round(max(step - BAR_GAP, 1), 1)
        parts.append(
            f'<rect x="{x}" y="{round(plot_h + 16 - h, 1)}" width="{w}" height="{h}" '
            f'class="chart-bar"><title>{_fmt(bar.label)}: {_fmt(shown(bar.value))}</title></rect>'
        )
    if bars:
        parts.append(f'<text x="0" y="{height - 6}">{_fmt(bars[0].label)}</text>')
        if len(bars) > 1:
            last = _fmt(bars[-1].label)
            parts.append(f'<text x="{WIDTH}" y="{height - 6}" text-anchor="end">{last}</text>')
    else:
        parts.append(f'<text x="{WIDTH / 2}" y="{plot_h / 2}" text-anchor="middle">No usage</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def rows(title: str, bars: Sequence[Bar], shown: Callable[[int], str]) -> Markup:
    """Horizontal bars (e.g. one per model), each labelled with its name and value."""
    top = max((b.value for b in bars), default=0) or 1
    height = max(len(bars), 1) * ROW_H + 4
    room = WIDTH - LABEL_W - 110
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{_fmt(title)}"><title>{_fmt(title)}</title>'
    ]
    for i, bar in enumerate(bars):
        y = i * ROW_H + 2
        w = round(max(room * bar.value / top, 1 if bar.value else 0), 1)
        label = bar.label if len(bar.label) <= 22 else bar.label[:21] + "…"
        parts.append(
            f'<text x="0" y="{y + 15}">{_fmt(label)}</text>'
            f'<rect x="{LABEL_W}" y="{y}" width="{w}" height="{ROW_H - 6}" class="chart-bar">'
            f"<title>{_fmt(bar.label)}: {_fmt(shown(bar.value))}</title></rect>"
            f'<text x="{LABEL_W + w + 6}" y="{y + 15}">{_fmt(shown(bar.value))}</text>'
        )
    if not bars:
        parts.append('<text x="0" y="16">No usage</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
