"""The server-side SVG charts: one shape per data point, scaled to round ticks, text escaped."""
import re

from tenants.dashboard.charts import Series, _nice_ceiling, bar_chart, compact, line_chart

LABELS = ["Mon", "Tue", "Wed"]


def test_bar_chart_draws_one_bar_per_point_scaled_to_a_round_top():
    svg = bar_chart(title="Tokens", labels=LABELS, series=[Series("in", [0, 400, 800]), Series("out", [1, 2, 3])])
    bars = re.findall(r'<rect class="bar"[^>]*height="([^"]+)"[^>]*data-series="([^"]+)" data-value="([^"]+)"', svg)
    assert [(series, value) for _, series, value in bars] == [
        ("in", "0"), ("in", "400"), ("in", "800"), ("out", "1"), ("out", "2"), ("out", "3")]
    heights = [float(h) for h, _, _ in bars]
    assert heights[0] == 0 and heights[2] == 2 * heights[1]
    ticks = re.findall(r'text-anchor="end">([^<]+)</text>', svg)
    assert ticks == ["0", "200", "400", "600", "800", "1k"]  # 800 rounds up to 1000, in fifths


def test_line_chart_draws_a_line_and_a_dot_per_point():
    svg = line_chart(title="Requests", labels=LABELS, series=[Series("requests", [5, 0, 7])])
    assert svg.count('<circle class="point"') == 3 and svg.count("<polyline") == 1
    assert "<title>requests, Wed: 7</title>" in svg


def test_text_is_escaped_and_empty_data_draws_a_frame():
    svg = line_chart(title="<b>", labels=["<x>"], series=[Series("a&b", [0])])
    assert "<b>" not in svg and "&lt;x&gt;" in svg and "a&amp;b" in svg
    assert bar_chart(title="none", labels=[], series=[Series("s", [])]).startswith('<figure class="chart">')


def test_round_numbers():
    assert [_nice_ceiling(v) for v in (0, 0.4, 3, 10, 11, 260, 999)] == [1, 1, 5, 10, 20, 500, 1000]
    assert [compact(v) for v in (0, 950, 1000, 1250, 2_500_000, 3e9)] == ["0", "950", "1k", "1.2k", "2.5M", "3G"]
