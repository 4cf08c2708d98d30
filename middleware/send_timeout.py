"""End a request whose client stopped taking its response (``server.send_timeout``).

Backpressure already bounds memory: the server's ``send`` waits while the client's buffers
are full, so the relay stops reading the upstream and the upstream's writes block. What it
does not bound is time: a client that never reads would hold the request, its upstream
connection and a slot of the provider's ``max_connections`` for as long as it likes.

A timer per request, not per chunk: each send only bumps a counter and sets a flag; every
``timeout / CHECKS`` seconds the timer looks whether the same send is still waiting. After
``CHECKS`` looks in a row (so between ``timeout`` and ``timeout * (1 + 1 / CHECKS)``) it
cancels the request's task: the relay closes the upstream call and bills what was sent,
the access log records a 408, and the server closes the connection once it can.
"""

from __future__ import annotations

import asyncio

from resillm.asgi import ASGIApp, Message, Receive, Scope, Send
from resillm.context import SCOPE_KEY, RequestContext

CHECKS = 4


class SendWatch:
    """Wraps one request's ``send`` and cancels ``task`` when a send waits too long."""

    __slots__ = (
        "_handle",
        "_loop",
        "_period",
        "_seen",
        "_send",
        "_strikes",
        "_task",
        "pending",
        "sends",
        "stalled",
    )

    def __init__(self, send: Send, task: asyncio.Task[object], timeout: float) -> None:
        self._send = send
        self._task = task
        self._period = timeout / CHECKS
        self._loop = asyncio.get_running_loop()
        self.sends = 0  # sends begun
        self.pending = False  # one is waiting on the client now
        self.stalled = False  # the timer cancelled the task
        self._seen = 0
        self._strikes = 0
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._period, self._check)

    async def __call__(self, message: Message) -> None:
        self.sends += 1
        self.pending = True
        await self._send(message)
        self.pending = False

    def _check(self) -> None:
        if self.pending and self.sends == self._seen:
            self._strikes += 1
            if self._strikes >= CHECKS:
                self.stalled = True
                self._handle = None
                self._task.cancel()
                return
        else:
            self._seen, self._strikes = self.sends, 0
        self._handle = self._loop.call_later(self._period, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class SendTimeoutMiddleware:
    def __init__(self, app: ASGIApp, *, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        watch = SendWatch(send, task, self.timeout)
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            # Ours alone: anything else cancelling too (shutdown) still goes through.
            if not watch.stalled or task.uncancel() > 0:
                raise
            ctx: RequestContext | None = scope.get(SCOPE_KEY)
            if ctx is not None:
                ctx.status = 408
                ctx.error = f"the client took no response bytes for {self.timeout:g}s"
        finally:
            watch.close()
