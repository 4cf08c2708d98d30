"""After the soak: what the processes say about themselves, the checks, and the report."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak_setup import MODELS, PRICE_IN, PRICE_OUT
from soak_traffic import Traffic

from resillm.pricing import NANO_USD_PER_USD, Price, cost_nano_usd

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
MiB = 1024 * 1024


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples[name, frozenset(_LABEL_RE.findall(labels or ""))] = float(value)
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metric_by(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str
) -> dict[str, float]:
    """A counter summed by one of its labels."""
    found: Counter[str] = Counter()
    for (sample, labels), value in samples.items():
        if sample == name:
            found[dict(labels).get(label, "")] += int(value)
    return dict(found)


def nano(usd: float | None) -> int:
    return round((usd or 0.0) * NANO_USD_PER_USD)


@dataclass
class Observed:
    """Everything read from the processes once the traffic stopped and they went quiet."""

    seconds: float = 0.0
    quiet_after_s: float = 0.0
    mock_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    mock_logs: dict[str, str] = field(default_factory=dict)
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    budget_start: dict[str, Any] = field(default_factory=dict)
    budget_end: dict[str, dict[str, Any]] = field(default_factory=dict)  # by key name
    gateway_log: str = ""
    gateway_exit: int | None = None
    rss_kb: list[tuple[float, int, int]] = field(default_factory=list)  # (s, done, VmRSS kB)
    reloads: Counter[str] = field(default_factory=Counter)  # POST /admin/reload answers
    warmup_s: float = 0.0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def access_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{") and '"resillm.access"' in line:
            record = json.loads(line)
            if record.get("path") == "/v1/chat/completions":
                lines.append(record)
    return lines


def log_problems(log: str) -> tuple[list[str], Counter[str]]:
    """Lines that betray an unhandled error, and a count of the warnings by message."""
    problems: list[str] = []
    warnings: Counter[str] = Counter()
    for line in log.splitlines():
        if not line.strip() or line.startswith("resillm serving on"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(line[:300])
            continue
        level = record.get("level")
        if level in ("error", "critical") or "exception" in record or record.get("status") == 500:
            problems.append(line[:600])
        elif level == "warning" and record.get("logger") != "resillm.access":
            warnings[f"{record.get('logger')}: {str(record.get('msg'))[:90]}"] += 1
    return problems, warnings


def reported_nano(observed: Observed, key: str) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, nano-USD) the mocks reported for one key's models."""
    prompt = completion = 0
    for mock, stats in observed.mock_stats.items():
        for model, usage in stats.get("usage_by_model", {}).items():
            if MODELS.get((mock, model), ("", ""))[1] == key:
                prompt += usage["prompt_tokens"]
                completion += usage["completion_tokens"]
    return prompt, completion, cost_nano_usd(Price(PRICE_IN, PRICE_OUT), prompt, completion)


def _spent(status: dict[str, Any], window: str) -> int:
    return nano(status[window]["spent"])


def _reserved(status: dict[str, Any], window: str) -> int:
    """What requests still hold in a window: `remaining` is the limit less both."""
    found = status[window]
    return nano(found["limit"]) - nano(found["spent"]) - nano(found["remaining"])


def budget_checks(observed: Observed) -> list[Check]:
    start, end = observed.budget_start, observed.budget_end
    window = next(
        (
            w
            for w in ("current_day", "current_hour")
            if start[w]["resets_at"] == end["metered"][w]["resets_at"]
        ),
        None,
    )
    if window is None:
        return [Check("budget", True, "skipped: both windows reset during the soak")]
    lines = access_lines(observed.gateway_log)
    logged = Counter[str]()
    for record in lines:
        logged[record.get("key") or "-"] += nano(record.get("cost"))
    metered = _spent(end["metered"]["key"], window)
    loose = _spent(end["loose"]["key"], window)
    total = _spent(end["metered"], window) - _spent(start, window)
    prompt, completion, expected = reported_nano(observed, "metered")
    _, _, loose_reported = reported_nano(observed, "loose")
    exported = sum(v for (n, _), v in observed.metrics.items() if n == "resillm_cost_usd_total")
    exported_nano = nano(exported)
    reserved = {
        "global": _reserved(end["metered"], window),
        **{key: _reserved(end[key]["key"], window) for key in ("metered", "loose")},
    }
    return [
        Check(
            "budget: every reservation released",
            not any(reserved.values()),
            ", ".join(f"{owner} {amount} n$" for owner, amount in reserved.items()),
        ),
        Check(
            "budget: metered spend == usage the mocks reported",
            metered == expected,
            f"{metered} n$ spent, {expected} n$ for {prompt} prompt + {completion} completion "
            f"tokens reported ({window})",
        ),
        Check(
            "budget: loose spend == access log costs",
            loose == logged["loose"],
            f"{loose} n$ spent, {logged['loose']} n$ logged; the mocks reported "
            f"{loose_reported} n$ (apart from the estimates for answers cut before their usage)",
        ),
        Check(
            "budget: global spend == the keys' spend == access log costs",
            total == metered + loose == sum(logged.values()),
            f"{total} n$ global, {metered + loose} n$ by key, {sum(logged.values())} n$ logged",
        ),
        Check(
            "metrics: resillm_cost_usd_total == global spend",
            abs(exported_nano - total) <= max(1000, total // 1_000_000),
            f"{exported_nano} n$ exported",
        ),
    ]


def rss_growth(observed: Observed) -> tuple[float, int, float]:
    """(MiB grown after the warm-up, requests after it, MiB per 10k requests). A run of
    fewer than 10k requests is judged as if it had 10k: its growth is mostly noise."""
    samples = observed.rss_kb
    warm = next((s for s in samples if s[0] >= observed.warmup_s), samples[0])
    last = samples[-1]
    grown = (last[2] - warm[2]) * 1024 / MiB
    requests = last[1] - warm[1]
    return grown, requests, grown / max(requests, 10_000) * 10_000


def checks(observed: Observed, traffic: Traffic, max_rss_mb_per_10k: float) -> list[Check]:
    unclean = sum(n for o, n in traffic.outcomes.items() if not o.clean)
    problems, _ = log_problems(observed.gateway_log)
    mock_noise = {
        name: [
            line
            for line in text.splitlines()
            if line.strip() and not line.startswith("resillm mock-upstream listening")
        ]
        for name, text in observed.mock_logs.items()
    }
    balance = {
        name: (s["active"], s["requests"], s["completed"] + s["disconnected"] + s["aborted"])
        for name, s in observed.mock_stats.items()
    }
    pool_active = metric(observed.metrics, "resillm_upstream_connections", state="active")
    pool_idle = metric(observed.metrics, "resillm_upstream_connections", state="idle")
    inflight = metric(observed.metrics, "resillm_inflight_requests")
    busy_targets = [t["id"] for t in observed.targets if t["inflight"]]
    lines = len(access_lines(observed.gateway_log))
    left = sum(n for o, n in traffic.outcomes.items() if o.result == "left")
    unhit = sorted(
        f"{mock}/{model}"
        for mock, model in MODELS
        if not observed.mock_stats[mock]["by_model"].get(model)
    )
    grown, requests, per_10k = rss_growth(observed)
    found = [
        Check(
            "clients: every outcome a success or a clean OpenAI error",
            unclean == 0,
            f"{unclean} unclean of {traffic.done}"
            + "".join(f"\n    {u}" for u in traffic.unclean[:8]),
        ),
        Check(
            "gateway log: no unhandled error, traceback or 500",
            not problems,
            f"{len(problems)} line(s)" + "".join(f"\n    {p}" for p in problems[:5]),
        ),
        Check(
            "gateway: clean exit on SIGTERM",
            observed.gateway_exit == 0,
            f"exit status {observed.gateway_exit}",
        ),
        Check(
            "mock logs: nothing unexpected",
            not any(mock_noise.values()),
            "; ".join(f"{n}: {lines[:3]}" for n, lines in mock_noise.items() if lines) or "quiet",
        ),
        Check(
            "mocks: no request active; requests == completed + disconnected + aborted",
            all(active == 0 and total == ended for active, total, ended in balance.values()),
            ", ".join(f"{n}: active {a}, {t} = {e}" for n, (a, t, e) in balance.items()),
        ),
        Check(
            "gateway pool: no upstream connection in use",
            pool_active == 0,
            f"{pool_active:g} active, {pool_idle:g} idle",
        ),
        Check(
            "gateway: in-flight gauge 0, no target in flight",
            inflight == 0 and not busy_targets,
            f"resillm_inflight_requests {inflight:g}; targets in flight: {busy_targets or 'none'}; "
            f"quiet {observed.quiet_after_s:.1f}s after the traffic",
        ),
        Check(
            "access log: one line per request that reached the gateway",
            traffic.done - left <= lines <= traffic.done,
            f"{lines} lines, {traffic.done} requests of which {left} left early",
        ),
        Check("every fault target was called", not unhit, ", ".join(unhit) or "all"),
        Check(
            "config reloads under load: every one applied",
            bool(observed.reloads) and set(observed.reloads) == {"200 applied=True"},
            ", ".join(f"{r} x{n}" for r, n in observed.reloads.items()) or "none",
        ),
        *budget_checks(observed),
        Check(
            f"RSS growth after warm-up < {max_rss_mb_per_10k:g} MiB per 10k requests",
            per_10k < max_rss_mb_per_10k,
            f"{grown:+.1f} MiB over {requests} requests: {per_10k:+.2f} MiB per 10k",
        ),
    ]
    return found


def report(observed: Observed, traffic: Traffic, found: list[Check]) -> str:
    """The human report: figures, outcomes by alias, the faults, the checks."""
    out: list[str] = []
    _, _, per_10k = rss_growth(observed)
    rss = observed.rss_kb
    out.append(
        f"soak: {observed.seconds:.0f}s of traffic, {traffic.done} requests "
        f"({traffic.done / max(observed.seconds, 1):.0f}/s); gateway RSS "
        f"{rss[0][2] / 1024:.1f} MiB at start, {_rss_at(observed) / 1024:.1f} after the "
        f"{observed.warmup_s:.0f}s warm-up, {rss[-1][2] / 1024:.1f} at the end: "
        f"{per_10k:+.2f} MiB per 10k requests"
    )
    by_alias: dict[str, Counter[str]] = {}
    for outcome, count in traffic.outcomes.items():
        result = outcome.result if outcome.clean else "UNCLEAN"
        by_alias.setdefault(outcome.alias, Counter())[result] += count
    out.append("\noutcomes by alias (client-visible):")
    for alias in sorted(by_alias):
        results = by_alias[alias]
        detail = ", ".join(f"{r} {n}" for r, n in results.most_common())
        out.append(f"  {alias:<22} {sum(results.values()):>6}  {detail}")
    clients = Counter[str]()
    for outcome, count in traffic.outcomes.items():
        clients[f"{outcome.client}{' stream' if outcome.stream else ''}"] += count
    out.append("clients: " + ", ".join(f"{c} {n}" for c, n in sorted(clients.items())))
    out.append("\nupstream calls per fault (mock counters; usage = answers that reported it):")
    out.append(f"  {'mock/model':<40} {'calls':>6} {'usage':>6}  fault  [key]")
    for (mock, model), (fault, key) in MODELS.items():
        stats = observed.mock_stats.get(mock, {})
        calls = stats.get("by_model", {}).get(model, 0)
        usage = stats.get("usage_by_model", {}).get(model, {}).get("answers", 0)
        out.append(f"  {mock + '/' + model:<40} {calls:>6} {usage:>6}  {fault}  [{key}]")
    samples = observed.metrics
    recoveries = metric_by(samples, "resillm_stream_recoveries_total", "outcome")
    attempts = metric_by(samples, "resillm_upstream_attempts_total", "outcome")
    cache = metric_by(samples, "resillm_cache_requests_total", "result")
    out.append(f"\ngateway: attempts {attempts}; stream recoveries {recoveries}; cache {cache}")
    _, warnings = log_problems(observed.gateway_log)
    if warnings:
        out.append(
            "gateway warnings: " + "; ".join(f"{w} x{n}" for w, n in warnings.most_common(8))
        )
    out.append("\nchecks:")
    for check in found:
        out.append(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    return "\n".join(out)


def _rss_at(observed: Observed) -> int:
    return next((s[2] for s in observed.rss_kb if s[0] >= observed.warmup_s), observed.rss_kb[0][2])


def save_logs(observed: Observed, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.log").write_text(observed.gateway_log)
    for name, text in observed.mock_logs.items():
        (directory / f"mock-{name}.log").write_text(text)
