"""Redis down, for what test_budget_redis and test_cache_redis leave out: the budget store's
Redis down at start, silent, and killed then back on the same port; the cache's Redis
back after an outage. Whatever Redis does, no request waits longer than the store's
timeout, and everything works again, by itself, once Redis answers.

(A Redis that restarts without persistence comes back empty: the spend it held is gone,
which is Redis's durability setting, not the gateway's.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from resillm.mock_upstream import MockUpstream
from tests.conftest import run_gateway
from tests.integration.down_servers import closed_port, hanging_server
from tests.integration.test_budget import budget_config
from tests.integration.test_cache import metric
from tests.integration.test_cache_redis import BODY, redis_cached
from tests.integration.test_cache_redis import post as cache_post
from tests.redis_server import redis_server

pytestmark = pytest.mark.anyio
TIMEOUT = "300ms"
BOUND_S = 1.5  # two Redis calls at most a request, each bounded by 2 x 300 ms


def redis_budget(tmp_path: Path, url: str, policy: str = "closed") -> dict[str, Any]:
    return budget_config(
        tmp_path, store="redis", redis_url=url, hourly_limit=1.0,
        redis_timeout=TIMEOUT, redis_failure=policy,
    )  # fmt: skip


async def chat(session: aiohttp.ClientSession, url: str) -> tuple[int, float, dict[str, Any]]:
    started = time.monotonic()
    async with session.post(
        url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hello there"}]},
    ) as response:
        body: dict[str, Any] = await response.json()
        return response.status, time.monotonic() - started, body


async def until_answered(session: aiohttp.ClientSession, url: str) -> float:
    """Send requests until one is admitted again; how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(15):
        while (await chat(session, url))[0] != 200:  # noqa: ASYNC110 - the gateway, polled
            await asyncio.sleep(0.1)
    return time.monotonic() - started


async def spent(session: aiohttp.ClientSession, url: str) -> float | None:
    async with session.get(url + "/v1/budget") as response:
        if response.status != 200:
            return None
        body = await response.json()
        return float(body["current_hour"]["spent"])


async def test_budget_redis_down_at_start_answers_503_until_it_comes_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resillm.budget")
    port = closed_port()
    config = redis_budget(tmp_path, f"redis://127.0.0.1:{port}/0")
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        results = [await chat(session, gw.url) for _ in range(3)]
        assert await spent(session, gw.url) is None  # /v1/budget: 503 too
        async with session.get(gw.url + "/health") as response:
            assert response.status == 200
        async with redis_server(port):
            recovered_in = await until_answered(session, gw.url)
            assert await spent(session, gw.url) == 0.01
    assert [status for status, _, _ in results] == [503] * 3
    assert {body["error"]["type"] for _, _, body in results} == {"budget_unavailable"}
    assert max(elapsed for _, elapsed, _ in results) < BOUND_S
    assert recovered_in < 5.0  # Redis is tried again a second after a failure
    messages = [r.getMessage() for r in caplog.records]
    assert sum("budget store failed" in m for m in messages) == 1  # one line for the outage
    assert sum("reachable again" in m for m in messages) == 1


async def test_budget_redis_killed_and_restarted_is_used_again(tmp_path: Path) -> None:
    port = closed_port()
    async with redis_server(port) as redis:
        config = redis_budget(tmp_path, redis.url)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            assert (await chat(session, gw.url))[0] == 200
            await redis.kill()
            down = [await chat(session, gw.url) for _ in range(3)]
            async with redis_server(port):
                await until_answered(session, gw.url)
                after = await spent(session, gw.url)
    assert [status for status, _, _ in down] == [503] * 3
    assert max(elapsed for _, elapsed, _ in down) < BOUND_S
    assert after == 0.01  # the new, empty Redis holds the request after its return


async def test_budget_redis_that_never_answers_is_bounded_by_its_timeout(tmp_path: Path) -> None:
    async with hanging_server() as silent:
        config = redis_budget(tmp_path, f"redis://127.0.0.1:{silent.port}/0", policy="open")
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            results = [await chat(session, gw.url) for _ in range(4)]
    assert [status for status, _, _ in results] == [200] * 4  # open: let through, unmetered
    assert max(elapsed for _, elapsed, _ in results) < BOUND_S
    assert silent.connections >= 1


async def test_cache_redis_back_after_an_outage_serves_hits_again(upstream: MockUpstream) -> None:
    port = closed_port()
    async with redis_server(port) as redis:
        async with run_gateway(redis_cached(upstream, redis.url)) as gw:
            async with aiohttp.ClientSession() as session:
                await cache_post(session, gw.url, BODY)
                await redis.kill()
                _, during, _ = await cache_post(session, gw.url, BODY)
                async with redis_server(port):
                    await asyncio.sleep(1.1)  # past the second Redis is left alone
                    _, refilled, _ = await cache_post(session, gw.url, BODY)
                    _, again, _ = await cache_post(session, gw.url, BODY)
                errors = await metric(gw.url, "error")
    assert during["x-resillm-cache"] == "miss"
    assert (refilled["x-resillm-cache"], again["x-resillm-cache"]) == ("miss", "hit")
    assert errors >= 1
    assert upstream.stats.requests == 3
