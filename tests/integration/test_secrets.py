"""No secret the gateway holds ever leaves it: every kind of credential in one config, real
traffic through the gateway (successes, failovers, upstreams that echo the key they got in
their error messages, a webhook that fails), then everything captured is searched for them:
log records at DEBUG, response bodies and headers, ``/metrics``, the admin JSON and pages,
and span attributes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import middleware.auth
import resillm.alerts
from resillm.app import Gateway
from resillm.config import ClientKeyConfig
from resillm.config_loader import config_from_dict
from resillm.mock_upstream import MockUpstream, MockUpstreamOptions, start_mock_upstream
from tests.conftest import serve_asgi

pytestmark = pytest.mark.anyio

OA_400 = "sk-oa400-upstream-secret-a1"
OA_500 = "sk-oa500-upstream-secret-b2"
OA_CTX = "sk-oactx-upstream-secret-c3"
AN_401 = "sk-ant-an401-upstream-secret-d4"
WRONG = "sk-wrong-upstream-secret-e5"
TARGET = "sk-target-level-secret-f6"
CLIENT = "client-key-secret-g7"
OTHER_CLIENT = "client-key-secret-h8"
ADMIN = "admin-key-secret-i9"
HOOK_PATH = "/hook-secret-j10"
SLACK_PATH = "/services/slack-secret-k11"
SMTP_PASSWORD = "smtp-password-secret-l12"
HEADER_TOKEN = "header-token-secret-m13"
SECRETS = (
    OA_400,
    OA_500,
    OA_CTX,
    AN_401,
    WRONG,
    TARGET,
    CLIENT,
    OTHER_CLIENT,
    ADMIN,
    HOOK_PATH,
    SLACK_PATH,
    SMTP_PASSWORD,
    HEADER_TOKEN,
)
PRICING = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}  # ~$0.01 a request


def _credentials(request: web.Request) -> str:
    names = ("authorization", "x-api-key", "api-key", "x-api-token")
    return " ".join(f"{n}={request.headers[n]}" for n in names if n in request.headers)


async def _echo(request: web.Request) -> web.Response:
    """An upstream that fails with the credentials it received in its error message."""
    status = int(request.headers.get("x-echo-status", "400"))
    message = f"rejected, you sent {_credentials(request)}"
    if request.headers.get("x-echo-context") == "1":
        message = f"maximum context length exceeded; {message}"
    if request.path.endswith("/messages"):
        error: dict[str, Any] = {"type": "error", "error": {"type": "x", "message": message}}
    else:
        code = "context_length_exceeded" if "context" in message else "invalid_api_key"
        error = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(
        error, status=status, headers={"x-upstream-said": _credentials(request)}
    )


async def _failing_hook(request: web.Request) -> web.Response:
    return web.Response(status=500, text=f"no such hook {request.path}")


@asynccontextmanager
async def _site(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _echo_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _echo)
    app.router.add_post("/v1/messages", _echo)
    return app


def _hook_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/{tail:.*}", _failing_hook)
    return app


def _config(echo: str, locked: str, good: str, hooks: str, tmp_path: Path) -> dict[str, Any]:
    def oa(base: str, key: str, **headers: str) -> dict[str, Any]:
        return {
            "type": "openai_compatible",
            "base_url": base + "/v1",
            "api_key": key,
            "headers": headers,
        }

    return {
        "providers": {
            "oa400": oa(echo, OA_400, **{"x-echo-status": "400", "X-Api-Token": HEADER_TOKEN}),
            "oa500": oa(echo, OA_500, **{"x-echo-status": "500"}),
            "oactx": oa(echo, OA_CTX, **{"x-echo-status": "400", "x-echo-context": "1"}),
            "an401": {
                "type": "anthropic",
                "base_url": echo,
                "api_key": AN_401,
                "headers": {"x-echo-status": "401"},
            },
            "locked": oa(locked, WRONG),
            "good": {"type": "openai_compatible", "base_url": good + "/v1"},
        },
        "models": {
            "client-error": {"targets": [{"provider": "oa400", "model": "m"}]},
            "server-error": {"targets": [{"provider": "oa500", "model": "m"}]},
            "too-long": {"targets": [{"provider": "oactx", "model": "m"}]},
            "anthropic": {"targets": [{"provider": "an401", "model": "claude"}]},
            "locked": {"targets": [{"provider": "locked", "model": "m"}]},
            "chat": {
                "targets": [
                    {"provider": "an401", "model": "claude"},
                    {"provider": "locked", "model": "m"},
                    {"provider": "good", "model": "m", "api_key": TARGET},
                ],
                "pricing": PRICING,
            },
        },
        "auth": {
            "admin_key": ADMIN,
            "keys": [
                {"name": "team", "key": CLIENT},
                {"name": "other", "key": OTHER_CLIENT, "models": ["chat"]},
            ],
        },
        "resilience": {
            "retry": {"max_attempts": 2, "initial_backoff": "1ms", "max_backoff": "2ms"},
            "circuit_breaker": {"failure_threshold": 100},
        },
        "budget": {
            "hourly_limit": 0.02,
            "snapshot_path": str(tmp_path / "budget.json"),
            "alerts": {
                "thresholds": [0.1],
                "webhook_url": hooks + HOOK_PATH,
                "slack_webhook_url": hooks + SLACK_PATH,
                "email": {
                    "smtp_host": "127.0.0.1",
                    "smtp_port": 9,  # discard: nothing listens there
                    "starttls": False,
                    "username": "gw",
                    "password": SMTP_PASSWORD,
                    "from": "gw@example.com",
                    "to": ["ops@example.com"],
                    "timeout": "1s",
                },
            },
        },
        "logging": {"level": "debug", "log_requests": True, "log_responses": True},
        "tracing": {"enabled": True},
    }


def _alert_gave_up(caplog: pytest.LogCaptureFixture) -> bool:
    return any("webhook failed after" in r.getMessage() for r in caplog.records)


class Captured:
    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def leaks(self) -> list[tuple[str, str, str]]:
        return [
            (where, secret, text[max(0, text.find(secret) - 80) : text.find(secret) + 80])
            for where, text in self.texts
            for secret in SECRETS
            if secret in text
        ]


async def _call(
    session: aiohttp.ClientSession,
    captured: Captured,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
) -> int:
    async with session.request(
        method, url, headers=headers or {}, json=json_body, allow_redirects=False
    ) as response:
        text = await response.text()
        where = f"{method} {url.split('/', 3)[-1]} -> {response.status}"
        captured.add(where + " body", text)
        captured.add(where + " headers", json.dumps(list(response.headers.items())))
        return response.status


async def test_no_secret_appears_in_logs_responses_metrics_admin_or_spans(
    upstream: MockUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resillm.alerts, "BACKOFF_S", (0.01, 0.01))
    monkeypatch.setattr(logging.getLogger("resillm"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    captured = Captured()
    exporter = InMemorySpanExporter()
    locked = await start_mock_upstream(MockUpstreamOptions(api_key="the-right-upstream-key"))
    try:
        async with _site(_echo_app()) as echo, _site(_hook_app()) as hooks:
            config = _config(echo, locked.url, upstream.url, hooks, tmp_path)
            gateway = Gateway(config_from_dict(config), span_exporter=exporter)
            async with serve_asgi(gateway, config) as url, aiohttp.ClientSession() as session:
                await _drive(session, captured, url)
                # The alerts fired by the spend above fail (500, refused SMTP) and log it.
                async with asyncio.timeout(15):
                    while not _alert_gave_up(caplog):  # noqa: ASYNC110 - log records, polled
                        await asyncio.sleep(0.05)
    finally:
        await locked.close()

    for record in caplog.records:
        if record.name == "aiohttp.access":  # the fake upstreams' own access logs
            continue
        captured.add(f"log {record.name}", record.getMessage())
        captured.add(f"log {record.name} fields", repr(record.__dict__))
    spans = exporter.get_finished_spans()
    assert spans, "tracing captured nothing"
    for span in spans:
        captured.add(f"span {span.name}", json.dumps(dict(span.attributes or {}), default=str))
        for event in span.events:
            captured.add(f"span {span.name} event", json.dumps(dict(event.attributes or {})))
        captured.add(f"span {span.name} status", str(span.status.description))
    assert any("every target" in text for _, text in captured.texts)
    assert any("budget alert via webhook failed" in text for _, text in captured.texts)
    leaks = captured.leaks()
    assert not leaks, "\n".join(f"{where}: {secret}: {around}" for where, secret, around in leaks)


async def _drive(session: aiohttp.ClientSession, captured: Captured, url: str) -> None:
    bearer = {"Authorization": f"Bearer {CLIENT}"}
    v1 = url + "/v1/chat/completions"

    def chat(alias: str, **extra: Any) -> dict[str, Any]:
        return {"model": alias, "messages": [{"role": "user", "content": "hi"}], **extra}

    statuses = {}
    for alias in ("client-error", "server-error", "too-long", "anthropic", "locked", "chat"):
        statuses[alias] = await _call(
            session, captured, "POST", v1, headers=bearer, json_body=chat(alias, max_tokens=8)
        )
        await _call(
            session,
            captured,
            "POST",
            v1,
            headers={"x-api-key": CLIENT},
            json_body=chat(alias, max_tokens=8, stream=True),
        )
    assert statuses["chat"] == 200, statuses
    assert statuses["client-error"] == 400 and statuses["locked"] >= 400, statuses
    # Wrong, missing and forbidden client keys; a key sent as the model or in the body.
    await _call(session, captured, "POST", v1, headers={"Authorization": f"Bearer {CLIENT}x"},
                json_body=chat("chat"))  # fmt: skip
    await _call(session, captured, "POST", v1, headers={"x-api-key": ADMIN}, json_body=chat("x"))
    await _call(session, captured, "POST", v1, json_body=chat("chat"))
    await _call(session, captured, "POST", v1, headers={"Authorization": f"Bearer {OTHER_CLIENT}"},
                json_body=chat("client-error"))  # fmt: skip
    await _call(session, captured, "GET", url + "/v1/models", headers=bearer)
    await _call(session, captured, "GET", url + "/v1/budget", headers=bearer)
    await _call(session, captured, "GET", url + "/ready")
    await _call(session, captured, "GET", url + "/metrics")
    await _call(session, captured, "GET", url + "/metrics",
                headers={"Accept": "application/openmetrics-text"})  # fmt: skip
    # The admin routes, with the key and without; a wrong key is not echoed.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    await _call(session, captured, "GET", url + "/admin/", headers={"Authorization": "Bearer no"})
    for path in ("", "targets", "config", "requests", "budget"):
        await _call(session, captured, "GET", f"{url}/admin/{path}", headers=admin)
    for name in ("targets", "budget", "charts", "requests", "config"):
        await _call(session, captured, "GET", f"{url}/admin/fragments/{name}", headers=admin)
    async with session.get(url + "/admin/requests", headers=admin) as response:
        recent = await response.json()
    rows = recent if isinstance(recent, list) else recent.get("requests", [])
    for row in rows[:20]:
        if isinstance(row, dict) and row.get("id"):
            await _call(session, captured, "GET", f"{url}/admin/fragments/request?id={row['id']}",
                        headers=admin)  # fmt: skip
    assert rows, recent


_COMPARE_DIGEST = hmac.compare_digest


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls += 1
        return _COMPARE_DIGEST(a, b)


def _scope(key: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }


def test_client_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting()
    monkeypatch.setattr(hmac, "compare_digest", counting)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    auth = middleware.auth.AuthMiddleware(
        app, keys=[ClientKeyConfig(name="team", key=CLIENT)], aliases=()
    )
    assert auth.authenticate(_scope(CLIENT)).name == "team"
    assert counting.calls == 1
    with pytest.raises(Exception, match="invalid API key"):
        auth.authenticate(_scope(CLIENT[:-1] + "X"))
    # The stored key and the presented one are compared as fixed-size digests.
    assert set(auth.keys) == {middleware.auth._digest(CLIENT.encode())}
    assert all(len(d) == 32 for d in auth.keys)
