"""The cache layer against tiny raw ASGI apps and a ``send`` that records every message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from middleware.cache import CacheMiddleware
from middleware.request import CHAT_COMPLETIONS, parse_chat_request, responding
from resillm.asgi import Message, Receive, Scope, Send, send_json
from resillm.cache import ResponseCache
from resillm.config import CacheConfig
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import AllTargetsFailed
from resillm.metrics import Metrics
from resillm.schema import Usage

pytestmark = pytest.mark.anyio
HELLO: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
USAGE = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)


def answer_body(text: str = "hello") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "up-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    ).encode()


class Upstream:
    """Plays the router: counts calls, answers JSON or a stream, can wait or fail."""

    def __init__(self, *, status: int = 200, gate: asyncio.Event | None = None) -> None:
        self.calls = 0
        self.status = status
        self.gate = gate
        self.fail_first = 0  # calls that fail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        failing = self.calls <= self.fail_first
        if self.gate is not None:
            await self.gate.wait()
        if failing:
            raise AllTargetsFailed("chat", [])
        ctx = RequestContext.of(scope)
        ctx.provider, ctx.upstream_model, ctx.usage, ctx.attempts = "up", "up-model", USAGE, 1
        if not ctx.stream:
            body = answer_body()
            if self.status == 200:  # as the router does: the body it answers with
                ctx.answer_body = body
            await send_json(send, self.status, body)
            return
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        for data in (
            b'{"model":"up-model","choices":[{"index":0,"delta":{"content":"hel"}}]}',
            b'{"model":"up-model","choices":[{"index":0,"delta":{"content":"lo"},'
            b'"finish_reason":"stop"}]}',
            b"[DONE]",
        ):
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n"})


def scope_for(body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    ctx = RequestContext("req_1", CHAT_COMPLETIONS)
    ctx.body = json.dumps(body).encode()
    parse_chat_request(ctx)
    return {
        "type": "http",
        "method": "POST",
        "path": CHAT_COMPLETIONS,
        "headers": headers or [],
        SCOPE_KEY: ctx,
    }


async def never_disconnects() -> Message:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


class Harness:
    def __init__(self, upstream: Upstream, **config: Any) -> None:
        self.upstream = upstream
        self.metrics = Metrics()
        self.cache = ResponseCache(CacheConfig(enabled=True, **config))
        self.layer = CacheMiddleware(
            upstream, cache=self.cache, metrics=self.metrics, aliases={"chat"}
        )

    async def call(
        self,
        body: dict[str, Any] = HELLO,
        headers: list[tuple[bytes, bytes]] | None = None,
        receive: Callable[[], Awaitable[Message]] = never_disconnects,
    ) -> tuple[RequestContext, Recorder]:
        scope = scope_for(body, headers)
        send = Recorder()
        # The request layer's send: it adds the headers the layers inside set.
        await self.layer(scope, receive, responding(RequestContext.of(scope), send))
        return RequestContext.of(scope), send

    def counted(self, result: str) -> float:
        self.metrics.flush()  # what a scrape would show
        try:
            return float(self.metrics.cache_requests.get({"result": result}))
        except KeyError:
            return 0.0


async def test_a_second_identical_request_is_answered_from_the_cache() -> None:
    h = Harness(Upstream())
    first, sent = await h.call()
    assert first.cache == "miss" and sent.headers[b"x-resillm-cache"] == b"miss"
    second, again = await h.call()
    assert h.upstream.calls == 1
    assert second.cache == "hit" and second.usage is None and second.attempts == 0
    assert again.headers[b"x-resillm-cache"] == b"hit"
    assert again.headers[b"x-resillm-attempts"] == b"0"
    assert again.headers[b"x-resillm-provider"] == b"up"
    assert again.headers[b"x-resillm-model"] == b"up-model"
    answer = json.loads(again.body)
    assert answer["choices"][0]["message"]["content"] == "hello"
    assert answer["usage"]["total_tokens"] == 3
    assert (h.counted("miss"), h.counted("hit")) == (1, 1)


async def test_a_stream_is_stored_once_it_ended_with_done_and_replayed_as_json() -> None:
    h = Harness(Upstream())
    await h.call({**HELLO, "stream": True})
    ctx, sent = await h.call(HELLO)
    assert h.upstream.calls == 1 and ctx.cache == "hit"
    assert json.loads(sent.body)["choices"][0]["message"]["content"] == "hello"


async def test_a_json_answer_without_a_finish_reason_is_never_served() -> None:
    h = Harness(Upstream())
    unfinished = answer_body().replace(b'"finish_reason": "stop"', b'"finish_reason": null')
    assert unfinished != answer_body()

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        h.upstream.calls += 1
        ctx = RequestContext.of(scope)
        ctx.provider, ctx.upstream_model, ctx.answer_body = "up", "up-model", unfinished
        await send_json(send, 200, unfinished)

    h.layer.app = router
    await h.call()
    ctx, sent = await h.call()
    assert h.upstream.calls == 2 and ctx.cache == "miss"
    assert sent.headers[b"x-resillm-cache"] == b"miss"
    assert (h.counted("miss"), h.counted("hit")) == (2, 0)


async def test_a_failed_status_is_not_stored() -> None:
    h = Harness(Upstream(status=500))
    await h.call()
    await h.call()
    assert h.upstream.calls == 2


async def test_an_error_raised_inside_carries_the_cache_header() -> None:
    upstream = Upstream()
    upstream.fail_first = 1
    h = Harness(upstream)
    with pytest.raises(AllTargetsFailed) as raised:
        await h.call()
    assert raised.value.headers["x-resillm-cache"] == "miss"


async def test_n_above_one_bypasses_the_cache() -> None:
    h = Harness(Upstream())
    for _ in range(2):
        ctx, sent = await h.call({**HELLO, "n": 2})
        assert ctx.cache == "bypass" and sent.headers[b"x-resillm-cache"] == b"bypass"
    assert h.upstream.calls == 2 and len(h.cache.memory) == 0
    assert h.counted("miss") == h.counted("hit") == 0


async def test_no_store_is_looked_up_but_not_stored() -> None:
    h = Harness(Upstream())
    no_store = [(b"cache-control", b"no-store")]
    ctx, _ = await h.call(headers=no_store)
    assert ctx.cache == "miss" and len(h.cache.memory) == 0
    await h.call()
    ctx, _ = await h.call(headers=no_store)
    assert ctx.cache == "hit" and h.upstream.calls == 2


async def test_no_cache_goes_upstream_and_refreshes_the_entry() -> None:
    h = Harness(Upstream())
    await h.call()
    ctx, sent = await h.call(headers=[(b"cache-control", b"max-age=0, No-Cache")])
    assert ctx.cache == "bypass" and sent.headers[b"x-resillm-cache"] == b"bypass"
    assert h.upstream.calls == 2 and len(h.cache.memory) == 1
    both = [(b"cache-control", b"no-cache"), (b"cache-control", b"no-store")]
    ctx, _ = await h.call(headers=both)
    assert ctx.cache == "bypass"


async def test_identical_requests_in_flight_wait_for_the_first() -> None:
    gate = asyncio.Event()
    h = Harness(Upstream(gate=gate))
    leader = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    waiters = [asyncio.create_task(h.call({**HELLO, "stream": True})) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    await leader
    for waiter in waiters:
        ctx, sent = await waiter
        assert ctx.cache == "hit" and sent.headers[b"x-resillm-cache"] == b"hit"
        assert b"data: [DONE]" in sent.body
    assert h.upstream.calls == 1 and len(h.cache.flights) == 0
    assert (h.counted("miss"), h.counted("hit")) == (1, 3)


async def test_a_failed_leader_sends_its_waiters_upstream() -> None:
    gate = asyncio.Event()
    upstream = Upstream(gate=gate)
    upstream.fail_first = 1
    h = Harness(upstream)
    leader = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    assert upstream.calls == 1
    gate.set()
    with pytest.raises(AllTargetsFailed):
        await leader
    ctx, sent = await waiter
    assert ctx.cache == "miss" and sent.headers[b"x-resillm-cache"] == b"miss"
    assert upstream.calls == 2


async def test_a_waiter_gives_up_after_the_coalesce_timeout() -> None:
    gate = asyncio.Event()
    h = Harness(Upstream(gate=gate), coalesce_timeout=0.05)
    leader = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(h.call())
    await asyncio.sleep(0.1)
    assert h.upstream.calls == 2  # the waiter went upstream itself
    gate.set()
    await leader
    ctx, _ = await waiter
    assert ctx.cache == "miss"


async def test_a_waiter_whose_client_leaves_stops_waiting() -> None:
    gate = asyncio.Event()
    h = Harness(Upstream(gate=gate))
    leader = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)

    async def disconnect_soon() -> Message:
        await asyncio.sleep(0.02)
        return {"type": "http.disconnect"}

    ctx, sent = await asyncio.wait_for(h.call(receive=disconnect_soon), 1)
    assert ctx.status == 499 and sent.messages == [] and h.upstream.calls == 1
    gate.set()
    await leader


async def test_no_store_requests_do_not_lead_but_may_wait() -> None:
    gate = asyncio.Event()
    h = Harness(Upstream(gate=gate))
    no_store = [(b"cache-control", b"no-store")]
    first = asyncio.create_task(h.call(headers=no_store))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    assert h.upstream.calls == 2  # the first did not lead: the second went upstream too
    third = asyncio.create_task(h.call(headers=no_store))
    await asyncio.sleep(0.01)
    assert h.upstream.calls == 2  # ... and the third waits for the second
    gate.set()
    await first
    await second
    ctx, _ = await third
    assert ctx.cache == "hit"


async def test_no_cache_requests_do_not_wait() -> None:
    gate = asyncio.Event()
    h = Harness(Upstream(gate=gate))
    first = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(h.call(headers=[(b"cache-control", b"no-cache")]))
    await asyncio.sleep(0.01)
    assert h.upstream.calls == 2
    gate.set()
    await first
    ctx, _ = await second
    assert ctx.cache == "bypass"


async def test_other_routes_and_unknown_aliases_pass_untouched() -> None:
    h = Harness(Upstream())
    ctx, sent = await h.call({**HELLO, "model": "nope"})
    assert ctx.cache is None and b"x-resillm-cache" not in sent.headers


async def test_a_waiter_keeps_waiting_when_receive_says_something_else() -> None:
    gate = asyncio.Event()
    h = Harness(Upstream(gate=gate))
    leader = asyncio.create_task(h.call())
    await asyncio.sleep(0.01)
    received = 0

    async def chatty() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    waiter = asyncio.create_task(h.call(receive=chatty))
    await asyncio.sleep(0.02)
    gate.set()
    await leader
    ctx, _ = await waiter
    assert ctx.cache == "hit" and received == 1 and h.upstream.calls == 1
