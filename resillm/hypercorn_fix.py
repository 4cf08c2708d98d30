"""Fixes for hypercorn (0.18 and before): free a connection as soon as its client leaves.

1. hypercorn runs each connection in a task group with an idle-timeout task. When the
   client closes its connection, the reading loop ends, but the task group still waits for
   that timer, so the socket, its tasks and some 15 KB of buffers stay until
   ``server.keep_alive_timeout`` (75 s) runs out: clients opening a connection per request
   would pile up tens of thousands of dead connections and run out of file descriptors.
   Once the reading loop is over nothing can arrive any more, so the timer is stopped then
   and the connection closes at once. In-flight requests are unaffected: they were told
   ``http.disconnect`` already, as before.
2. When the client reset the connection, closing it raises the reader's stored error from
   ``wait_closed``; that error's traceback then holds the writer, which holds the reader,
   which holds the error: a cycle that keeps the connection's memory until the garbage
   collector runs. The traceback is dropped once the connection is closed.
3. Closing waits until the client has taken what is still buffered for it; a client that
   stopped reading (cut off by ``server.send_timeout``) would hold its socket forever.
   After ``send_timeout`` of waiting the connection is aborted instead.
4. A connection's server object holds its protocol, whose ``send`` is a method of the server:
   another cycle. Once the connection is over (its task group has ended, so nothing can use
   the protocol any more) the server lets go of the protocol and the task group.

Together they make a finished connection's memory free at once, not at the collector's next
full pass (which, under load, can be many thousands of connections later).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

_PATCHED = "_resillm_frees_closed_connections"
_close_timeout: float | None = None  # the latest server.send_timeout


def release_closed_connections(close_timeout: float | None = None) -> None:
    """Patch hypercorn's TCP server once; a no-op where its internals differ.

    ``close_timeout``: the longest wait for a closing connection's client to take what is
    buffered (``None``: no limit). Guarded by ``tests/integration/test_memory_mechanisms.py``
    and ``test_stalled_readers.py``: should hypercorn change these internals, they say so."""
    global _close_timeout
    _close_timeout = close_timeout
    from hypercorn.asyncio.tcp_server import TCPServer

    read_data = getattr(TCPServer, "_read_data", None)
    close = getattr(TCPServer, "_close", None)
    if read_data is None or close is None or getattr(read_data, _PATCHED, False):
        return

    async def _read_data(self: Any) -> None:
        try:
            await read_data(self)
        finally:
            idle_task = getattr(self, "idle_task", None)
            if idle_task is not None:
                await idle_task.stop()

    async def _close(self: Any) -> None:
        try:
            # hypercorn's close takes a cancellation as "already closed" and returns.
            await asyncio.wait_for(close(self), _close_timeout)
        finally:
            writer = getattr(self, "writer", None)
            if writer is not None:
                writer.transport.abort()  # a no-op once closed; drops a stalled client
            reader = getattr(self, "reader", None)
            error = reader.exception() if reader is not None else None
            if error is not None:
                error.__traceback__ = None

    run = TCPServer.run

    def _run(self: Any) -> Any:
        # Not a coroutine wrapping hypercorn's: a frame more per connection. The connection's
        # task lets go of the protocol once it is done.
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(partial(_forget_protocol, self))
        return run(self)

    TCPServer.run = _run  # type: ignore[method-assign]
    setattr(_read_data, _PATCHED, True)
    TCPServer._read_data = _read_data  # type: ignore[method-assign]
    TCPServer._close = _close  # type: ignore[method-assign]


def _forget_protocol(server: Any, task: object) -> None:
    server.__dict__.pop("protocol", None)
    server.__dict__.pop("_task_group", None)
