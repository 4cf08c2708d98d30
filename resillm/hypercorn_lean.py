"""Lighter per-connection objects for hypercorn: the same behaviour in less memory.

hypercorn (0.18 and before) gives every request an ``asyncio.Queue`` for the events it
hands the app's ``receive``, and every connection an ``asyncio.Event`` (``can_read``). The
queue holds three deques and an ``Event``, and each ``Event`` a deque, and an empty deque
takes some 760 bytes: about 4 KB per connection, 4 MB for a thousand held streams, whatever
the app does. A request's receive side sees a handful of events (its body, then
``http.disconnect``) and ``join``/``task_done`` are never used; an event has one waiter.

- :class:`Mailbox` keeps the events in a list and makes its waiter lists only when someone
  waits; it behaves as the queue does as hypercorn uses it: ``put`` waits while
  ``maxsize`` events are unread (backpressure on a body the app does not read), ``get``
  waits for the next, waiters are served in order, a cancelled waiter passes its wake-up
  on. :meth:`Mailbox.listen` lets the router watch for ``http.disconnect`` without a task.
- :class:`LeanEvent` is hypercorn's ``event_class`` (its own extension point) without the
  deque.
- The WSGI helpers hypercorn makes per request (two closures) are not made for an ASGI app,
  which never receives them.
- :class:`IdleTimer` keeps a connection's keep-alive watch as an entry in the worker's
  :class:`IdleConnections` (one loop timer for them all) instead of two tasks made and
  cancelled on every request.

Guarded by ``tests/unit/test_hypercorn_lean.py``, and by integration tests that check
hypercorn still uses them: should hypercorn's internals change, the patch is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

_PATCHED = "_resillm_mailbox"
_IDLE = "_resillm_idle_connections"  # a worker context's IdleConnections


class Mailbox:
    """A FIFO of ``maxsize`` items (``<= 0``: unbounded) for one event loop."""

    __slots__ = ("_getters", "_items", "_listener", "_maxsize", "_putters")

    def __init__(self, maxsize: int = 0) -> None:
        self._maxsize = maxsize
        self._items: list[Any] | None = None  # made when there is something to keep
        self._getters: list[asyncio.Future[None]] | None = None
        self._putters: list[asyncio.Future[None]] | None = None
        self._listener: Callable[[Any], object] | None = None

    def listen(self, listener: Callable[[Any], object] | None) -> None:
        """Hand every item to ``listener`` as it is put (those waiting first) instead of
        queuing it; ``None`` queues them again. For an app that only watches its
        ``receive`` for ``http.disconnect``: a call where a watching task would cost a
        task, two coroutines and a future for as long as the request lasts."""
        self._listener = listener
        if listener is not None:
            items, self._items = self._items, None
            for item in items or ():
                listener(item)
            while self._putters:
                _wake(self._putters)

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def full(self) -> bool:
        return 0 < self._maxsize <= self.qsize()

    async def get(self) -> Any:
        while not self._items:
            if self._getters is None:
                self._getters = []
            await _wait(self._getters, lambda: bool(self._items))
        item = self._items.pop(0)
        _wake(self._putters)
        return item

    async def put(self, item: Any) -> None:
        while self._listener is None and self.full():
            if self._putters is None:
                self._putters = []
            await _wait(self._putters, lambda: self._listener is not None or not self.full())
        if self._listener is not None:
            self._listener(item)
            return
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        _wake(self._getters)


async def _wait(waiters: list[asyncio.Future[None]], ready: Callable[[], bool]) -> None:
    future = asyncio.get_running_loop().create_future()
    waiters.append(future)
    try:
        await future
    except BaseException:
        if future in waiters:
            waiters.remove(future)
        elif ready():
            _wake(waiters)  # woken, then cancelled: the next waiter takes the turn
        raise


def _wake(waiters: list[asyncio.Future[None]] | None) -> None:
    while waiters:
        future = waiters.pop(0)
        if not future.done():
            future.set_result(None)
            return


class LeanEvent:
    """hypercorn's ``EventWrapper`` (an ``asyncio.Event`` behind async methods), lighter."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    async def clear(self) -> None:
        self._set = False

    async def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            return
        future = self.waiter()
        try:
            await future
        finally:
            self.forget(future)

    def waiter(self) -> asyncio.Future[None]:
        """A future done once the event is set (at once if it is): waiting without a task.
        Hand it back to :meth:`forget` when no longer waiting."""
        future = asyncio.get_running_loop().create_future()
        if self._set:
            future.set_result(None)
        elif self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        return future

    def forget(self, future: asyncio.Future[None]) -> None:
        if self._waiters is not None and future in self._waiters:
            self._waiters.remove(future)


class IdleTimer:
    """hypercorn's keep-alive idle watch (``TCPServer.idle_task``), as an entry in the
    worker's :class:`IdleConnections` instead of a task.

    hypercorn restarts the watch each time a connection turns idle (a response ended) and
    stops it when a request begins: a task awaiting ``wait_for`` (a second task) on the
    worker's ``terminated`` event, cancelled and awaited again at the next request, two
    tasks and two cancellations a request. Here restarting notes the connection's deadline
    and stopping forgets it: two dict operations. An ``action`` that is not that watch
    runs as hypercorn runs it: as a task, cancelled and awaited on restart or stop.
    """

    __slots__ = ("_idle", "_task")

    def __init__(self) -> None:
        self._idle: IdleConnections | None = None  # the worker's, while this one is idle
        self._task: asyncio.Task[Any] | None = None

    async def restart(self, task_group: Any, action: Callable[[], Any]) -> None:
        await self.stop()
        server: Any = getattr(action, "__self__", None)
        context: Any = getattr(server, "context", None)
        if getattr(action, "__name__", "") != "_idle_timeout" or not isinstance(
            getattr(context, "terminated", None), LeanEvent
        ):
            self._task = task_group._task_group.create_task(action())
            return
        idle = getattr(context, _IDLE, None)
        if idle is None:
            idle = IdleConnections(context.terminated)
            setattr(context, _IDLE, idle)
        self._idle = idle
        idle.add(self, server, task_group)

    async def stop(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.discard(self)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class IdleConnections:
    """One worker's idle keep-alive connections, each with its deadline, and one loop timer
    for the soonest: a connection idle for ``keep_alive_timeout`` is closed as hypercorn's
    watch would close it, and every idle one at once when the worker stops (one future on
    its ``terminated`` event for them all)."""

    __slots__ = ("_at", "_deadlines", "_handle", "_loop", "_stopping")

    def __init__(self, terminated: LeanEvent) -> None:
        self._loop = asyncio.get_running_loop()
        # watch -> (deadline, server, task group); in order of deadline, as every
        # connection of a worker has the same keep_alive_timeout and is added when idle.
        self._deadlines: dict[IdleTimer, tuple[float, Any, Any]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the armed timer fires
        self._stopping = terminated.waiter()
        self._stopping.add_done_callback(self._close_all)

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, watch: IdleTimer, server: Any, task_group: Any) -> None:
        if self._stopping.done():  # the worker is stopping: an idle connection goes now
            _close(server, task_group)
            return
        deadline = self._loop.time() + server.config.keep_alive_timeout
        self._deadlines[watch] = (deadline, server, task_group)
        if self._handle is None or deadline < self._at:
            self._arm(deadline)

    def discard(self, watch: IdleTimer) -> None:
        self._deadlines.pop(watch, None)  # an armed timer that finds nothing due is harmless

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at, self._handle = when, self._loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        due = []
        for watch, (deadline, _, _) in self._deadlines.items():
            if deadline > now:
                break
            due.append(watch)
        for watch in due:
            _, server, task_group = self._deadlines.pop(watch)
            watch._idle = None
            _close(server, task_group)
        if self._deadlines:
            self._arm(next(iter(self._deadlines.values()))[0])

    def _close_all(self, _: object) -> None:
        deadlines, self._deadlines = self._deadlines, {}
        for watch, (_, server, task_group) in deadlines.items():
            watch._idle = None
            _close(server, task_group)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _close(server: Any, task_group: Any) -> None:
    # What hypercorn's watch does once the connection was idle too long, or the worker is
    # stopping; shielded there from the watch's own cancellation, so not kept here.
    task_group._task_group.create_task(server._initiate_server_close())


def lighten_hypercorn() -> None:
    """Use :class:`Mailbox` and :class:`LeanEvent` in hypercorn's asyncio worker; once, and
    each a no-op where hypercorn's internals differ from what it replaces."""
    try:
        from hypercorn.asyncio import task_group, worker_context
    except ImportError:
        return
    context = getattr(worker_context, "WorkerContext", None)
    if context is not None and getattr(context, "event_class", None) is getattr(
        worker_context, "EventWrapper", object()
    ):
        context.event_class = LeanEvent
    with contextlib.suppress(ImportError):
        from hypercorn.asyncio import tcp_server

        server = getattr(tcp_server, "TCPServer", None)
        if (
            getattr(tcp_server, "AsyncioSingleTask", None) is worker_context.AsyncioSingleTask
            and callable(getattr(server, "_idle_timeout", None))
            and callable(getattr(server, "_initiate_server_close", None))
        ):
            # What TCPServer makes its idle_task of.
            tcp_server.AsyncioSingleTask = IdleTimer  # type: ignore[attr-defined,assignment]
    group = getattr(task_group, "TaskGroup", None)
    handle = getattr(task_group, "_handle", None)
    original = getattr(group, "spawn_app", None)
    if group is None or handle is None or original is None or getattr(original, _PATCHED, False):
        return
    if original.__code__.co_varnames[:5] != ("self", "app", "config", "scope", "send"):
        return

    from hypercorn.app_wrappers import ASGIWrapper

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        mailbox = Mailbox(config.max_app_queue_size)
        if isinstance(app, ASGIWrapper):
            sync_spawn = call_soon = _for_wsgi  # an ASGI app is not handed them
        else:
            loop = self._loop
            sync_spawn = partial(loop.run_in_executor, None)
            call_soon = partial(_call_soon, loop)
        self.spawn(handle, app, config, scope, mailbox.get, send, sync_spawn, call_soon)
        return mailbox.put

    setattr(spawn_app, _PATCHED, True)
    group.spawn_app = spawn_app


def _for_wsgi(*args: Any) -> Any:
    raise RuntimeError("hypercorn's WSGI helpers, called for an ASGI app")


def _call_soon(loop: asyncio.AbstractEventLoop, func: Any, *args: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(func(*args), loop).result()
