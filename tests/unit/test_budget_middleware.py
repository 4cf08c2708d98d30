"""The budget gate against tiny raw ASGI apps and a ``send`` that records every message."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from middleware.budget import BudgetMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.request import CHAT_COMPLETIONS, parse_chat_request
from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, send_json
from resillm.budget import BudgetTracker
from resillm.config import Config
from resillm.config_loader import config_from_dict
from resillm.context import SCOPE_KEY, RequestContext
from resillm.pricing import PriceBook
from resillm.schema import Usage

pytestmark = pytest.mark.anyio
# $1000 per million tokens either way: a token costs a tenth of a cent.
PRICING = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
USAGE = Usage(prompt_tokens=2, completion_tokens=8, total_tokens=10)  # $0.01


def gateway_config(**budget: Any) -> Config:
    return config_from_dict(
        {
            "providers": {"m": {"type": "mock"}},
            "models": {"chat": {"targets": [{"provider": "m", "model": "m"}], "pricing": PRICING}},
            "budget": budget,
        }
    )


def scope_for(body: dict[str, Any], route: str = CHAT_COMPLETIONS) -> Scope:
    ctx = RequestContext("req_1", route)
    if route == CHAT_COMPLETIONS:
        ctx.body = json.dumps(body).encode()
        parse_chat_request(ctx)
    return {"type": "http", "method": "POST", "path": route, "headers": [], SCOPE_KEY: ctx}


HELLO = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


async def no_messages() -> Message:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def answering(usage: Usage | None = USAGE, cache: str | None = None) -> ASGIApp:
    """An inner app that plays the router: usage into the context, a JSON answer out."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        ctx.provider, ctx.upstream_model = "m", "m"
        ctx.attempt_log += (("m", "m", "success", False),)
        ctx.usage, ctx.cache = usage, cache
        await send_json(send, 200, b"{}")

    return app


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])


def gate(config: Config, app: ASGIApp, tracker: BudgetTracker) -> ASGIApp:
    middleware = BudgetMiddleware(
        app,
        tracker=tracker,
        prices=PriceBook(config.models),
        default_max_tokens=config.budget.default_max_tokens,
    )
    return ErrorsMiddleware(middleware)


async def call(
    app: ASGIApp, body: dict[str, Any] = HELLO, route: str = CHAT_COMPLETIONS
) -> tuple[Recorder, RequestContext]:
    scope = scope_for(body, route)
    recorder = Recorder()
    await app(scope, no_messages, recorder)
    return recorder, RequestContext.of(scope)


async def test_requests_are_billed_until_the_limit_then_rejected() -> None:
    config = gateway_config(hourly_limit=0.02)
    tracker = BudgetTracker(config)
    app = gate(config, answering(), tracker)
    for _ in range(2):
        recorder, ctx = await call(app)
        assert recorder.status == 200
        assert ctx.cost == 0.01
    recorder, ctx = await call(app)
    assert recorder.status == 429
    body = json.loads(recorder.messages[1]["body"])
    assert body["error"]["type"] == body["error"]["code"] == "budget_exceeded"
    assert 1 <= int(recorder.headers[b"retry-after"]) <= 3600
    assert ctx.cost is None  # never admitted, never settled
    assert (await tracker.status(None)).current_hour.spent == 0.02


async def test_warn_mode_adds_the_header_on_the_response_start() -> None:
    config = gateway_config(hourly_limit=0.01, action="warn")
    app = gate(config, answering(), BudgetTracker(config))
    first, _ = await call(app)
    assert b"x-resillm-budget-warning" not in first.headers
    second, _ = await call(app)
    assert second.status == 200
    warning = second.headers[b"x-resillm-budget-warning"].decode()
    assert warning.startswith("over budget: global hourly budget ($0.01")
    assert [m["type"] for m in second.messages] == ["http.response.start", "http.response.body"]


async def test_the_reservation_uses_max_tokens_or_the_default() -> None:
    config = gateway_config(hourly_limit=1.0, default_max_tokens=100)
    tracker = BudgetTracker(config)
    seen: list[float | None] = []

    async def peek(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await tracker.status(None)).current_hour.remaining)
        await send_json(send, 200, b"{}")

    app = gate(config, peek, tracker)
    await call(app)  # 3 prompt tokens (11 characters) + 8 = $0.011
    await call(app, {**HELLO, "max_tokens": None})  # 3 + the default 100 = $0.103
    await call(app, {**HELLO, "n": 2})  # 3 + 2 x 8 = $0.019
    assert seen == [0.989, 0.897, 0.981]


async def test_a_request_without_usage_only_releases_its_reservation() -> None:
    config = gateway_config(hourly_limit=1.0)
    tracker = BudgetTracker(config)
    _, ctx = await call(gate(config, answering(usage=None), tracker))
    assert ctx.cost is None
    status = await tracker.status(None)
    assert (status.current_hour.spent, status.current_hour.remaining) == (0.0, 1.0)


async def test_cache_hits_cost_nothing() -> None:
    config = gateway_config(hourly_limit=1.0)
    tracker = BudgetTracker(config)
    _, ctx = await call(gate(config, answering(cache="hit"), tracker))
    assert ctx.cost == 0.0
    assert (await tracker.status(None)).current_hour.spent == 0.0


async def test_a_cancelled_request_still_pays_for_what_it_used() -> None:
    config = gateway_config(hourly_limit=1.0)
    tracker = BudgetTracker(config)

    async def cut(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        ctx.provider = "m"
        ctx.attempt_log += (("m", "m", "success", False),)
        ctx.usage = Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
        raise asyncio.CancelledError  # the server is stopping mid-stream

    with pytest.raises(asyncio.CancelledError):
        await call(gate(config, cut, tracker))
    status = await tracker.status(None)
    assert (status.current_hour.spent, status.current_hour.remaining) == (0.005, 0.995)


async def test_other_routes_are_not_gated() -> None:
    config = gateway_config(hourly_limit=0.0)  # nothing may be spent
    recorder, _ = await call(gate(config, answering(), BudgetTracker(config)), route="/v1/models")
    assert recorder.status == 200
    recorder, _ = await call(gate(config, answering(), BudgetTracker(config)))
    assert recorder.status == 429


async def test_an_unknown_alias_is_left_to_the_router() -> None:
    config = gateway_config(hourly_limit=0.0)
    recorder, _ = await call(
        gate(config, answering(), BudgetTracker(config)), {**HELLO, "model": "nope"}
    )
    assert recorder.status == 200  # the tiny app answers; the real router says 404
