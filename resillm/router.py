"""The routing app: resolve the alias, call its target, answer as JSON or as an SSE stream.

The response starts only once the upstream produced its first chunk, so every failure
before that is still a clean JSON error (and, with the resilience loop, a retry or a
fallback). While it works the router watches ``receive`` for ``http.disconnect`` and, when
the client leaves, cancels the upstream call at once, which closes its connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

from providers.base import Chunk, Completion, Provider, Upstream, UpstreamCall
from providers.sse import DONE_EVENT, encode_data
from resillm.asgi import JSON_CONTENT_TYPE, Headers, Receive, Scope, Send
from resillm.config import Config, ModelConfig, TimeoutsConfig
from resillm.context import RequestContext
from resillm.errors import (
    AllTargetsFailed,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Target:
    """One entry of an alias's target list, bound to its provider."""

    __slots__ = ("model", "provider", "upstream", "weight")

    def __init__(self, upstream: Upstream, weight: float) -> None:
        self.upstream = upstream
        self.provider = upstream.provider
        self.model = upstream.model
        self.weight = weight


class Route:
    __slots__ = ("alias", "config", "targets")

    def __init__(self, alias: str, config: ModelConfig, targets: list[Target]) -> None:
        self.alias = alias
        self.config = config
        self.targets = targets


def build_routes(config: Config, providers: Mapping[str, Provider]) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for alias, model in config.models.items():
        targets = [
            Target(
                providers[t.provider].bind(t.model, api_key=t.api_key, base_url=t.base_url),
                t.weight,
            )
            for t in model.targets
        ]
        routes[alias] = Route(alias, model, targets)
    return routes


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


class Router:
    def __init__(self, routes: dict[str, Route], timeouts: TimeoutsConfig) -> None:
        self.routes = routes
        self.timeouts = timeouts

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
        target = route.targets[0]
        ctx.attempts += 1
        try:
            async with asyncio.timeout(self.timeouts.request):
                completion = await target.upstream.complete(self.call_for(ctx))
        except TimeoutError:
            raise self.failed(route, [self.deadline_error(target)]) from None
        except UpstreamError as exc:
            raise self.failed(route, [exc]) from None
        await self.send_completion(ctx, target, completion, send)

    async def send_completion(
        self, ctx: RequestContext, target: Target, completion: Completion, send: Send
    ) -> None:
        ctx.provider, ctx.upstream_model, ctx.usage = (
            target.provider,
            completion.model,
            completion.usage,
        )
        body = completion.body
        headers = [
            JSON_CONTENT_TYPE,
            (b"content-length", str(len(body)).encode()),
            *self.resillm_headers(ctx, target, completion.model),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def stream(self, ctx: RequestContext, route: Route, send: Send) -> None:
        target = route.targets[0]
        ctx.attempts += 1
        first_token_s = min(self.timeouts.first_token, self.timeouts.request)
        try:
            async with asyncio.timeout(first_token_s):
                upstream_stream = await target.upstream.open_stream(self.call_for(ctx))
                chunks = aiter(upstream_stream)
                try:
                    first = await anext(chunks)
                except BaseException:
                    await upstream_stream.aclose()
                    raise
        except TimeoutError:
            raise self.failed(route, [self.first_token_error(target)]) from None
        except StopAsyncIteration:
            error = UpstreamProtocolError(
                "stream ended before its first chunk", provider=target.provider, model=target.model
            )
            raise self.failed(route, [error]) from None
        except UpstreamError as exc:
            raise self.failed(route, [exc]) from None
        ctx.ttft_s = time.monotonic() - ctx.started
        try:
            await self.relay(ctx, target, first, chunks, send)
        finally:
            await upstream_stream.aclose()

    async def relay(
        self,
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
        headers = [*SSE_HEADERS, *self.resillm_headers(ctx, target, model)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        usage = first.usage
        try:
            if first.forward:
                await send(
                    {
                        "type": "http.response.body",
                        "body": encode_data(first.data),
                        "more_body": True,
                    }
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

    @staticmethod
    def resillm_headers(ctx: RequestContext, target: Target, model: str) -> Headers:
        return [
            (b"x-resillm-provider", target.provider.encode()),
            (b"x-resillm-model", model.encode()),
            (b"x-resillm-attempts", str(ctx.attempts).encode()),
        ]

    @staticmethod
    def failed(route: Route, failures: list[UpstreamError]) -> Exception:
        """A client error the upstream diagnosed goes back as it is; the rest is 'all failed'."""
        last = failures[-1]
        if (
            isinstance(last, UpstreamStatusError)
            and 400 <= last.status < 500
            and not last.retryable
            and last.status not in (401, 403, 404)
        ):
            return last
        return AllTargetsFailed(route.alias, failures)

    def deadline_error(self, target: Target) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"no answer within the request deadline ({self.timeouts.request:g}s)",
            provider=target.provider,
            model=target.model,
        )

    def first_token_error(self, target: Target) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"no first token within {min(self.timeouts.first_token, self.timeouts.request):g}s",
            provider=target.provider,
            model=target.model,
        )
