"""Slow and abusive clients on the real server: a client trickling its headers byte by byte
is disconnected after ``server.keep_alive_timeout`` while others are served; oversized
headers are refused (``server.max_header_bytes``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from resillm.app import create_app
from resillm.config_loader import config_from_dict
from resillm.server import hypercorn_config
from tests.conftest import serve_asgi

pytestmark = pytest.mark.anyio
CONFIG: dict[str, Any] = {
    "providers": {"m": {"type": "mock"}},
    "models": {"x": {"targets": [{"provider": "m", "model": "m"}]}},
    "server": {"keep_alive_timeout": "1s", "max_header_bytes": 4096},
    "logging": {"level": "error"},
}
REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"


def test_the_server_section_reaches_hypercorn() -> None:
    config = config_from_dict({**CONFIG, "server": {**CONFIG["server"], "read_timeout": "30s"}})
    hyper = hypercorn_config(config, ["127.0.0.1:0"])
    assert hyper.keep_alive_timeout == 1.0
    assert hyper.h11_max_incomplete_size == 4096
    assert hyper.read_timeout == 30.0
    assert hypercorn_config(config_from_dict(CONFIG), []).read_timeout is None  # default: off


async def slowloris(host: str, port: int) -> tuple[float, bool]:
    """Send the request a byte every 100ms: (seconds until the server hung up, completed)."""
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    try:
        for byte in REQUEST:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
        data = await asyncio.wait_for(reader.read(), 5)
        return time.monotonic() - started, b"200" in data
    except (ConnectionError, OSError):
        return time.monotonic() - started, False
    finally:
        writer.close()


async def test_a_slowloris_client_is_cut_off_while_others_are_served() -> None:
    app = create_app(CONFIG)
    async with serve_asgi(app, CONFIG) as url, aiohttp.ClientSession() as session:
        host, port = url.removeprefix("http://").split(":")
        slow = [asyncio.create_task(slowloris(host, int(port))) for _ in range(5)]
        served = 0
        for _ in range(20):
            async with session.get(url + "/health") as response:
                assert response.status == 200
                served += 1
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*slow)
    assert served == 20
    for elapsed, completed in results:
        assert not completed
        assert elapsed < 5.0  # 1s of keep_alive_timeout; the whole request would take 24s


async def test_oversized_headers_are_refused() -> None:
    app = create_app(CONFIG)
    async with serve_asgi(app, CONFIG) as url, aiohttp.ClientSession() as session:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        # h11 bounds what it buffers of an unfinished head: sent in parts, as a slow client does.
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"\r\n\r\n")
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            data = b""
        writer.close()
        assert not data.startswith(b"HTTP/1.1 200")
        async with session.get(url + "/health") as response:
            assert response.status == 200
