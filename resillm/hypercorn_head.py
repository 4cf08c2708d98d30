"""One write for a response's head and its body under hypercorn's HTTP/1.1.

hypercorn (0.18 and before) writes a response's status line and headers to the socket when
the app sends ``http.response.start``, and its body in a second write when the app sends
``http.response.body``: two ``send`` system calls for every answer, and the client, seeing
the head arrive alone, often wakes up twice. Here the head is held back and goes out with
whatever the connection writes next (a JSON answer's whole body, a stream's first chunk, an
error's empty end) in one write. A head with nothing after it (a stream that sent
``http.response.start`` and waits for its first chunk) is not delayed by more than that: it
is written at the event loop's next turn, and before the connection closes.

Guarded by ``tests/unit/test_hypercorn_head.py`` and the integration tests over hypercorn;
where hypercorn's internals differ from what this replaces, :func:`coalesce_response_heads`
leaves them alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

_PATCHED = "_resillm_coalesces_heads"
JOIN_BELOW = 16384  # a body this long or shorter is copied behind the head; longer, not


def coalesce_response_heads() -> None:
    """Patch hypercorn's HTTP/1.1 protocol and TCP server once (both or neither)."""
    try:
        import h11
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.events import Closed, RawData, Updated
        from hypercorn.protocol.h11 import H11Protocol
    except ImportError:
        return
    send_event = getattr(H11Protocol, "_send_h11_event", None)
    protocol_send = getattr(TCPServer, "protocol_send", None)
    if send_event is None or protocol_send is None or getattr(protocol_send, _PATCHED, False):
        return
    if send_event.__code__.co_varnames[:2] != ("self", "event"):
        return

    @dataclass(frozen=True)
    class ResponseHead(RawData):
        """A response's status line and headers: the server may hold them back."""

    async def _send_h11_event(self: Any, event: Any) -> None:
        if type(event) is not h11.Response:
            await send_event(self, event)
            return
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
        else:
            await self.send(ResponseHead(data=data))

    async def _protocol_send(self: Any, event: Any) -> None:
        if type(event) is ResponseHead:
            if self._head is not None:
                _flush_head(self)
            self._head = event.data
            self.loop.call_soon(_flush_head, self)
        elif isinstance(event, RawData):  # hypercorn's own, with the held head in front
            head = self._head
            async with self.send_lock:
                try:
                    if head is None:
                        self.writer.write(event.data)
                    else:
                        self._head = None
                        data = event.data
                        if len(data) <= JOIN_BELOW:
                            self.writer.write(head + data)
                        else:
                            self.writer.writelines((head, data))
                    await self.writer.drain()
                except (ConnectionError, RuntimeError):
                    await self.protocol.handle(Closed())
        elif isinstance(event, Updated):  # as hypercorn's
            if event.idle:
                await self.idle_task.restart(self._task_group, self._idle_timeout)
            else:
                await self.idle_task.stop()
        else:
            if self._head is not None:
                _flush_head(self)  # before the connection closes
            await protocol_send(self, event)

    setattr(_protocol_send, _PATCHED, True)
    TCPServer._head = None  # type: ignore[attr-defined]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]


def _flush_head(server: Any) -> None:
    head = server._head
    if head is None:
        return  # gone out with the body already
    server._head = None
    # A write that fails here finds the connection gone; the read side sees it close.
    with contextlib.suppress(ConnectionError, RuntimeError):
        server.writer.write(head)
