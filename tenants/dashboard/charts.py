"""Bar and line charts drawn on the server as inline SVG.

The dashboard must work offline (no CDN) and be testable without running JavaScript, so a chart
is plain markup: one `rect.bar` or `circle.point` per data point, each with `data-value` and a
`<title>` that browsers show as its tooltip.
"""
from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 14, 26  # room for the y tick labels and the x labels
PALETTE = ("#4f6bed", "#1fa39a", "#e08a3c", "#d64550")
MAX_X_LABELS = 7


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float]


def bar_chart(*, labels: Sequence[str], series: Sequence[Series], title: str) -> SafeString:
    """Grouped bars: one group per label, one bar per series within it."""
    frame = _Frame(labels, series)
    group = frame.step * 0.8
    width = group / len(series)
    shapes = []
    for index, one in enumerate(series):
        for position, (label, value) in enumerate(zip(labels, one.values)):
            x = frame.x_slot(position) - group / 2 + index * width
            top = frame.y(value)
            shapes.append(
                f'<rect class="bar" x="{x:.1f}" y="{top:.1f}" width="{width * 0.92:.1f}" '
                f'height="{frame.y(0) - top:.1f}" rx="1.5" fill="{_color(index)}" '
                f'data-series="{escape(one.name)}" data-value="{value:g}">'
                f"<title>{escape(one.name)}, {escape(label)}: {value:,.0f}</title></rect>"
            )
    return frame.render(title, shapes)


def line_chart(*, labels: Sequence[str], series: Sequence[Series], title: str) -> SafeString:
    """One line per series, with a dot on each data point."""
    frame = _Frame(labels, series)
    shapes = []
    for index, one in enumerate(series):
        points = [(frame.x_slot(i), frame.y(value)) for i, value in enumerate(one.values)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        shapes.append(f'<polyline fill="none" stroke="{_color(index)}" stroke-width="2" points="{path}"/>')
        shapes += [
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{_color(index)}" '
            f'data-series="{escape(one.name)}" data-value="{value:g}">'
            f"<title>{escape(one.name)}, {escape(label)}: {value:,.0f}</title></circle>"
            for (x, y), label, value in zip(points, labels, one.values)
        ]
    return frame.render(title, shapes)


def compact(value: float) -> str:
    """1234 -> "1.2k", 5_600_000 -> "5.6M": tick labels stay short."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:g}"


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= value, so ticks are round numbers."""
    if value <= 0:
        return 1.0
    scale = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1
    for step in (1, 2, 5, 10):
        if step * scale >= value:
            return float(step * scale)
    return float(10 * scale)


class _Frame:
    """The plot area shared by both chart kinds: scales, grid lines, axis labels and legend."""

    def __init__(self, labels: Sequence[str], series: Sequence[Series]):
        self.labels = labels
        self.series = series
        self.top_value = _nice_ceiling(max((v for s in series for v in s.values), default=0))
        self.step = (WIDTH - LEFT - RIGHT) / max(len(labels), 1)

    def x_slot(self, position: int) -> float:
        """The centre of the `position`-th label's slot."""
        return LEFT + self.step * (position + 0.5)

    def y(self, value: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - value / self.top_value)

    def render(self, title: str, shapes: list[str]) -> SafeString:
        grid = []
        # 1 and 5 split into fifths, 2 into quarters: every tick is a round number.
        divisions = 4 if str(int(self.top_value)).startswith("2") else 5
        for tick in range(divisions + 1):
            value = self.top_value * tick / divisions
            y = self.y(value)
            grid.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                        f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{compact(value)}</text>')
        every = -(-len(self.labels) // MAX_X_LABELS)  # ceiling division
        grid += [
            f'<text x="{self.x_slot(i):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{escape(label)}</text>'
            for i, label in enumerate(self.labels) if (len(self.labels) - 1 - i) % every == 0
        ]
        legend = "".join(
            f'<span><i style="background:{_color(i)}"></i>{escape(s.name)}</span>'
            for i, s in enumerate(self.series)
        )
        return mark_safe(
            f'<figure class="chart"><figcaption>{escape(title)}<span class="legend">{legend}</span>'
            f'</figcaption><svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
            f'{"".join(grid)}{"".join(shapes)}</svg></figure>'
        )
