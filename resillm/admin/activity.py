"""HTML fragments for traffic: the four live charts and the recent requests.

The charts are drawn from :class:`~resillm.admin.series.RequestSeries` columns of
``STEP_S`` seconds over its 15 minutes; the recent requests are the access-log fields the
gateway kept (:class:`~resillm.admin.recent.RecentRequests`), newest first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from resillm.admin.fragments import DASH, badge, e, fmt_ms, fmt_usd, table
from resillm.admin.series import Column, RequestSeries
from resillm.admin.svg import Series, chart

STEP_S = 5  # seconds per chart column: 180 columns over 15 minutes
RECENT_S = 60  # the "last minute" figures beside each chart
BODY_FIELDS = ("request_body", "response_body", "response_text")


def fmt_rate(value: float) -> str:
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}".rstrip("0").rstrip(".")


def fmt_latency(seconds: float | None) -> str:
    return DASH if seconds is None else fmt_ms(seconds * 1000.0)


def _clock(epoch: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch))


def charts_fragment(series: RequestSeries) -> str:
    columns = series.window(step=STEP_S)
    last = series.window(RECENT_S, RECENT_S)[-1]
    tips = [f"{_clock(c.start)} UTC" for c in columns]
    requests = [c.requests_per_s for c in columns]
    errors = [c.errors_per_s for c in columns]
    fallbacks = [float(c.fallbacks) for c in columns]
    return "".join(
        (
            _panel(
                "Requests/s",
                f"{fmt_rate(last.requests_per_s)}/s last min · peak {fmt_rate(max(requests))}/s",
                chart(
                    [Series("requests/s", requests, "requests")],
                    label="requests per second, last 15 minutes",
                    fmt=fmt_rate,
                    bars=True,
                    tips=[f"{t}: {fmt_rate(v)} req/s" for t, v in zip(tips, requests, strict=True)],
                ),
                "requests",
            ),
            _panel(
                "Errors/s",
                f"{fmt_rate(last.errors_per_s)}/s last min · {_error_share(last)}",
                chart(
                    [Series("errors/s", errors, "errors")],
                    label="errors (5xx and 429) per second, last 15 minutes",
                    fmt=fmt_rate,
                    bars=True,
                    tips=[
                        f"{t}: {fmt_rate(v)} errors/s" for t, v in zip(tips, errors, strict=True)
                    ],
                ),
                "errors",
            ),
            _panel(
                "Latency p50 / p99",
                f"p50 {fmt_latency(last.p50_s)} · p99 {fmt_latency(last.p99_s)} last min",
                chart(
                    [
                        Series("p99", [c.p99_s for c in columns], "p99"),
                        Series("p50", [c.p50_s for c in columns], "p50"),
                    ],
                    label="latency p50 and p99, last 15 minutes",
                    fmt=lambda s: fmt_latency(s) if s else "0",
                ),
                "latency",
            ),
            _panel(
                f"Fallbacks per {STEP_S} s",
                f"{last.fallbacks} last min · {sum(c.fallbacks for c in columns)} in 15 min",
                chart(
                    [Series("fallbacks", fallbacks, "fallbacks")],
                    label="fallbacks, last 15 minutes",
                    fmt=lambda v: f"{v:g}",
                    bars=True,
                    tips=[f"{t}: {v:g} fallbacks" for t, v in zip(tips, fallbacks, strict=True)],
                ),
                "fallbacks",
            ),
        )
    )


def _error_share(column: Column) -> str:
    if not column.requests:
        return "no requests"
    return f"{100.0 * column.errors / column.requests:.0f} % of requests"


def _panel(title: str, figures: str, svg: str, name: str) -> str:
    return (
        f'<figure class="chart-panel" data-chart="{escape(name)}"><figcaption>'
        f'<span>{escape(title)}</span><span class="muted">{escape(figures)}</span>'
        f"</figcaption>{svg}</figure>"
    )


# -- recent requests ------------------------------------------------------------------------


def status_css(status: int) -> str:
    if status >= 500 or status == 429:
        return "bad"
    if status >= 400:
        return "warn"
    return "ok" if status else "muted"


def requests_fragment(items: Sequence[dict[str, Any]], base: str) -> str:
    if not items:
        return '<p class="muted">No requests yet.</p>'
    headers = ("time (UTC)", "status", "model", "served by", "key", "latency", "TTFT",
               "attempts", "tokens", "cost", "cache", "")  # fmt: skip
    rows = [_request_row(item, base) for item in items]
    return table(headers, rows, "requests")


def _request_row(item: dict[str, Any], base: str) -> str:
    status = int(item.get("status") or 0)
    served = item.get("provider")
    if item.get("upstream_model"):
        served = f"{served} / {item['upstream_model']}"
    tokens = DASH
    if item.get("prompt_tokens") is not None:
        tokens = f"{item['prompt_tokens']} + {item.get('completion_tokens') or 0}"
    attempts = f"{item.get('attempts') or 0}"
    if item.get("fallbacks"):
        attempts += f' <span class="warn-text">({item["fallbacks"]} fallback)</span>'
    error = item.get("error")
    error_row = (
        f'<tr class="error-row"><td></td><td colspan="11">{e(error)}</td></tr>' if error else ""
    )
    request_id = str(item.get("request_id") or "")
    view = (
        f'<button type="button" class="link" hx-get="{escape(base)}/fragments/request?id='
        f'{escape(_query(request_id))}" hx-target="#request-detail">details</button>'
    )
    stream = ' <span class="chip">stream</span>' if item.get("stream") else ""
    return (
        f'<tr data-status="{status}"><td class="mono">{e(str(item.get("ts", ""))[11:19])}</td>'
        f"<td>{badge(str(status or DASH), status_css(status))}</td>"
        f"<td>{e(item.get('model'))}{stream}</td><td>{e(served)}</td><td>{e(item.get('key'))}</td>"
        f'<td class="num">{fmt_ms(item.get("latency_ms"))}</td>'
        f'<td class="num">{fmt_ms(item.get("ttft_ms"))}</td><td class="num">{attempts}</td>'
        f'<td class="num">{e(tokens)}</td><td class="num">{fmt_usd(item.get("cost"))}</td>'
        f"<td>{e(item.get('cache'))}</td><td>{view}</td></tr>{error_row}"
    )


def _query(value: str) -> str:
    return quote(value, safe="")


def request_detail_fragment(item: dict[str, Any] | None, show_bodies: bool) -> str:
    """Every access-log field of one request; its bodies when ``logging.log_responses``."""
    if item is None:
        return '<p class="muted">That request is no longer among the recent ones.</p>'
    fields = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(v if isinstance(v, str) else json.dumps(v))}</dd>"
        for k, v in item.items()
        if k not in BODY_FIELDS and v is not None
    )
    bodies = ""
    for name in BODY_FIELDS:
        if name in item:
            text = json.dumps(item[name], indent=2, ensure_ascii=False)
            bodies += f"<h3>{escape(name.replace('_', ' '))}</h3><pre>{escape(text)}</pre>"
    if not bodies:
        bodies = (
            '<p class="muted">Bodies are shown when <code>logging.log_responses</code> is on '
            "(redacted as in the logs).</p>"
            if not show_bodies
            else ""
        )
    return f'<div class="detail"><dl>{fields}</dl>{bodies}</div>'
