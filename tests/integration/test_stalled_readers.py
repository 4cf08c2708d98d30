"""Clients that start a stream and stop reading it (issue #15).

Backpressure: the server's send waits while the client's buffers are full, so the relay
stops reading the upstream and the upstream's own writes block. A fast upstream with a
very large answer therefore cannot finish, and the gateway's memory stays flat, however
long the client sleeps; when the client closes, the upstream connection is closed too.
``server.send_timeout`` bounds the time: a client that takes nothing for that long is cut
off and the upstream call closed, while a reader that only pauses is left alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from resillm.app import create_app
from resillm.log import ACCESS_LOGGER
from tests.integration.servers import (
    SERVERS,
    address,
    chat_request,
    hypercorn_connections,
    serve_web,
    serve_with,
)

pytestmark = pytest.mark.anyio
CONTENT = "x" * 1000
CHUNKS = 64_000  # 64 MB of SSE: more than every buffer between upstream and client
BODY = b'{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
MB = 1024 * 1024


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return f"data: {json.dumps({**body, 'choices': [choice]})}\n\n".encode()


@dataclass
class Flood:
    """An OpenAI-compatible upstream answering every stream with ``chunks`` 1 KB chunks as
    fast as its socket takes them."""

    chunks: int = CHUNKS
    written: int = 0
    finished: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        piece = _event({"content": CONTENT})
        try:
            await response.write(_event({"role": "assistant", "content": ""}))
            for _ in range(self.chunks):
                await response.write(piece)
                self.written += len(piece)
            await response.write(_event({}, "stop") + b"data: [DONE]\n\n")
            self.finished = True
        except ConnectionError:
            self.gone.set()  # the gateway closed its upstream connection
        return response


@pytest.fixture
async def flood() -> AsyncIterator[Flood]:
    upstream = Flood()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    async with serve_web(app) as url:
        upstream.url = url + "/v1"
        yield upstream


def gateway_config(upstream: Flood, send_timeout: str | None) -> dict[str, Any]:
    return {
        "providers": {"up": {"type": "openai_compatible", "base_url": upstream.url}},
        "models": {"chat": {"targets": [{"provider": "up", "model": "m"}]}},
        "server": {"send_timeout": send_timeout},
        "logging": {"level": "warning"},
    }


async def start_and_stop_reading(url: str) -> tuple[socket.socket, bytes]:
    """Start a stream on a socket with a small receive buffer, read its head, stop: the
    socket and what was read (the head, maybe the first chunks)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.setblocking(False)
    await loop.sock_connect(sock, address(url))
    await loop.sock_sendall(sock, chat_request(BODY) + BODY)
    head = b""
    while b"\r\n\r\n" not in head:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
        assert data, "the gateway closed before answering"
        head += data
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock, head


@contextmanager
def collected(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of one logger, collected straight from it (caplog listens on the root,
    which resillm's logger no longer propagates to once logging was configured)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def until_blocked(upstream: Flood, quiet_s: float = 1.0, within_s: float = 30.0) -> None:
    """Wait until the upstream has written nothing for ``quiet_s``."""
    deadline = time.monotonic() + within_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline and not upstream.finished:
        if upstream.written != last:
            last, since = upstream.written, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the upstream kept writing: {upstream.written} bytes")


def traced_mb() -> float:
    return tracemalloc.get_traced_memory()[0] / MB


@pytest.mark.parametrize("server", SERVERS)
async def test_a_client_that_never_reads_blocks_the_upstream_not_memory(
    flood: Flood, server: str
) -> None:
    config = gateway_config(flood, send_timeout=None)  # backpressure alone
    tracemalloc.start()
    try:
        with collected("asyncio") as loop_log:
            async with serve_with(server, create_app(config), config) as url:
                client, _ = await start_and_stop_reading(url)
                before = traced_mb()
                await until_blocked(flood)
                blocked_at, grown = flood.written, traced_mb() - before
                await asyncio.sleep(1.0)  # the client still sleeps: nothing moves
                assert flood.written == blocked_at
                still = traced_mb() - before
                client.close()
                await asyncio.wait_for(flood.gone.wait(), 10)  # the upstream connection closed
    finally:
        tracemalloc.stop()
    assert not flood.finished
    assert blocked_at < CHUNKS * len(CONTENT) // 2  # only socket buffers' worth got out
    # What the gateway holds is its buffers, not the answer: far under the 64 MB sent at it.
    assert grown < 16, f"memory grew by {grown:.1f} MB"
    assert still < grown + 2
    # The relay stopped soon after the client left: no chunk after chunk written to (and
    # logged by) the dead socket while buffered upstream bytes lasted.
    assert not [r for r in loop_log if "socket.send() raised" in r.getMessage()]


@pytest.mark.parametrize("server", SERVERS)
async def test_a_stalled_client_is_cut_off_after_send_timeout(flood: Flood, server: str) -> None:
    config = gateway_config(flood, send_timeout="1s")
    with collected(ACCESS_LOGGER) as records:
        async with serve_with(server, create_app(config), config) as url:
            client, _ = await start_and_stop_reading(url)
            started = time.monotonic()
            try:
                await asyncio.wait_for(flood.gone.wait(), 15)  # the client never closed
                elapsed = time.monotonic() - started
            finally:
                client.close()
    assert not flood.finished
    # Buffers fill first, then 1s of send_timeout (+1/4 of it at most); generous for load.
    assert 1.0 <= elapsed < 10.0
    logged = [record.fields for record in records]  # type: ignore[attr-defined]
    assert [(f["status"], f["stream"]) for f in logged] == [(408, True)]
    assert "took no response bytes" in logged[0]["error"]


async def test_the_connection_of_a_client_cut_off_is_dropped_too(flood: Flood) -> None:
    """hypercorn's close would wait for the stalled client to take its buffered bytes,
    forever; after send_timeout of that, the connection is aborted (resillm.hypercorn_fix)."""
    config = gateway_config(flood, send_timeout="1s")
    async with serve_with("hypercorn", create_app(config), config) as url:
        client, _ = await start_and_stop_reading(url)
        try:
            await asyncio.wait_for(flood.gone.wait(), 15)
            # The cut, then 1 s of waiting for the client to take the rest; it never reads.
            for _ in range(100):
                if not hypercorn_connections():
                    break
                await asyncio.sleep(0.1)
            assert not hypercorn_connections(), "the server still holds the stalled connection"
        finally:
            client.close()


@pytest.mark.parametrize("server", SERVERS)
async def test_a_reader_pausing_less_than_send_timeout_is_not_cut(
    flood: Flood, server: str
) -> None:
    config = gateway_config(flood, send_timeout="2s")
    loop = asyncio.get_running_loop()
    async with serve_with(server, create_app(config), config) as url:
        client, _ = await start_and_stop_reading(url)
        try:
            await until_blocked(flood)  # every buffer is full: the gateway's send waits
            for _ in range(4):  # 2s of pauses in all, none as long as send_timeout
                await asyncio.sleep(0.5)
                # Read for a while: enough for the kernel to let the gateway write again
                # (it waits for half of a send buffer of megabytes to be free).
                reading_until = time.monotonic() + 0.3
                while time.monotonic() < reading_until:
                    data = await asyncio.wait_for(loop.sock_recv(client, 65536), 10)
                    assert data, "the gateway closed the stream"
            assert not flood.gone.is_set()
        finally:
            client.close()
        await asyncio.wait_for(flood.gone.wait(), 10)
    assert not flood.finished
