"""The gateway under either server it ships with, on an ephemeral loopback port, plus a raw
HTTP/1.1 client for the tests that must misbehave below what an HTTP library allows."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from resillm.asgi import ASGIApp
from resillm.config_loader import config_from_dict
from resillm.server import LISTEN_BACKLOG, uvicorn_options
from tests.conftest import serve_asgi

SERVERS = ("hypercorn", "uvicorn")


@asynccontextmanager
async def serve_uvicorn(app: ASGIApp, config: dict[str, Any]) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn, set up from the config's ``server`` section as
    ``resillm serve --server uvicorn`` does; yield its URL."""
    uvicorn = pytest.importorskip("uvicorn")
    options = uvicorn_options(config_from_dict(config))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(LISTEN_BACKLOG)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", **options))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@asynccontextmanager
async def serve_with(kind: str, app: ASGIApp, config: dict[str, Any]) -> AsyncIterator[str]:
    if kind == "uvicorn":
        async with serve_uvicorn(app, config) as url:
            yield url
    else:
        async with serve_asgi(app, config) as url:
            yield url


@asynccontextmanager
async def serve_web(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app (a fake upstream, a webhook) on an ephemeral loopback port;
    yield its base URL."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def hypercorn_connections() -> int:
    """Connections the in-process hypercorn is serving (one task each)."""
    return sum(1 for t in asyncio.all_tasks() if "_server_callback" in t.get_coro().__qualname__)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (or ``timeout``); b"" when it reset instead."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        return b""


def chat_request(
    body: bytes, *, chunked: bool = False, length: int | None = None, close: bool = False
) -> bytes:
    """A raw request head for ``body`` (its Content-Length ``length`` when given);
    ``close`` asks the server to close the connection after its answer."""
    framing = (
        b"Transfer-Encoding: chunked"
        if chunked
        else b"Content-Length: %d" % (len(body) if length is None else length)
    )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"Content-Type: application/json\r\n"
        + framing
        + b"\r\n\r\n"
    )


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked request body (b"" gives the last one)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
