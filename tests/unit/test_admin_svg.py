"""The admin page's server-rendered SVG: well-formed, inside its viewBox, sensibly scaled."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from resillm.admin import svg
from resillm.admin.svg import Series, chart, nice_ceiling, progress_bar, scale_top

NS = "{http://www.w3.org/2000/svg}"


def parse(text: str) -> ET.Element:
    root = ET.fromstring(text)  # raises on anything not well-formed
    assert root.tag == f"{NS}svg"
    return root


def view_box(root: ET.Element) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in root.attrib["viewBox"].split())
    return x, y, w, h


def bar_heights(root: ET.Element) -> list[float]:
    return [
        float(r.attrib["height"])
        for r in root.iter(f"{NS}rect")
        if r.find(f"{NS}title") is not None
    ]


def assert_inside(root: ET.Element) -> None:
    x0, y0, width, height = view_box(root)
    for rect in root.iter(f"{NS}rect"):
        x, y = float(rect.attrib.get("x", 0)), float(rect.attrib.get("y", 0))
        w, h = float(rect.attrib["width"]), float(rect.attrib["height"])
        assert x0 <= x and x + w <= x0 + width + 1e-6, rect.attrib
        assert y0 <= y and y + h <= y0 + height + 1e-6, rect.attrib
    for path in root.iter(f"{NS}path"):
        points = re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)", path.attrib["d"])
        assert points
        for px, py in ((float(x), float(y)) for x, y in points):
            assert x0 <= px <= x0 + width + 0.2 and y0 <= py <= y0 + height, (px, py)


def test_an_empty_chart_is_valid_and_says_so() -> None:
    root = parse(chart([Series("r", [], "requests")], label="r", fmt=str, bars=True))
    assert "no requests yet" in "".join(root.itertext())
    assert bar_heights(root) == []
    zeros = parse(chart([Series("r", [0.0] * 180, "requests")], label="r", fmt=str, bars=True))
    assert bar_heights(zeros) == []
    assert_inside(zeros)


def test_lines_with_no_data_at_all_draw_nothing() -> None:
    root = parse(chart([Series("p50", [None] * 180, "p50")], label="l", fmt=str))
    assert list(root.iter(f"{NS}path")) == []


def test_bars_scale_to_a_round_top_above_the_peak() -> None:
    values = [float(v) for v in range(1, 11)]
    root = parse(chart([Series("r", values, "requests")], label="r", fmt=str, bars=True))
    heights = bar_heights(root)
    assert len(heights) == 10
    assert heights == sorted(heights)
    assert heights[-1] == pytest.approx(svg.PLOT_H)  # 10 of a top of 10
    assert heights[4] == pytest.approx(svg.PLOT_H / 2)
    assert_inside(root)


def test_one_spike_does_not_flatten_the_rest() -> None:
    values = [2.0, 3.0, 2.5, 3.0, 2.0, 2.0, 3.0, 2.5, 1000.0, 3.0]
    text = chart([Series("r", values, "requests")], label="r", fmt=str, bars=True)
    root = parse(text)
    heights = bar_heights(root)
    assert min(heights) > svg.PLOT_H / 4  # the ordinary values keep a readable height
    assert max(heights) == pytest.approx(svg.PLOT_H)  # the spike is clipped at the top
    assert 'class="clipped"' in text
    assert_inside(root)


def test_tiny_values_beside_big_ones_stay_visible() -> None:
    values = [100.0, 0.01, 100.0, 0.0, 100.0]
    heights = bar_heights(parse(chart([Series("r", values, "x")], label="r", fmt=str, bars=True)))
    assert len(heights) == 4  # zero draws no bar
    assert min(heights) >= svg.MIN_VISIBLE


def test_lines_break_at_gaps_and_show_lone_points() -> None:
    values: list[float | None] = [0.1, 0.2, None, None, 0.3, None, 0.15, 0.12]
    root = parse(chart([Series("p50", values, "p50")], label="l", fmt=str))
    (path,) = list(root.iter(f"{NS}path"))
    d = path.attrib["d"]
    assert d.count("M") == 3  # three runs: [0.1, 0.2], [0.3], [0.15, 0.12]
    assert "h0.1" in d  # each run starts with a dot, so the lone 0.3 is visible
    assert_inside(root)


def test_line_values_stay_inside_even_when_extreme() -> None:
    values: list[float | None] = [1e-9, 5.0, float("inf"), 1e9, 0.0, -3.0, 2.0, 2.1, 1.9, 2.2]
    assert_inside(parse(chart([Series("p99", values, "p99")], label="l", fmt=str)))


def test_axis_labels_come_from_the_format() -> None:
    text = chart([Series("r", [1.0, 4.0], "r")], label="r", fmt=lambda v: f"{v:g} req/s")
    labels = [t.text for t in parse(text).iter(f"{NS}text")]
    assert labels[:3] == ["0 req/s", "2.5 req/s", "5 req/s"]
    assert labels[-1] == "now"


def test_labels_and_tooltips_are_escaped() -> None:
    text = chart(
        [Series("<b>", [1.0], 'x" onload="alert(1)')],
        label="<script>",
        fmt=lambda v: "<&>",
        bars=True,
        tips=["<img src=x>"],
    )
    root = parse(text)
    assert "<script>" not in text and "<img" not in text and 'onload="' not in text
    assert root.attrib["aria-label"] == "<script>"


@pytest.mark.parametrize(
    ("value", "top"),
    [(0.0, 1.0), (-1.0, 1.0), (0.3, 0.5), (1.0, 1.0), (1.01, 2.0), (2.2, 2.5), (7.0, 10.0),
     (0.0042, 0.005), (240.0, 250.0)],
)  # fmt: skip
def test_nice_ceiling(value: float, top: float) -> None:
    assert nice_ceiling(value) == pytest.approx(top)


def test_scale_top_of_nothing_is_one() -> None:
    assert scale_top([]) == 1.0
    assert scale_top([None, 0.0]) == 1.0


def test_progress_bar_is_clamped_and_valid() -> None:
    for fraction, width in ((-1.0, 0.0), (0.425, 42.5), (1.0, 100.0), (7.0, 100.0)):
        root = parse(progress_bar(fraction, css="ok", label="a < b"))
        fill = [r for r in root.iter(f"{NS}rect") if r.attrib.get("class") == "fill"]
        assert float(fill[0].attrib["width"]) == pytest.approx(width)
        assert_inside(root)
