"""Admin JSON routes. Off (404) without ``auth.admin_key``; 403 without the right bearer."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import msgspec

from resillm.asgi import Receive, Scope, Send, header, route_path, send_json
from resillm.circuit import CircuitState
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
    def __init__(self, admin_key: str | None, routes: Callable[[], dict[str, Route]]) -> None:
        self._key_digest = _digest(admin_key.encode()) if admin_key else None
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if self._key_digest is None:
            raise NotFound("the admin routes are off: set auth.admin_key to turn them on")
        self.authorize(scope)
        if path == "/admin/targets":
            if scope["method"] != "GET":
                raise MethodNotAllowed("/admin/targets takes GET")
            await send_json(send, 200, json_encoder.encode(self.targets()))
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
