"""The cache layer: answer identical chat completions from the cache, or record the answer.

Only ``POST /v1/chat/completions`` with a parsed request for a configured alias; the layer is
not in the stack at all when ``cache.enabled`` is false. Every chat completion it handles
gets ``x-resillm-cache``:

- ``hit``: answered from the cache (or from an identical request in flight, see below),
  with no upstream call: as JSON, or as an SSE stream synthesised from the stored answer
  when the client asked to stream. ``x-resillm-attempts: 0``; ``ctx.usage`` stays empty and
  the budget bills nothing.
- ``miss``: looked up, not found; the response is forwarded as it comes (never buffered)
  and its answer stored when it is a complete success. A JSON answer is the router's body
  (status 200), kept as is and read only when served: one whose choices did not all finish
  is then a miss. A stream's answer is assembled on the side as its events pass, and kept
  when it started with 200 and ended with ``[DONE]``, no error event before it.
- ``bypass``: not looked up. The client sent ``Cache-Control: no-cache`` (or ``max-age=0``):
  the answer still refreshes the entry. Or the request is not cacheable: ``n`` > 1,
  ``logprobs`` or audio output (the stored answer keeps one text per choice and no
  logprobs or audio), or the client sent both ``no-cache`` and ``no-store``.

``Cache-Control: no-store`` alone: looked up as usual, the answer is not stored.

Coalescing (``cache.coalesce``): the first request for a key leads; identical requests
arriving while it is in flight wait, up to ``coalesce_timeout``, for its answer and are
served from it as hits. When the leader fails (or leaves) the waiters are not given its
failure: each goes upstream itself. A waiter whose client disconnects stops waiting.
Requests with ``no-store`` never lead (their answer is not to be kept); requests with
``no-cache`` never wait.

``resillm_cache_requests_total{result}`` counts lookups: ``hit``, ``miss``, and ``error``
when the store could not answer in time (Redis down) and the request went on without it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any, NamedTuple

from middleware.request import CHAT_COMPLETIONS
from resillm.asgi import ASGIApp, Headers, Message, Receive, Scope, Send, direct, send_json
from resillm.cache import ResponseCache, cache_key
from resillm.cache_answer import (
    AnswerRecorder,
    CachedAnswer,
    CachedBody,
    Stored,
    completion_json,
    readable,
    stream_events,
)
from resillm.context import RequestContext
from resillm.errors import GatewayError
from resillm.metrics import Metrics
from resillm.schema import ChatCompletionRequest

CACHE_HEADER_NAME = "x-resillm-cache"
CACHE_HEADER = CACHE_HEADER_NAME.encode()
_HEADERS = {status: (CACHE_HEADER, status.encode()) for status in ("hit", "miss", "bypass")}
_RESULT_LABELS = {result: (("result", result),) for result in ("hit", "miss", "error")}
# The router's SSE headers (middleware cannot import the router).
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Policy(NamedTuple):
    """What the client allows for this request."""

    cacheable: bool  # False: neither looked up nor stored
    look: bool  # look the answer up (no ``no-cache``)
    store: bool  # store the answer (no ``no-store``)


USUAL = Policy(True, True, True)  # no Cache-Control: what nearly every request gets
UNCACHEABLE = Policy(False, False, False)


def request_policy(scope: Scope, request: ChatCompletionRequest, raw: dict[str, object]) -> Policy:
    if request.n not in (None, 1) or request.logprobs or raw.get("audio") is not None:
        return UNCACHEABLE
    modalities = raw.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        return UNCACHEABLE
    directives: set[str] | None = None
    for name, value in scope.get("headers", ()):
        if name == b"cache-control":
            directives = directives or set()
            directives.update(d.strip().lower() for d in value.decode("latin-1").split(","))
    if directives is None:
        return USUAL
    look = not ({"no-cache", "max-age=0"} & directives)
    store = "no-store" not in directives
    return Policy(look or store, look, store)


class _ClientGone(Exception):
    """The client disconnected while its request waited for an identical one."""


class CacheMiddleware:
    def __init__(
        self, app: ASGIApp, *, cache: ResponseCache, metrics: Metrics, aliases: Collection[str]
    ) -> None:
        self.app = direct(app)
        self.cache = cache
        self.metrics = metrics
        self.aliases = aliases

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        request, raw, alias = ctx.request, ctx.raw, ctx.alias
        if (
            ctx.route != CHAT_COMPLETIONS
            or scope["method"] != "POST"
            or request is None
            or raw is None
            or alias is None
            or alias not in self.aliases
        ):
            await self.app(scope, receive, send)  # the router answers errors (404, 405)
            return
        policy = request_policy(scope, request, raw)
        if not policy.cacheable:
            await self.forward(ctx, scope, receive, send, "bypass")
            return
        key = cache_key(alias, raw)
        status = "miss" if policy.look else "bypass"
        flights = self.cache.flights
        flight = None
        if self.cache.config.coalesce:
            pending = flights.current(key)
            if pending is None:
                flight = flights.lead(key) if policy.store else None
            elif policy.look:
                try:
                    shared = await self.wait(pending, receive)
                except _ClientGone:
                    ctx.status, ctx.error = 499, "client disconnected"
                    return
                if shared is not None:
                    self.count("hit")
                    await self.serve(ctx, shared, send)
                    return
                # The leader failed or is too slow: go upstream, as it did.
                self.count("miss")
                policy = policy._replace(look=False)
        answer: Stored | None = None  # what the client got, when a whole success
        try:
            if policy.look:  # a lookup (with no coroutine for the memory store)
                lookup = self.cache.get_now(key) or await self.cache.get(key)
                self.metrics.count(self.metrics.cache_requests, _RESULT_LABELS[lookup.result])
                if lookup.answer is not None:
                    answer = lookup.answer
                    await self.serve(ctx, answer, send)
                    return
            recorder = AnswerRecorder(stream=True) if ctx.stream else None
            sending = send if recorder is None else recording(recorder, send)
            await self.forward(ctx, scope, receive, sending, status)
            answer = recorded(ctx, recorder)
        finally:
            if flight is not None:
                flights.land(key, flight, answer)
        if policy.store and answer is not None and not self.cache.put_now(key, answer):
            await self.cache.put(key, answer)

    async def wait(
        self, pending: asyncio.Future[Stored | None], receive: Receive
    ) -> CachedAnswer | None:
        """The leader's answer; ``None`` when it failed, it is not a complete answer, or it
        took over ``coalesce_timeout``.

        Listens for ``http.disconnect`` meanwhile (hypercorn's only sign of a gone client);
        anything else on ``receive`` ends the listening, never the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cache.config.coalesce_timeout
        listener: asyncio.Future[Message] | None = asyncio.ensure_future(receive())
        try:
            while not pending.done() and (left := deadline - loop.time()) > 0:
                either: set[asyncio.Future[Any]] = {pending, *([listener] if listener else [])}
                await asyncio.wait(either, timeout=left, return_when="FIRST_COMPLETED")
                if listener is not None and listener.done():
                    if _disconnected(listener):
                        raise _ClientGone
                    listener = None
        finally:
            if listener is not None and not listener.done():
                listener.cancel()
        shared = pending.result() if pending.done() else None
        return None if shared is None else readable(shared)

    async def forward(
        self, ctx: RequestContext, scope: Scope, receive: Receive, send: Send, status: str
    ) -> None:
        """Pass the request on with the header added (a stream's ``send`` may record)."""
        ctx.cache = status
        ctx.headers_out += (_HEADERS[status],)
        try:
            await self.app(scope, receive, send)
        except GatewayError as exc:  # rendered by the errors layer: it takes our header too
            exc.headers.setdefault(CACHE_HEADER_NAME, status)
            raise

    async def serve(self, ctx: RequestContext, answer: CachedAnswer, send: Send) -> None:
        """Answer from ``answer`` without going upstream."""
        ctx.cache = "hit"
        ctx.usage = None  # nothing was spent: the budget bills 0
        ctx.provider, ctx.upstream_model, ctx.attempts = answer.provider, answer.model, 0
        ctx.headers_out += (_HEADERS["hit"],)
        headers: Headers = [
            (b"x-resillm-provider", answer.provider.encode()),
            (b"x-resillm-model", answer.model.encode()),
            (b"x-resillm-attempts", b"0"),
        ]
        if not ctx.stream:
            await send_json(send, 200, completion_json(answer), headers)
            return
        assert ctx.request is not None
        options = ctx.request.stream_options
        events = list(stream_events(answer, include_usage=bool(options and options.include_usage)))
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]}
        )
        ctx.ttft_s = time.monotonic() - ctx.started
        if answer.choices:
            ctx.streamed = bytearray((answer.choices[0].content or "").encode())  # access log
        last = len(events) - 1
        for position, event in enumerate(events):
            await send({"type": "http.response.body", "body": event, "more_body": position < last})

    def count(self, result: str) -> None:
        self.metrics.count(self.metrics.cache_requests, _RESULT_LABELS[result])


def recorded(ctx: RequestContext, recorder: AnswerRecorder | None) -> Stored | None:
    """The answer of a response that was a whole success, else ``None``: a JSON answer is
    the body the router sent, kept as is; a stream's is what ``recorder`` assembled."""
    provider = ctx.provider
    if provider is None:
        return None
    if recorder is None:
        body = ctx.answer_body
        return None if body is None else CachedBody(ctx.upstream_model or "", provider, body)
    if not recorder.succeeded:
        return None
    return recorder.answer(provider=provider, model=ctx.upstream_model, usage=ctx.usage)


def recording(recorder: AnswerRecorder, send: Send) -> Send:
    """``send`` that feeds a streamed response's events to ``recorder`` once it started
    with status 200."""

    async def send_recording_answer(message: Message) -> None:
        await send(message)
        if message["type"] == "http.response.start":
            recorder.succeeded = message["status"] == 200
        elif recorder.succeeded and message["type"] == "http.response.body":
            recorder.feed(message.get("body", b""))

    return send_recording_answer


def _disconnected(listener: asyncio.Future[Message]) -> bool:
    if not listener.done() or listener.cancelled() or listener.exception() is not None:
        return False
    return bool(listener.result()["type"] == "http.disconnect")
