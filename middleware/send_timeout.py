"""End a request whose client stopped taking its response (``server.send_timeout``).

Backpressure already bounds memory: the server's ``send`` waits while the client's buffers
are full, so the relay stops reading the upstream and the upstream's writes block. What it
does not bound is time: a client that never reads would hold the request, its upstream
connection and a slot of the provider's ``max_connections`` for as long as it likes.

One timer for all requests, not one per request or per chunk: each send only bumps a
counter and sets a flag; every ``timeout / CHECKS`` seconds the timer looks whether the same
send of each request is still waiting. After ``CHECKS`` looks in a row (so between
``timeout`` and ``timeout * (1 + 1 / CHECKS)``) it cancels that request's task: the relay
closes the upstream call and bills what was sent, the access log records a 408, and the
server closes the connection once it can. The timer runs only while requests are in flight.
"""

from __future__ import annotations

import asyncio

from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, direct
from resillm.context import SCOPE_KEY, RequestContext

CHECKS = 4


class SendWatch:
    """Wraps one request's ``send``; :meth:`check` cancels ``task`` when a send waits too long."""

    __slots__ = ("_seen", "_send", "_strikes", "_task", "pending", "sends", "stalled")

    def __init__(self, send: Send, task: asyncio.Task[object]) -> None:
        self._send = send
        self._task = task
        self.sends = 0  # sends begun
        self.pending = False  # one is waiting on the client now
        self.stalled = False  # the check cancelled the task
        self._seen = 0
        self._strikes = 0

    async def __call__(self, message: Message) -> None:
        self.sends += 1
        self.pending = True
        await self._send(message)
        self.pending = False

    def check(self) -> bool:
        """One look, every ``timeout / CHECKS``; True once there is nothing more to watch
        (the task cancelled by it, or over without having said so)."""
        if self._task.done():
            return True
        if self.pending and self.sends == self._seen:
            self._strikes += 1
            if self._strikes >= CHECKS:
                self.stalled = True
                self._task.cancel()
                return True
        else:
            self._seen, self._strikes = self.sends, 0
        return False


class SendTimeoutMiddleware:
    def __init__(self, app: ASGIApp, *, timeout: float) -> None:
        self.app = direct(app)
        self.timeout = timeout
        self._period = timeout / CHECKS
        # One timer for every request in flight, running only while there is one.
        self._watches: set[SendWatch] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        watch = SendWatch(send, task)
        self._watches.add(watch)
        loop = task.get_loop()
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_later(self._period, self._sweep)
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
            self._watches.discard(watch)
            if not self._watches and self._timer is not None:
                self._timer.cancel()  # idle: no timer left behind in the loop
                self._timer = self._loop = None

    def _sweep(self) -> None:
        watches = self._watches
        for watch in [w for w in watches if w.check()]:
            watches.discard(watch)
        self._timer = None
        if watches:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._sweep)
        else:
            self._loop = None
