"""HTML fragments of the admin page: targets, budget, running config, reload report.

Plain string building; every value from the data goes through :func:`html.escape`. The
page polls these with htmx and swaps them in; the first page load renders them inline.
"""

from __future__ import annotations

import calendar
import io
import time
from collections.abc import Iterable
from html import escape
from typing import Any

from ruamel.yaml import YAML

from resillm.admin.data import BudgetReport, BudgetWindow, TargetReport, TargetsReport
from resillm.admin.svg import progress_bar
from resillm.config_diff import ReloadReport

DASH = "\u2014"
WARN_FRACTION = 0.8  # a budget bar turns amber here, red at 1.0


def e(value: object) -> str:
    """Escaped text of a value; None as a dash."""
    return DASH if value is None else escape(str(value))


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return DASH
    if ms >= 1000.0:
        return f"{ms / 1000.0:.2f}".rstrip("0").rstrip(".") + " s"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def fmt_usd(usd: float | None) -> str:
    if usd is None:
        return DASH
    if usd == 0:
        return "$0"
    return f"${usd:,.2f}" if usd >= 1 else f"${usd:.4f}"


def fmt_in(seconds: float) -> str:
    """A short "in ..." for a time ahead."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    hours, minutes = divmod(int(seconds) // 60, 60)
    return f"{hours} h {minutes} min"


def badge(text: str, css: str) -> str:
    return f'<span class="badge {escape(css)}">{escape(text)}</span>'


def table(headers: Iterable[str], rows: Iterable[str], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(rows)
    return (
        f'<table class="{escape(css)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


# -- targets ------------------------------------------------------------------------------

CIRCUIT_CSS = {"closed": "ok", "half_open": "warn", "open": "bad"}


def targets_fragment(report: TargetsReport) -> str:
    targets = report.targets
    if not targets:
        return '<p class="muted">No targets configured.</p>'
    counts = {state: sum(t.circuit == state for t in targets) for state in CIRCUIT_CSS}
    summary = (
        f'<p class="summary"><strong>{len(targets)}</strong> '
        f"target{'s' if len(targets) != 1 else ''} · "
        f'<span class="ok-text">{counts["closed"]} closed</span> · '
        f'<span class="warn-text">{counts["half_open"]} half-open</span> · '
        f'<span class="bad-text">{counts["open"]} open</span></p>'
    )
    rows = [_target_row(t) for t in targets]
    headers = ("target", "aliases", "circuit", "failures", "latency (EWMA)", "in flight")
    return summary + table(headers, rows, "targets")


def _target_row(t: TargetReport) -> str:
    state = t.circuit.replace("_", "-")
    circuit = badge(state, CIRCUIT_CSS.get(t.circuit, "muted"))
    if t.half_open_in_s is not None:
        circuit += f' <span class="muted">probe in {escape(fmt_in(t.half_open_in_s))}</span>'
    aliases = " ".join(f'<span class="chip">{e(a)}</span>' for a in t.aliases)
    failures = (
        f'<span class="bad-text">{t.consecutive_failures}</span>' if t.consecutive_failures else "0"
    )
    return (
        f'<tr data-target="{e(t.id)}" data-circuit="{e(t.circuit)}">'
        f'<td><span class="mono">{e(t.id)}</span></td><td>{aliases}</td><td>{circuit}</td>'
        f'<td class="num">{failures}</td><td class="num">{fmt_ms(t.latency_ewma_ms)}</td>'
        f'<td class="num">{t.inflight}</td></tr>'
    )


# -- budget -------------------------------------------------------------------------------

PERIOD = {"hour": "this hour", "day": "today"}


def budget_fragment(report: BudgetReport, now: float | None = None) -> str:
    if report.error is not None:
        return f'<p class="bad-text">{e(report.error)}</p>'
    now = time.time() if now is None else now
    items = [_budget_window(w, now) for w in report.windows]
    left = report.requests_left_estimate
    footer = (
        f'<p class="muted">about {left:,} more requests at today\'s average cost</p>'
        if left is not None
        else ""
    )
    return f'<div class="budget">{"".join(items)}</div>{footer}'


def _budget_window(w: BudgetWindow, now: float) -> str:
    owner = "Global" if w.owner == "global" else f"Key {w.owner}"
    resets = _parse_iso(w.resets_at)
    reset_text = f"resets {w.resets_at[11:16]} UTC (in {fmt_in(resets - now)})"
    if w.limit is None:
        fraction, css = 0.0, "none"
        amounts = f"{fmt_usd(w.spent)} spent · no limit"
    else:
        fraction = w.spent / w.limit if w.limit > 0 else 1.0
        css = "over" if fraction >= 1.0 else "warn" if fraction >= WARN_FRACTION else "ok"
        amounts = f"{fmt_usd(w.spent)} of {fmt_usd(w.limit)} · {fmt_usd(w.remaining)} left"
    label = f"{owner} budget {PERIOD.get(w.window, w.window)}: {amounts}"
    return (
        f'<div class="window" data-owner="{e(w.owner)}" data-window="{e(w.window)}">'
        f'<div class="window-head"><span>{e(owner)} · {e(PERIOD.get(w.window, w.window))}</span>'
        f'<span class="muted">{e(reset_text)}</span></div>'
        f"{progress_bar(fraction, css=css, label=label)}"
        f'<div class="window-amounts">{e(amounts)}</div></div>'
    )


def _parse_iso(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


# -- config and reload ----------------------------------------------------------------------


def config_yaml(masked: Any) -> str:
    """The masked config as YAML, in the order the config declares its sections."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    out = io.StringIO()
    yaml.dump(masked, out)
    return out.getvalue()


def config_fragment(masked: Any) -> str:
    return f'<pre class="config">{escape(config_yaml(masked))}</pre>'


def reload_fragment(report: ReloadReport) -> str:
    if not report.applied:
        errors = "".join(f"<li>{e(err)}</li>" for err in report.errors)
        return (
            '<div class="report bad" role="status"><strong>Reload refused</strong>: the running '
            f"config is unchanged.<ul>{errors}</ul></div>"
        )
    parts: list[str] = []
    changes = report.changes
    if changes is not None:
        for label, names in (
            ("sections", changes.sections),
            ("aliases added", changes.aliases_added),
            ("aliases removed", changes.aliases_removed),
            ("aliases changed", changes.aliases_changed),
            ("providers added", changes.providers_added),
            ("providers removed", changes.providers_removed),
            ("providers changed", changes.providers_changed),
        ):
            if names:
                parts.append(f"<li>{escape(label)}: {e(', '.join(names))}</li>")
    if report.restart_needed:
        parts.append(
            f'<li class="warn-text">needs a restart (not applied): '
            f"{e(', '.join(report.restart_needed))}</li>"
        )
    body = f"<ul>{''.join(parts)}</ul>" if parts else " No changes."
    return f'<div class="report ok" role="status"><strong>Reloaded</strong>.{body}</div>'
