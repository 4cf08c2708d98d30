"""The routing app: resolve the alias, run the failover loop, answer as JSON or SSE.

The response starts only once an upstream produced its first chunk, so every failure
before that is still a retry, a fallback or a clean JSON error. While it works the router
watches ``receive`` for ``http.disconnect`` and, when the client leaves, cancels the
upstream call at once, which closes its connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from providers.base import Chunk, ChunkStream, Completion, UpstreamCall
from providers.sse import DONE_EVENT, encode_data
from resillm.asgi import JSON_CONTENT_TYPE, Headers, Receive, Scope, Send
from resillm.config import ResilienceConfig
from resillm.context import RequestContext
from resillm.errors import (
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from resillm.failover import Failover
from resillm.targets import Route, Target

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class DisconnectWatch:
    """Cancels the request's task when the client disconnects (hypercorn says so only as
    ``http.disconnect`` on ``receive``)."""

    __slots__ = ("_watcher", "disconnected")

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self.disconnected = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive, task))

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                task.cancel()
                return

    def stop(self) -> None:
        self._watcher.cancel()


class _OpenStream(NamedTuple):
    stream: ChunkStream
    chunks: AsyncIterator[Chunk]
    first: Chunk


class Router:
    def __init__(self, routes: dict[str, Route], resilience: ResilienceConfig) -> None:
        self.routes = routes
        self.timeouts = resilience.timeouts
        self.failover = Failover(resilience)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        if ctx.request is None or ctx.raw is None or ctx.alias is None:
            raise InvalidRequest("expected a chat completion request")
        route = self.routes.get(ctx.alias)
        if route is None:
            raise ModelNotFound(f"the model '{ctx.alias}' does not exist", param="model")
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task)
        try:
            if ctx.stream:
                await self.stream(ctx, route, send)
            else:
                await self.complete(ctx, route, send)
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            task.uncancel()
            ctx.status, ctx.error = 499, "client disconnected"
        finally:
            watch.stop()

    def call_for(self, ctx: RequestContext) -> UpstreamCall:
        assert ctx.request is not None and ctx.raw is not None
        return UpstreamCall(
            ctx.request,
            ctx.raw,
            request_id=ctx.request_id,
            stream=ctx.stream,
            stream_idle_s=self.timeouts.stream_idle,
        )

    async def complete(self, ctx: RequestContext, route: Route, send: Send) -> None:
        call = self.call_for(ctx)

        async def attempt(target: Target, seconds_left: float) -> Completion:
            try:
                async with asyncio.timeout(seconds_left):
                    return await target.upstream.complete(call)
            except TimeoutError:
                raise _timeout(target, "no answer within the request deadline") from None

        target, completion = await self.failover.run(ctx, route, attempt)
        ctx.provider, ctx.upstream_model = target.provider, completion.model
        ctx.usage = completion.usage
        body = completion.body
        headers = [
            JSON_CONTENT_TYPE,
            (b"content-length", str(len(body)).encode()),
            *resillm_headers(ctx, target, completion.model),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def stream(self, ctx: RequestContext, route: Route, send: Send) -> None:
        call = self.call_for(ctx)
        first_token_s = self.timeouts.first_token

        async def attempt(target: Target, seconds_left: float) -> _OpenStream:
            limit = min(first_token_s, seconds_left)
            try:
                async with asyncio.timeout(limit):
                    upstream_stream = await target.upstream.open_stream(call)
                    chunks = aiter(upstream_stream)
                    try:
                        first = await anext(chunks)
                    except BaseException:
                        await upstream_stream.aclose()
                        raise
            except TimeoutError:
                raise _timeout(target, f"no first token within {limit:g}s") from None
            except StopAsyncIteration:
                raise UpstreamProtocolError(
                    "stream ended before its first chunk",
                    provider=target.provider,
                    model=target.model,
                ) from None
            return _OpenStream(upstream_stream, chunks, first)

        target, opened = await self.failover.run(ctx, route, attempt)
        ctx.ttft_s = time.monotonic() - ctx.started
        try:
            await relay(ctx, target, opened.first, opened.chunks, send)
        finally:
            await opened.stream.aclose()


async def relay(
    ctx: RequestContext,
    target: Target,
    first: Chunk,
    chunks: AsyncIterator[Chunk],
    send: Send,
) -> None:
    """Past the point of no return: forward chunks as they come; a failure now ends the
    stream with one SSE error event, never with ``[DONE]``."""
    model = first.model or target.model
    ctx.provider, ctx.upstream_model = target.provider, model
    headers = [*SSE_HEADERS, *resillm_headers(ctx, target, model)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    usage = first.usage
    try:
        if first.forward:
            await send(
                {"type": "http.response.body", "body": encode_data(first.data), "more_body": True}
            )
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.forward:
                await send(
                    {
                        "type": "http.response.body",
                        "body": encode_data(chunk.data),
                        "more_body": True,
                    }
                )
    except UpstreamError as exc:
        ctx.error = exc.message
        await send(
            {"type": "http.response.body", "body": encode_data(exc.body()), "more_body": False}
        )
        return
    finally:
        ctx.usage = usage
    await send({"type": "http.response.body", "body": DONE_EVENT, "more_body": False})


def resillm_headers(ctx: RequestContext, target: Target, model: str) -> Headers:
    return [
        (b"x-resillm-provider", target.provider.encode()),
        (b"x-resillm-model", model.encode()),
        (b"x-resillm-attempts", str(ctx.attempts).encode()),
    ]


def _timeout(target: Target, message: str) -> UpstreamTimeout:
    return UpstreamTimeout(message, provider=target.provider, model=target.model)
