"""The admin page's HTML fragments: well-formed, escaped, and saying what the data says."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from resillm.admin.activity import charts_fragment, request_detail_fragment, requests_fragment
from resillm.admin.data import (
    BudgetReport,
    BudgetWindow,
    TargetReport,
    TargetsReport,
    masked_config,
)
from resillm.admin.fragments import (
    budget_fragment,
    config_fragment,
    reload_fragment,
    targets_fragment,
)
from resillm.admin.series import RequestSeries
from resillm.config_diff import ConfigChanges, ReloadReport
from resillm.config_loader import config_from_dict

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
EVIL = "<script>alert('x')</script>"


def parse(fragment: str) -> ET.Element:
    """Fragments are built to be well-formed XML too: a strict check of the nesting."""
    return ET.fromstring(f"<div>{fragment}</div>")


def target(**fields: Any) -> TargetReport:
    base: dict[str, Any] = {
        "id": "p/m",
        "provider": "p",
        "model": "m",
        "aliases": ["chat"],
        "circuit": "closed",
        "consecutive_failures": 0,
        "half_open_in_s": None,
        "latency_ewma_ms": 123.4,
        "inflight": 2,
    }
    return TargetReport(**{**base, **fields})


def test_targets_fragment_shows_each_circuit_and_counts_them() -> None:
    report = TargetsReport(
        [
            target(),
            target(id="q/m", circuit="open", consecutive_failures=5, half_open_in_s=12.0,
                   latency_ewma_ms=None),
            target(id="r/m", circuit="half_open"),
        ]
    )  # fmt: skip
    root = parse(targets_fragment(report))
    rows = {tr.attrib["data-target"]: tr for tr in root.iter("tr") if "data-target" in tr.attrib}
    assert [r.attrib["data-circuit"] for r in rows.values()] == ["closed", "open", "half_open"]
    open_text = "".join(rows["q/m"].itertext())
    assert "open" in open_text and "probe in 12 s" in open_text and "5" in open_text
    assert "123 ms" in "".join(rows["p/m"].itertext())
    summary = "".join(root.find("p").itertext())  # type: ignore[union-attr]
    assert "3 targets" in summary and "1 open" in summary and "1 half-open" in summary


def test_targets_fragment_escapes_names() -> None:
    text = targets_fragment(TargetsReport([target(id=EVIL, aliases=[EVIL])]))
    assert "<script>" not in text
    parse(text)


def test_no_targets() -> None:
    assert "No targets" in targets_fragment(TargetsReport([]))


def window(owner: str, kind: str, spent: float, limit: float | None) -> BudgetWindow:
    remaining = None if limit is None else max(0.0, limit - spent)
    resets = "2027-01-15T09:00:00Z" if kind == "hour" else "2027-01-16T00:00:00Z"
    return BudgetWindow(owner, kind, spent, limit, remaining, resets)


def test_budget_fragment_draws_a_bar_per_window_coloured_by_use() -> None:
    report = BudgetReport(
        windows=[
            window("global", "hour", 2.0, 10.0),
            window("global", "day", 85.0, 100.0),
            window("team-a", "hour", 1.5, 1.0),
            window("team-a", "day", 3.0, None),
        ],
        requests_left_estimate=1234,
    )
    text = budget_fragment(report, now=NOW)
    root = parse(text)
    classes = [s.attrib["class"] for s in root.iter("{http://www.w3.org/2000/svg}svg")]
    assert classes == ["progress ok", "progress warn", "progress over", "progress none"]
    assert "resets 09:00 UTC (in 1 h 0 min)" in text
    assert "resets 00:00 UTC (in 16 h 0 min)" in text
    assert "$2.00 of $10.00 · $8.00 left" in text
    assert "Key team-a" in text and "no limit" in text
    assert "about 1,234 more requests" in text


def test_budget_fragment_reports_an_unavailable_store() -> None:
    text = budget_fragment(BudgetReport([], None, error="the budget store is unavailable"))
    assert "unavailable" in text
    parse(text)


def test_reload_fragment_lists_changes_and_restart_needs() -> None:
    report = ReloadReport(
        applied=True,
        restart_needed=["server.port"],
        changes=ConfigChanges(sections=["budget", "models"], aliases_added=["new-alias"]),
    )
    text = reload_fragment(report)
    root = parse(text)
    items = ["".join(li.itertext()) for li in root.iter("li")]
    assert items == [
        "sections: budget, models",
        "aliases added: new-alias",
        "needs a restart (not applied): server.port",
    ]
    assert "Reloaded" in text


def test_reload_fragment_for_no_change_and_for_a_refusal() -> None:
    assert "No changes" in reload_fragment(ReloadReport(applied=True, changes=ConfigChanges()))
    refused = reload_fragment(ReloadReport(applied=False, errors=[f"bad.yaml:3:1: {EVIL}"]))
    assert "Reload refused" in refused and "<script>" not in refused
    parse(refused)


def request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": "2027-01-15T08:00:01.250Z",
        "request_id": "req_1",
        "status": 200,
        "key": "team-a",
        "model": "chat",
        "provider": "steady",
        "upstream_model": "m-1",
        "stream": False,
        "attempts": 2,
        "fallbacks": 1,
        "latency_ms": 250.0,
        "ttft_ms": None,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost": 0.0123,
        "cache": "miss",
        "error": None,
    }
    return {**base, **fields}


def test_requests_fragment_lists_newest_first_with_their_fields() -> None:
    items = [
        request(request_id="req_2", status=502, error="every target failed", provider=None),
        request(),
    ]
    text = requests_fragment(items, "/admin")
    root = parse(text)
    rows = [tr for tr in root.iter("tr") if "data-status" in tr.attrib]
    assert [r.attrib["data-status"] for r in rows] == ["502", "200"]
    assert "every target failed" in text
    second = "".join(rows[1].itertext())
    for expected in ("08:00:01", "chat", "steady / m-1", "team-a", "250 ms", "10 + 5",
                     "$0.0123", "miss", "1 fallback"):  # fmt: skip
        assert expected in second, expected
    assert 'hx-get="/admin/fragments/request?id=req_1"' in text


def test_requests_fragment_escapes_everything_a_client_controls() -> None:
    text = requests_fragment([request(request_id=EVIL, model=EVIL, error=EVIL)], "/admin")
    assert "<script>" not in text
    parse(text)
    assert "No requests yet" in requests_fragment([], "/admin")


def test_request_detail_shows_redacted_bodies_only_when_present() -> None:
    with_bodies = request(request_body={"messages": [{"content": "[EMAIL]"}]})
    text = request_detail_fragment(with_bodies, show_bodies=True)
    assert "request body" in text and "[EMAIL]" in text
    parse(text)
    without = request_detail_fragment(request(), show_bodies=False)
    assert "log_responses" in without
    assert "no longer" in request_detail_fragment(None, show_bodies=False)


def test_charts_fragment_has_four_valid_charts() -> None:
    clock_now = [NOW]
    series = RequestSeries(clock=lambda: clock_now[0])
    for i in range(30):
        clock_now[0] = NOW - 30 + i
        series.record(503 if i % 10 == 0 else 200, 0.05 + i / 100, fallbacks=i % 7 == 0)
    text = charts_fragment(series)
    root = parse(text)
    figures = [f.attrib["data-chart"] for f in root.iter("figure")]
    assert figures == ["requests", "errors", "latency", "fallbacks"]
    assert len(list(root.iter("{http://www.w3.org/2000/svg}svg"))) == 4
    assert "no requests yet" not in text


def test_charts_fragment_with_no_traffic() -> None:
    text = charts_fragment(RequestSeries(clock=lambda: NOW))
    assert text.count("no requests yet") == 4
    parse(text)


SECRETS = {
    "sk-provider-secret-0001",
    "sk-target-secret-0002",
    "client-key-secret-0003",
    "admin-key-secret-0004",
    "https://hooks.example.com/secret-0005",
    "https://hooks.slack.com/services/secret-0006",
    "smtp-password-secret-0007",
    "header-token-secret-0008",
    "redis-password-0009",
}


def secret_config() -> dict[str, Any]:
    return {
        "providers": {
            "p": {
                "type": "openai",
                "api_key": "sk-provider-secret-0001",
                "headers": {"X-Api-Token": "header-token-secret-0008", "x-mock-fail-status": "503"},
            }
        },
        "models": {
            "chat": {
                "targets": [{"provider": "p", "model": "m", "api_key": "sk-target-secret-0002"}]
            }
        },
        "auth": {
            "admin_key": "admin-key-secret-0004",
            "keys": [{"name": "team", "key": "client-key-secret-0003"}],
        },
        "budget": {
            "alerts": {
                "webhook_url": "https://hooks.example.com/secret-0005",
                "slack_webhook_url": "https://hooks.slack.com/services/secret-0006",
                "email": {
                    "smtp_host": "smtp.example.com",
                    "from": "gw@example.com",
                    "to": ["ops@example.com"],
                    "username": "gw",
                    "password": "smtp-password-secret-0007",
                },
            }
        },
        "cache": {"redis_url": "redis://user:redis-password-0009@127.0.0.1:6379/0"},
    }


def test_config_fragment_shows_every_secret_as_stars() -> None:
    text = config_fragment(masked_config(config_from_dict(secret_config())))
    content = "".join(parse(text).itertext())
    for secret in SECRETS:
        assert secret not in text, secret
    assert "api_key: '***'" in content
    assert "X-Api-Token: '***'" in content
    assert "x-mock-fail-status: '503'" in content  # a header that is not a credential stays
    assert "redis://user:***@127.0.0.1:6379/0" in content
