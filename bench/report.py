"""The table: every figure of the issue's targets, per gateway variant, against direct.

Each row compares a gateway variant (server/features) with the direct run of the same
bench: a ratio (throughput), an added amount (latencies, chunk gaps) or the gateway's own
figure (CPU per request, RSS); the result column says PASS or FAIL against the target
(informational: the bench's exit code does not depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from loadgen import THROUGHPUT_CONCURRENCY, Figures

Compare = Literal["ratio", "added", "own"]
ALL_VS_BARE_SLACK = 0.20
ALL_VS_BARE = (  # the targeted figures, compared between the feature sets
    "throughput_ratio",
    "cpu_ms_per_request",
    "latency_p50_added_ms",
    "ttft_c1_p50_added_ms",
    "held_completed",
    "held_gap_p99_added_ms",
    "peak_rss_mb",
)


@dataclass(frozen=True)
class Row:
    label: str
    key: str  # its name in the JSON document
    value: Callable[[Figures], float]
    compare: Compare
    digits: int
    target: str = "-"
    check: Callable[[float], bool] | None = None  # on the compared value
    higher_is_better: bool = False  # for all vs bare


def errors(figures: Figures) -> float:
    """Failed requests and streams, of every phase (held streams not completed included)."""
    dropped = figures.held_streams - figures.held_completed
    return float(
        figures.throughput_errors + figures.latency_errors + figures.stream_errors + dropped
    )


def rows(held: int) -> list[Row]:
    return [
        Row(
            f"throughput c={THROUGHPUT_CONCURRENCY} (req/s)",
            "throughput_ratio",
            lambda f: f.rps,
            "ratio",
            0,
            ">= 0.12x",
            lambda v: v >= 0.12,
            higher_is_better=True,
        ),
        Row(
            "CPU per request (ms; mock when direct)",
            "cpu_ms_per_request",
            lambda f: f.server_cpu_ms_per_request,
            "own",
            3,
            "<= 1.0",
            lambda v: v <= 1.0,
        ),
        Row("CPU busy in throughput (% of 1)", "cpu_busy_pct", _busy, "own", 0),
        Row(
            "latency c=1 p50 (ms)",
            "latency_p50_added_ms",
            lambda f: f.latency_p50_ms,
            "added",
            2,
            "<= +0.70",
            lambda v: v <= 0.7,
        ),
        Row("latency c=1 p99 (ms)", "latency_p99_added_ms", lambda f: f.latency_p99_ms, "added", 2),
        Row(
            "stream TTFT c=1 p50 (ms)",
            "ttft_c1_p50_added_ms",
            lambda f: f.ttft_c1_p50_ms,
            "added",
            2,
            "<= +1.00",
            lambda v: v <= 1.0,
        ),
        Row(
            "stream TTFT c=1 p99 (ms)",
            "ttft_c1_p99_added_ms",
            lambda f: f.ttft_c1_p99_ms,
            "added",
            2,
        ),
        Row(
            "stream TTFT c=8 p50 (ms)",
            "ttft_c8_p50_added_ms",
            lambda f: f.ttft_c8_p50_ms,
            "added",
            2,
        ),
        Row(
            "chunk gap c=8, mean (us)",
            "chunk_gap_added_us",
            lambda f: f.chunk_interval_us,
            "added",
            1,
        ),
        Row(
            f"{held} streams held: completed",
            "held_completed",
            lambda f: float(f.held_completed),
            "own",
            0,
            f"all {held}",
            lambda v: v == held,
            higher_is_better=True,
        ),
        Row(
            f"{held} streams held: peak open at once",
            "held_peak_open",
            lambda f: float(f.held_peak_open),
            "own",
            0,
        ),
        Row(
            f"{held} streams: accept queue overflows",
            "held_listen_overflows",
            lambda f: float(f.held_listen_overflows),
            "own",
            0,
        ),
        Row(
            f"{held} streams held: gap p99 (ms)",
            "held_gap_p99_added_ms",
            lambda f: f.held_gap_p99_ms,
            "added",
            1,
            "reported",
        ),
        Row(
            f"{held} streams held: TTFT p99 (ms)",
            "held_ttft_p99_added_ms",
            lambda f: f.held_ttft_p99_ms,
            "added",
            1,
        ),
        Row(
            "peak RSS, VmHWM (MB)",
            "peak_rss_mb",
            lambda f: f.peak_rss_mb,
            "own",
            1,
            "<= 90",
            lambda v: v <= 90,
        ),
        Row(
            "errors (failed requests, streams)",
            "errors",
            errors,
            "own",
            0,
            "none",
            lambda v: v == 0,
        ),
    ]


def _busy(figures: Figures) -> float:
    return figures.server_cpu_share * 100


def compared(row: Row, direct: Figures, gateway: Figures) -> float:
    d, g = row.value(direct), row.value(gateway)
    if row.compare == "ratio":
        return g / d if d else math.nan
    if row.compare == "added":
        return g - d
    return g


def verdict(row: Row, value: float) -> str:
    if row.check is None:
        return "info"
    if math.isnan(value):
        return "-"
    return "PASS" if row.check(value) else "FAIL"


def _num(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _shown(row: Row, value: float) -> str:
    if math.isnan(value):
        return "-"
    if row.compare == "ratio":
        return f"{value:.3f}x"
    if row.compare == "added":
        return f"{value:+.{row.digits}f}"
    return _num(value, row.digits)


def table(direct: Figures, gateways: dict[str, Figures], held: int) -> list[str]:
    width = max([14, *(len(name) for name in gateways)])
    head = (
        f"{'figure':<40} {'variant':<{width}} {'direct':>9} {'gateway':>9} "
        f"{'ratio/added':>11} {'target':>10} result"
    )
    lines = [head, "-" * len(head)]
    for row in rows(held):
        for index, (name, figures) in enumerate(gateways.items()):
            label = row.label if index == 0 else ""
            d = "-" if row.key == "peak_rss_mb" else _num(row.value(direct), row.digits)
            value = compared(row, direct, figures)
            shown = _shown(row, value) if row.compare != "own" else ""
            lines.append(
                f"{label:<40} {name:<{width}} {d:>9} {_num(row.value(figures), row.digits):>9} "
                f"{shown:>11} {row.target:>10} {verdict(row, value)}"
            )
    return lines


def all_vs_bare(direct: Figures, gateways: dict[str, Figures], held: int) -> dict[str, object]:
    """Per server with both feature sets: each targeted figure, all layers on over bare."""
    found: dict[str, object] = {}
    for name, bare in gateways.items():
        server, _, features = name.partition("/")
        every = gateways.get(f"{server}/all")
        if features != "bare" or every is None:
            continue
        figures: dict[str, object] = {}
        for row in rows(held):
            if row.key not in ALL_VS_BARE:
                continue
            b, a = compared(row, direct, bare), compared(row, direct, every)
            ratio = a / b if b > 0 and not math.isnan(a) else math.nan
            if row.key == "held_completed":
                ok = a == held
            elif math.isnan(ratio) or row.check is None:  # reported, not a target
                ok = None
            elif row.higher_is_better:
                ok = ratio >= 1 - ALL_VS_BARE_SLACK
            else:
                ok = ratio <= 1 + ALL_VS_BARE_SLACK
            figures[row.key] = {"bare": b, "all": a, "all_over_bare": ratio, "pass": ok}
        found[server] = figures
    return found


def all_vs_bare_table(comparison: dict[str, object], held: int) -> list[str]:
    if not comparison:
        return []
    labels = {row.key: row for row in rows(held)}
    head = (
        f"{'all layers on vs bare (within 20%)':<46} {'server':<10} {'bare':>9} {'all':>9} "
        f"{'all/bare':>9} {'target':>8} result"
    )
    lines = [head, "-" * len(head)]
    for server, figures in comparison.items():
        assert isinstance(figures, dict)
        for key, each in figures.items():
            row = labels[key]
            target = f"all {held}" if key == "held_completed" else ">= 0.80"
            if key != "held_completed" and not row.higher_is_better:
                target = "<= 1.20"
            ok = each["pass"]
            result = "-" if ok is None else "PASS" if ok else "FAIL"
            if row.check is None:
                target, result = "-", "info"
            suffix = {"ratio": " ratio", "added": " added", "own": ""}[row.compare]
            lines.append(
                f"{row.label + suffix:<46} {server:<10} {_shown(row, each['bare']):>9} "
                f"{_shown(row, each['all']):>9} {_num(each['all_over_bare'], 2):>9} "
                f"{target:>8} {result}"
            )
    return lines


def document(
    direct: Figures, gateways: dict[str, Figures], held: int
) -> dict[str, dict[str, object]]:
    """Per variant: each targeted figure as compared, its target and result."""
    found: dict[str, dict[str, object]] = {}
    for name, figures in gateways.items():
        found[name] = {
            row.key: {
                "value": compared(row, direct, figures),
                "target": row.target,
                "result": verdict(row, compared(row, direct, figures)),
            }
            for row in rows(held)
        }
    return found
