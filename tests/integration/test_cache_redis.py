"""The Redis cache backend against a real ``redis-server`` the test starts on a free port."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from resillm.cache_store import KEY_PREFIX
from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, run_gateway
from tests.integration.test_cache import metric, post
from tests.redis_server import redis_server

pytestmark = pytest.mark.anyio
BODY: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
TIMEOUT = "250ms"


def redis_cached(upstream: MockUpstream, url: str, **cache: Any) -> dict[str, Any]:
    config = openai_compatible(upstream)
    config["cache"] = {
        "enabled": True,
        "backend": "redis",
        "redis_url": url,
        "redis_timeout": TIMEOUT,
        "ttl": "10m",
        **cache,
    }
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """Accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_two_gateways_share_answers_through_redis(upstream: MockUpstream) -> None:
    async with redis_server() as redis:
        config = redis_cached(upstream, redis.url)
        async with run_gateway(config) as one, run_gateway(config) as two:
            async with aiohttp.ClientSession() as session:
                _, first, body_one = await post(session, one.url, BODY)
                _, second, body_two = await post(session, two.url, BODY)
                _, streamed, events = await post(session, two.url, {**BODY, "stream": True})
        client = Redis.from_url(redis.url)
        try:
            keys = await client.keys(KEY_PREFIX + "*")
            ttl_ms = await client.pttl(keys[0])
        finally:
            await client.aclose()
    assert (first["x-resillm-cache"], second["x-resillm-cache"]) == ("miss", "hit")
    assert streamed["x-resillm-cache"] == "hit" and events.endswith(b"data: [DONE]\n\n")
    assert upstream.stats.requests == 1
    text = [json.loads(b)["choices"][0]["message"]["content"] for b in (body_one, body_two)]
    assert text[0] == text[1] and text[0]
    assert len(keys) == 1 and 590_000 < ttl_ms <= 600_000


async def assert_answered_quickly(url: str, session: aiohttp.ClientSession) -> None:
    for stream in (False, True, False):
        started = time.monotonic()
        status, headers, _ = await post(session, url, {**BODY, "stream": stream})
        assert status == 200 and headers["x-resillm-cache"] == "miss"
        # A lookup and a store, each bounded by redis_timeout (0.25 s), and usually less:
        # after one failure Redis is skipped for a second.
        assert time.monotonic() - started < 1.0


async def test_nothing_listening_on_the_redis_port_only_costs_the_cache(
    upstream: MockUpstream,
) -> None:
    config = redis_cached(upstream, f"redis://127.0.0.1:{free_port()}/0")
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        await assert_answered_quickly(gw.url, session)
        assert await metric(gw.url, "error") == 3
    assert upstream.stats.requests == 3


async def test_a_redis_that_never_answers_is_given_up_after_the_timeout(
    upstream: MockUpstream,
) -> None:
    async with silent_server() as url, run_gateway(redis_cached(upstream, url)) as gw:
        async with aiohttp.ClientSession() as session:
            await assert_answered_quickly(gw.url, session)


async def test_redis_stopped_mid_test_leaves_requests_answered(upstream: MockUpstream) -> None:
    async with redis_server() as redis:
        async with run_gateway(redis_cached(upstream, redis.url)) as gw:
            async with aiohttp.ClientSession() as session:
                await post(session, gw.url, BODY)
                _, headers, _ = await post(session, gw.url, BODY)
                assert headers["x-resillm-cache"] == "hit"
                await redis.kill()
                await assert_answered_quickly(gw.url, session)
                assert await metric(gw.url, "error") >= 1
    assert upstream.stats.requests == 4
