"""What keeps the gateway's memory flat, guarded as mechanisms rather than by measuring it.

- A finished request leaves no reference cycle behind, on any path (success, fallback,
  every target failing, a stream recovered mid-way, a timeout, bad input, a client leaving):
  its memory is freed when it ends, not when the garbage collector next runs, which under
  load holds the garbage of thousands of requests and raises the peak RSS.
- A connection its client closed is released at once, not after ``keep_alive_timeout``
  (hypercorn holds it until then; see ``resillm.hypercorn_fix``).
"""

from __future__ import annotations

import asyncio
import gc
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from resillm.mock_upstream import MockUpstream, MockUpstreamOptions, start_mock_upstream
from tests.conftest import run_gateway
from tests.integration.servers import hypercorn_connections

pytestmark = pytest.mark.anyio


def config(upstream: MockUpstream) -> dict[str, Any]:
    base = upstream.url + "/v1"

    def provider(**headers: str) -> dict[str, Any]:
        return {"type": "openai_compatible", "base_url": base, "headers": headers}

    return {
        "providers": {
            "up": provider(),
            "down": provider(**{"x-mock-fail-status": "503"}),
            "cut": provider(**{"x-mock-cut-after": "2"}),
            "hang": {**provider(**{"x-mock-hang": "1"}), "timeout": "200ms"},
        },
        "models": {
            "ok": {"targets": [{"provider": "up", "model": "m"}], "pricing": PRICE},
            "fallback": {
                "targets": [{"provider": "down", "model": "m"}, {"provider": "up", "model": "m"}]
            },
            "failing": {"targets": [{"provider": "down", "model": "m"}]},
            "cut": {"targets": [{"provider": "cut", "model": "m"}], "pricing": PRICE},
            "hang": {"targets": [{"provider": "hang", "model": "m"}]},
        },
        "resilience": {
            "retry": {"max_attempts": 2, "initial_backoff": "1ms"},
            "circuit_breaker": {"failure_threshold": 100_000},
        },
        # Every layer on: the access log, a budget that prices requests, the cache.
        "logging": {"level": "error", "log_requests": True},
        "budget": {"daily_limit": 1000, "store": "memory"},
        "cache": {"enabled": True},
    }


PRICE = {"input_per_mtok": 1, "output_per_mtok": 2}


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    # The event loop `resillm serve` runs on: the standard loop's own transports make cycles
    # when a connection is aborted, which would hide the gateway's.
    return "asyncio", {"use_uvloop": True}


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    upstream = await start_mock_upstream(MockUpstreamOptions())
    try:
        async with run_gateway(config(upstream)) as server, aiohttp.ClientSession() as session:
            yield server.url, session
    finally:
        await upstream.close()


Request = Callable[[str, aiohttp.ClientSession, int], Awaitable[None]]


def chat(
    model: str,
    *,
    stream: bool = False,
    leave_after_first_line: bool = False,
    connection_closes: bool = False,
) -> Request:
    async def request(url: str, session: aiohttp.ClientSession, serial: int) -> None:
        body = {
            "model": model,
            "stream": stream,
            # Distinct prompts: the cache must not answer instead of the path under test.
            "messages": [{"role": "user", "content": f"tell me something {serial}"}],
        }
        # `Connection: close`: the server ends the connection after the answer.
        headers = {"connection": "close"} if connection_closes else {}
        async with session.post(
            url + "/v1/chat/completions", json=body, headers=headers
        ) as response:
            if leave_after_first_line:
                await response.content.readline()
                response.close()
                return
            await response.read()

    return request


def raw_body(body: bytes) -> Request:
    async def request(url: str, session: aiohttp.ClientSession, serial: int) -> None:
        headers = {"content-type": "application/json"}
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
            assert r.status == 400
            await r.read()

    return request


PATHS: dict[str, Request] = {
    "success": chat("ok"),
    "success, streamed": chat("ok", stream=True),
    "fallback": chat("fallback"),
    "fallback, streamed": chat("fallback", stream=True),
    "every target failing": chat("failing"),
    "every target failing, streamed": chat("failing", stream=True),
    "stream cut and recovered": chat("cut", stream=True),
    "upstream timeout": chat("hang"),
    "unknown model": chat("no-such-model"),
    "malformed JSON": raw_body(b"{nope"),
    "invalid request": raw_body(b'{"model": "ok", "messages": 3}'),
    "client leaving mid-stream": chat("ok", stream=True, leave_after_first_line=True),
    "a connection per request": chat("ok", connection_closes=True),
}


@pytest.mark.parametrize("path", PATHS)
async def test_a_finished_request_leaves_no_garbage_cycle(
    gateway: tuple[str, aiohttp.ClientSession], path: str
) -> None:
    url, session = gateway
    request = PATHS[path]
    for serial in range(3):  # warm up: first-use caches, pooled connections, lazy imports
        await request(url, session, serial)
    await asyncio.sleep(0.2)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to say what it was
    try:
        for serial in range(3, 13):
            await request(url, session, serial)
        await asyncio.sleep(0.3)  # the requests' tasks and closed connections wind down
        found = gc.collect()
        kinds = Counter(type(o).__name__ for o in gc.garbage).most_common(8)
        cycle = one_cycle(gc.garbage) if found else []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert found == 0, f"10 requests left {found} objects in cycles: {kinds}; one: {cycle}"


def one_cycle(garbage: list[Any]) -> list[str]:
    """One cycle through a frame, described frame by frame: where to look."""
    among = {id(o) for o in garbage}
    for start in garbage:
        if not isinstance(start, types.FrameType):
            continue
        came_from: dict[int, Any] = {id(start): None}
        layer = [start]
        while layer:
            following = []
            for obj in layer:
                for ref in gc.get_referents(obj):
                    if ref is start:
                        path = [obj]
                        while came_from[id(path[-1])] is not None:
                            path.append(came_from[id(path[-1])])
                        return [_describe(o) for o in reversed(path)]
                    if id(ref) in among and id(ref) not in came_from:
                        came_from[id(ref)] = obj
                        following.append(ref)
            layer = following
    return []


def _describe(obj: Any) -> str:
    if isinstance(obj, types.FrameType):
        return f"{obj.f_code.co_qualname} ({obj.f_code.co_filename.rsplit('/', 1)[-1]})"
    return type(obj).__name__


async def test_a_connection_the_client_closed_is_released_at_once(
    gateway: tuple[str, aiohttp.ClientSession],
) -> None:
    url, _ = gateway  # keep_alive_timeout is the default, 75 s
    host, port = url.removeprefix("http://").split(":")
    before = hypercorn_connections()
    for _ in range(20):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await writer.drain()
        assert b" 200 " in await reader.readuntil(b"\r\n")
        writer.close()  # keep-alive: the server would hold it, idle, for 75 s
        await writer.wait_closed()
    for _ in range(100):
        if hypercorn_connections() <= before:
            break
        await asyncio.sleep(0.05)
    assert hypercorn_connections() <= before, "closed connections are still being held"
