"""The routing app: resolve the alias, run the failover loop, answer as JSON or SSE.

The response starts only once an upstream produced its first chunk, so every failure
before that is still a retry, a fallback or a clean JSON error. While it works the router
watches ``receive`` for ``http.disconnect`` and, when the client leaves, cancels the
upstream call at once, which closes its connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial

from providers.base import Chunk, Completion, UpstreamCall
from resillm.asgi import JSON_CONTENT_TYPE, Headers, Message, Receive, Scope, Send
from resillm.balance import Balancer, CostOf
from resillm.config import ResilienceConfig
from resillm.context import RequestContext
from resillm.errors import (
    InvalidRequest,
    ModelNotFound,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from resillm.failover import Failover
from resillm.hypercorn_lean import Mailbox
from resillm.relay import OpenStream, StreamRelay
from resillm.targets import Route, Target
from resillm.usage import add_usage, estimate_tokens, prompt_chars

EXPECTED_COMPLETION_TOKENS = 512  # for the cost strategy, when the client set no limit
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class DisconnectWatch:
    """Cancels the request's task when the client disconnects (hypercorn says so only as
    ``http.disconnect`` on ``receive``).

    Under ``resillm serve`` with hypercorn, ``receive`` is a :class:`Mailbox`'s, which hands
    each event to the watch as it arrives; elsewhere a task waits on ``receive``."""

    __slots__ = ("_mailbox", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self.disconnected = False
        self._task: asyncio.Task[object] | None = task
        self._watcher: asyncio.Task[None] | None = None
        mailbox = getattr(receive, "__self__", None)
        self._mailbox = mailbox if isinstance(mailbox, Mailbox) else None
        if self._mailbox is not None:
            self._mailbox.listen(self._on_event)
        else:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    def _on_event(self, message: Message) -> None:
        if message["type"] == "http.disconnect" and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while self._task is not None:
            message = await receive()
            self._on_event(message)
            if self.disconnected:
                return

    def stop(self) -> None:
        # Let go of the task and the mailbox: a watcher's CancelledError's traceback holds
        # its frame's `self`, and the mailbox is reached from the task's own frames: a
        # reference back from either would make a cycle only the garbage collector frees.
        self._task = None
        if self._mailbox is not None:
            self._mailbox.listen(None)
            self._mailbox = None
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()


class Router:
    def __init__(
        self,
        routes: dict[str, Route],
        resilience: ResilienceConfig,
        cost_of: CostOf | None = None,
    ) -> None:
        self.routes = routes
        self.balancers = {
            alias: Balancer(route, cost_of=cost_of) for alias, route in routes.items()
        }
        self.timeouts = resilience.timeouts
        self.failover = Failover(resilience)
        self.stream_recovery = resilience.stream_recovery

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
                # Opened in a frame of its own, which is gone by the time the stream is
                # relayed: a held stream holds one frame less.
                relay = await self.open_relay(ctx, route, send)
                await relay.run()
            else:
                await self.complete(ctx, route, send)
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            task.uncancel()
            ctx.status, ctx.error = 499, "client disconnected"
        finally:
            watch.stop()

    def balanced_chain(self, ctx: RequestContext, route: Route) -> list[Target]:
        balancer = self.balancers[route.alias]
        if balancer.strategy != "cost" or ctx.request is None:
            return balancer.chain()
        request = ctx.request
        expected = (
            estimate_tokens(prompt_chars(request)),
            request.token_limit or EXPECTED_COMPLETION_TOKENS,
        )
        return balancer.chain(expected)

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
            return await target.upstream.complete(call)  # the failover loop bounds it

        chain = self.balanced_chain(ctx, route)
        target, completion = await self.failover.run(ctx, route, attempt, chain=chain)
        ctx.provider, ctx.upstream_model = target.provider, completion.model
        ctx.usage = completion.usage
        body = ctx.answer_body = completion.body
        headers = [
            JSON_CONTENT_TYPE,
            (b"content-length", str(len(body)).encode()),
            *resillm_headers(ctx, target, completion.model),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def open_relay(self, ctx: RequestContext, route: Route, send: Send) -> StreamRelay:
        """The stream's relay, once an upstream stream has its first token."""
        call = self.call_for(ctx)
        balanced = self.balanced_chain(ctx, route)
        opener = partial(self.open_stream, ctx, route, balanced)
        target, opened = await opener(call, None, None)
        ctx.ttft_s = time.monotonic() - ctx.started
        model = opened.head[0].model or target.model
        ctx.provider, ctx.upstream_model = target.provider, model
        headers = [*SSE_HEADERS, *resillm_headers(ctx, target, model)]
        return StreamRelay(
            ctx,
            call,
            balanced,
            opener,
            recovery=self.stream_recovery,
            send=send,
            opened=(target, opened, headers),
        )

    async def open_stream(
        self,
        ctx: RequestContext,
        route: Route,
        balanced: list[Target],
        call: UpstreamCall,
        chain: Sequence[Target] | None,
        max_attempts: int | None,
    ) -> tuple[Target, OpenStream]:
        """Open ``call`` along ``chain`` (the balanced chain when ``None``): the relay's
        opener, for the first call and for each recovery."""
        # One deadline for the whole request, recoveries included.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.request - (time.monotonic() - ctx.started)
        return await self.failover.run(
            ctx,
            route,
            partial(self.open_attempt, call, ctx=ctx),
            chain=balanced if chain is None else chain,
            max_attempts=max_attempts,
            deadline=deadline,
            settle=False,  # the relay settles the circuit when the stream ends
        )

    async def open_attempt(
        self,
        call: UpstreamCall,
        target: Target,
        seconds_left: float,
        *,
        ctx: RequestContext | None = None,
    ) -> OpenStream:
        """Open a stream and read it up to its first token within the first-token timeout.

        A role-only chunk is not a token: until content (or a tool call, or a finish)
        arrives, a failure can still be retried or fall back, since the client has seen
        nothing yet. Usage such a failed call reported (a stream ending with its usage but
        no token, as a continuation with nothing left to say) is added to ``ctx.usage``:
        the upstream billed it."""
        limit = min(self.timeouts.first_token, seconds_left)
        try:
            async with asyncio.timeout(limit):
                upstream_stream = await target.upstream.open_stream(call)
                chunks = aiter(upstream_stream)
                head: list[Chunk] = []
                try:
                    while not head or not head[-1].substantial:
                        head.append(await anext(chunks))
                except BaseException:
                    await upstream_stream.aclose()
                    if ctx is not None:
                        for chunk in head:
                            if chunk.usage is not None:
                                ctx.usage = add_usage(ctx.usage, chunk.usage)
                    raise
        except TimeoutError:
            raise _timeout(target, f"no first token within {limit:g}s") from None
        except StopAsyncIteration:
            raise UpstreamProtocolError(
                "stream ended before its first chunk",
                provider=target.provider,
                model=target.model,
            ) from None
        return OpenStream(upstream_stream, chunks, tuple(head))


def resillm_headers(ctx: RequestContext, target: Target, model: str) -> Headers:
    return [
        (b"x-resillm-provider", target.provider.encode()),
        (b"x-resillm-model", model.encode()),
        (b"x-resillm-attempts", str(ctx.attempts).encode()),
    ]


def _timeout(target: Target, message: str) -> UpstreamTimeout:
    return UpstreamTimeout(message, provider=target.provider, model=target.model)
