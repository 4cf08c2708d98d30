"""The hot path's mechanisms (issue #14 measures speed with `make bench`; these guard how):
answers pass through byte for byte, events that arrive together leave in one write, and no
request opens an HTTP session of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from resillm.app import create_app
from tests.conftest import run_gateway
from tests.integration.servers import serve_web

pytestmark = pytest.mark.anyio

# Unusual but valid JSON: spacing, key order, escapes and an unknown field. Re-encoding it
# anywhere on the way would change these bytes.
ANSWER = (
    b'{ "object": "chat.completion", "id": "chatcmpl-raw", "created": 7, "model": "m",'
    b' "choices": [ { "index": 0, "finish_reason": "stop", "message": { "role": "assistant",'
    b' "content": "caf\\u00e9 \\ud83d\\ude00" } } ], "usage": {"prompt_tokens": 3,'
    b' "completion_tokens": 2, "total_tokens": 5}, "x_vendor": [1.50, 2e3] }'
)
EVENTS = [
    b'{"id":"c","object":"chat.completion.chunk","created":7,"model":"m","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
    *(
        b'{"id":"c","object":"chat.completion.chunk","created":7,"model":"m", "choices":'
        b'[{"index":0,"delta":{"content":"w%d "},"finish_reason":null}], "x_vendor": 1.50}' % i
        for i in range(20)
    ),
    b'{"id":"c","object":"chat.completion.chunk","created":7,"model":"m","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    b'{"id":"c","object":"chat.completion.chunk","created":7,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":20,"total_tokens":23}}',
]
STREAM = b"".join(b"data: " + event + b"\n\n" for event in EVENTS) + b"data: [DONE]\n\n"


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(STREAM)  # every event in one write: they arrive together
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_web(app) as url:
        yield url + "/v1"


def config(upstream_url: str) -> dict[str, Any]:
    return {
        "providers": {"up": {"type": "openai_compatible", "base_url": upstream_url}},
        "models": {"chat": {"targets": [{"provider": "up", "model": "m"}]}},
        "logging": {"level": "error"},
    }


def chat_body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def test_a_json_answer_passes_through_byte_for_byte(upstream_url: str) -> None:
    async with (
        run_gateway(config(upstream_url)) as gateway,
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=chat_body(False)) as response,
    ):
        assert response.status == 200
        assert await response.read() == ANSWER


async def test_stream_events_pass_through_byte_for_byte(upstream_url: str) -> None:
    async with (
        run_gateway(config(upstream_url)) as gateway,
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=chat_body(True)) as response,
    ):
        assert response.status == 200
        assert await response.read() == STREAM


async def test_events_that_arrive_together_leave_in_one_write(upstream_url: str) -> None:
    app = create_app(config(upstream_url))
    body = msgspec.json.encode(chat_body(True))
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays to the end
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    try:
        await app(scope, receive, send)  # type: ignore[arg-type]
    finally:
        await app.stop()
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert b"".join(bodies) == STREAM
    # 24 events and [DONE] came in one read: at most the first token alone, then the rest.
    assert len(bodies) <= 2, [len(b) for b in bodies]


async def test_requests_share_one_upstream_session(
    upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[object] = []
    original = aiohttp.ClientSession.__init__

    def counting_init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        created.append(self)
        original(self, *args, **kwargs)

    async with run_gateway(config(upstream_url)) as gateway, aiohttp.ClientSession() as client:
        url = gateway.url + "/v1/chat/completions"
        async with client.post(url, json=chat_body(False)) as response:
            await response.read()  # the gateway's session exists from here on
        monkeypatch.setattr(aiohttp.ClientSession, "__init__", counting_init)
        for stream in (False, True) * 10:
            async with client.post(url, json=chat_body(stream)) as response:
                assert response.status == 200
                await response.read()
    assert created == []


async def test_a_held_stream_watches_for_its_client_leaving_without_a_task() -> None:
    """Under hypercorn, ``receive`` is a mailbox that hands ``http.disconnect`` to the
    router's watch as it arrives: no task (and its coroutines and future) per stream held,
    and the client leaving still closes the upstream call at once."""
    upstream_gone = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(b"data: " + event + b"\n\n" for event in EVENTS[:2]))
        try:
            for _ in range(1000):  # holding the stream open, as a slow model would
                await asyncio.sleep(0.01)
                await response.write(b": keep-alive\n\n")
        except ConnectionError:  # the gateway closed the call
            upstream_gone.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with (
        serve_web(app) as upstream,
        run_gateway(config(upstream + "/v1")) as gateway,
        aiohttp.ClientSession() as client,
    ):
        response = await client.post(gateway.url + "/v1/chat/completions", json=chat_body(True))
        assert response.status == 200
        await response.content.readuntil(b"\n\n")  # the stream is open and held
        watchers = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "DisconnectWatch._watch"
        ]
        assert watchers == []
        response.close()  # the client leaves mid-stream
        await asyncio.wait_for(upstream_gone.wait(), 5)
