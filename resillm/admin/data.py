"""What the admin routes show, as data: the JSON endpoints encode it, the page renders it.

One function per panel, so ``/admin/targets`` and the targets panel (and so on) can never
disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from resillm.budget import BudgetTracker, WindowStatus
from resillm.circuit import CircuitState
from resillm.config import ClientKeyConfig, Config
from resillm.errors import BudgetUnavailable
from resillm.targets import Route


class TargetReport(msgspec.Struct):
    id: str
    provider: str
    model: str
    aliases: list[str]
    circuit: str
    consecutive_failures: int
    half_open_in_s: float | None
    latency_ewma_ms: float | None
    inflight: int


class TargetsReport(msgspec.Struct):
    targets: list[TargetReport]


def targets_report(routes: Mapping[str, Route]) -> TargetsReport:
    """Each target once (with every alias that lists it): circuit, failures, latency, load."""
    reports: dict[str, TargetReport] = {}
    for alias, route in routes.items():
        for target in route.targets:
            report = reports.get(target.id)
            if report is not None:
                report.aliases.append(alias)
                continue
            circuit = target.circuit
            reports[target.id] = TargetReport(
                id=target.id,
                provider=target.provider,
                model=target.model,
                aliases=[alias],
                circuit=circuit.state.name.lower(),
                consecutive_failures=circuit.failures,
                half_open_in_s=round(circuit.retry_in(), 3)
                if circuit.state is CircuitState.OPEN
                else None,
                latency_ewma_ms=None
                if target.stats.ewma_s is None
                else round(target.stats.ewma_s * 1000.0, 2),
                inflight=target.stats.inflight,
            )
    return TargetsReport(targets=list(reports.values()))


class BudgetWindow(msgspec.Struct):
    owner: str  # "global" or the key's name
    window: str  # "hour" or "day"
    spent: float
    limit: float | None
    remaining: float | None
    resets_at: str


class BudgetReport(msgspec.Struct):
    windows: list[BudgetWindow]
    requests_left_estimate: int | None
    error: str | None = None


async def budget_report(tracker: BudgetTracker, keys: Iterable[ClientKeyConfig]) -> BudgetReport:
    """The global hour and day, then each key's own when it has a budget."""
    try:
        status = await tracker.status(None)
        windows = _windows("global", status.current_hour, status.current_day)
        for key in keys:
            if key.budget is None:
                continue
            own = (await tracker.status(key)).key
            if own is not None:
                windows.extend(_windows(key.name, own.current_hour, own.current_day))
    except BudgetUnavailable as exc:
        return BudgetReport(windows=[], requests_left_estimate=None, error=exc.message)
    return BudgetReport(windows=windows, requests_left_estimate=status.requests_left_estimate)


def _windows(owner: str, hour: WindowStatus, day: WindowStatus) -> list[BudgetWindow]:
    return [
        BudgetWindow(owner, kind, w.spent, w.limit, w.remaining, w.resets_at)
        for kind, w in (("hour", hour), ("day", day))
    ]


# Fields whose values are secrets wherever they appear in the config.
SECRET_FIELDS = frozenset(
    {
        "key",
        "admin_key",
        "api_key",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "password",
        "webhook_url",  # a webhook URL is a credential: anyone holding it can post
        "slack_webhook_url",
    }
)
# Extra upstream headers whose names say they carry a credential.
SECRET_HEADER_RE = re.compile(r"auth|key|token|secret|password|cookie|signature", re.I)
_URL_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@")
_URL_PASSWORD_VALUE_RE = re.compile(r"://[^:/@]*:([^@]*)@")


def masked_config(config: Config) -> Any:
    """The running config as JSON data with every secret replaced by ``"***"``."""
    return _mask(msgspec.to_builtins(config, enc_hook=float))


def secret_values(config: Config, min_chars: int = 8) -> frozenset[str]:
    """Every value :func:`masked_config` hides (keys, passwords, webhook URLs, credential
    headers, URL passwords): the admin routes scrub them from whatever else they show.
    Shorter ones are left alone, as in the logs (they would mangle plain words)."""
    found: set[str] = set()
    _collect(msgspec.to_builtins(config, enc_hook=float), masked_config(config), found)
    return frozenset(v for v in found if len(v) >= min_chars)


def _collect(plain: Any, masked: Any, found: set[str]) -> None:
    if isinstance(plain, dict) and isinstance(masked, dict):
        for key, value in plain.items():
            _collect(value, masked.get(key), found)
    elif isinstance(plain, list) and isinstance(masked, list):
        for value, hidden in zip(plain, masked, strict=True):
            _collect(value, hidden, found)
    elif isinstance(plain, str) and plain != masked:
        found.add(plain)
        found.update(m.group(1) for m in _URL_PASSWORD_VALUE_RE.finditer(plain))


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_field(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return _URL_PASSWORD_RE.sub(r"\1***@", value)  # redis://user:PASSWORD@host
    return value


def _mask_field(name: str, value: Any) -> Any:
    if name in SECRET_FIELDS and value:
        return "***"
    if name == "headers" and isinstance(value, dict):
        return {h: "***" if SECRET_HEADER_RE.search(h) else _mask(v) for h, v in value.items()}
    return _mask(value)
