"""Admin JSON routes. Off (404) without ``auth.admin_key``; 403 without the right bearer."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from resillm.asgi import Receive, Scope, Send, header, route_path, send_json
from resillm.circuit import CircuitState
from resillm.config import Config
from resillm.config_diff import ReloadReport
from resillm.errors import MethodNotAllowed, NotFound, PermissionDenied
from resillm.schema import json_encoder
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


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class AdminAPI:
    def __init__(
        self,
        admin_key: str | None,
        routes: Callable[[], dict[str, Route]],
        *,
        config: Config | None = None,
        reload: Callable[[], Awaitable[ReloadReport]] | None = None,
    ) -> None:
        self._key_digest = _digest(admin_key.encode()) if admin_key else None
        self._routes = routes
        self._config = config
        self._reload = reload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if self._key_digest is None:
            raise NotFound("the admin routes are off: set auth.admin_key to turn them on")
        self.authorize(scope)
        method = scope["method"]
        if path == "/admin/targets":
            if method != "GET":
                raise MethodNotAllowed("/admin/targets takes GET")
            await send_json(send, 200, json_encoder.encode(self.targets()))
        elif path == "/admin/reload" and self._reload is not None:
            if method != "POST":
                raise MethodNotAllowed("/admin/reload takes POST")
            report = await self._reload()
            await send_json(send, 200 if report.applied else 422, json_encoder.encode(report))
        elif path == "/admin/config" and self._config is not None:
            if method != "GET":
                raise MethodNotAllowed("/admin/config takes GET")
            await send_json(send, 200, json_encoder.encode(masked_config(self._config)))
        else:
            raise NotFound(f"no such endpoint: {scope['method']} {path}")

    def authorize(self, scope: Scope) -> None:
        assert self._key_digest is not None
        given = header(scope, b"authorization") or b""
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            _digest(token.strip()), self._key_digest
        ):
            raise PermissionDenied("the admin routes need Authorization: Bearer ADMIN_KEY")

    def targets(self) -> TargetsReport:
        reports: dict[str, TargetReport] = {}
        for alias, route in self._routes().items():
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


# Fields whose values are secrets wherever they appear in the config.
SECRET_FIELDS = frozenset(
    {
        "key",
        "admin_key",
        "api_key",
        "secret_access_key",
        "session_token",
        "password",
        "webhook_url",  # a webhook URL is a credential: anyone holding it can post
        "slack_webhook_url",
    }
)
_URL_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@")


def masked_config(config: Config) -> Any:
    """The running config as JSON data with every secret replaced by ``"***"``."""
    return _mask(msgspec.to_builtins(config, enc_hook=float))


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("***" if k in SECRET_FIELDS and v else _mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return _URL_PASSWORD_RE.sub(r"\1***@", value)  # redis://user:PASSWORD@host
    return value
