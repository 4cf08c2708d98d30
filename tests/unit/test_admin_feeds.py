"""The admin page's per-request feeds: the access-log layer hands each request's fields to
the recent list, the metrics layer each request's status, duration and fallbacks to the
chart ring — and neither costs anything when admin is off."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from middleware.access_log import AccessLogMiddleware
from middleware.metrics import MetricsMiddleware
from middleware.request import responding
from resillm.admin.recent import RecentRequests
from resillm.asgi import Message, Receive, Scope, Send
from resillm.config import LoggingConfig
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import AllTargetsFailed
from resillm.metrics import Metrics

pytestmark = pytest.mark.anyio
BODY = b'{"model":"chat","messages":[{"role":"user","content":"write to a@example.com"}]}'


class Endpoint:
    """Stands for the inner layers (the request layer's among them): leaves a context,
    answers or raises."""

    def __init__(self, *, fallbacks: int = 0, raises: Exception | None = None) -> None:
        self.fallbacks = fallbacks
        self.raises = raises

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext("req-1", "/v1/chat/completions")
        ctx.alias, ctx.provider, ctx.fallbacks, ctx.body = "chat", "p", self.fallbacks, BODY
        scope[SCOPE_KEY] = ctx
        if self.raises is not None:
            raise self.raises
        send = responding(ctx, send)  # the request layer's, which notes the status
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"ok": "call +1 415 555 0100"}'})


def scope() -> Scope:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    return None


@pytest.mark.parametrize("log_requests", [True, False])
async def test_every_request_reaches_the_recent_list_logged_or_not(log_requests: bool) -> None:
    recent = RecentRequests(10)
    config = LoggingConfig(log_requests=log_requests, sample_rate=0.0)  # successes sampled out
    await AccessLogMiddleware(Endpoint(), config=config, recent=recent.append)(
        scope(), receive, send
    )
    (item,) = recent.newest()
    assert (item["request_id"], item["status"], item["model"]) == ("req-1", 200, "chat")
    assert "request_body" not in item


async def test_the_recent_list_gets_the_logged_fields_with_redacted_bodies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recent = RecentRequests(10)
    config = LoggingConfig(log_responses=True)
    app = AccessLogMiddleware(Endpoint(), config=config, recent=recent.append)
    with caplog.at_level(logging.INFO, logger="resillm.access"):
        await app(scope(), receive, send)
    (item,) = recent.newest()
    logged: Any = caplog.records[0].fields  # type: ignore[attr-defined]
    assert item["request_body"] == logged["request_body"]
    assert "[EMAIL]" in str(item["request_body"]) and "a@example.com" not in str(item)
    assert "[PHONE]" in str(item["response_body"])


async def test_a_failed_request_reaches_the_recent_list_with_its_error() -> None:
    recent = RecentRequests(10)
    error = AllTargetsFailed("chat", [])
    app = AccessLogMiddleware(Endpoint(raises=error), config=LoggingConfig(), recent=recent.append)
    with pytest.raises(AllTargetsFailed):
        await app(scope(), receive, send)
    (item,) = recent.newest()
    assert item["status"] == error.status and item["error"] == error.message


async def test_the_metrics_layer_tells_the_observer_each_request() -> None:
    seen: list[tuple[int, float, int]] = []
    app = MetricsMiddleware(
        Endpoint(fallbacks=2), metrics=Metrics(), observe=lambda *a: seen.append(a)
    )
    await app(scope(), receive, send)
    failing = MetricsMiddleware(
        Endpoint(raises=AllTargetsFailed("chat", [])),
        metrics=Metrics(),
        observe=lambda *a: seen.append(a),
    )
    with pytest.raises(AllTargetsFailed):
        await failing(scope(), receive, send)
    assert [(s, f) for s, _, f in seen] == [(200, 2), (502, 0)]
    assert all(0 <= d < 1 for _, d, _ in seen)
