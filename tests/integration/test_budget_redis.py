"""The Redis budget store against a real ``redis-server`` the test starts on a free port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import run_gateway
from tests.integration.test_budget import COST, ESTIMATE, budget_config, budget_of, post
from tests.redis_server import redis_server

pytestmark = pytest.mark.anyio


def redis_config(tmp_path: Path, url: str, **budget: Any) -> dict[str, Any]:
    return budget_config(
        tmp_path, mock={"latency": "100ms"}, store="redis", redis_url=url, **budget
    )


@asynccontextmanager
async def gateway_process(config: dict[str, Any], path: Path) -> AsyncIterator[str]:
    """``resillm serve`` in its own process; yields its URL."""
    path.write_text(json.dumps(config))  # JSON is YAML
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "resillm.cli", "serve", "-c", str(path), "--port", "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            line = (await process.stderr.readline()).decode()
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            assert match, f"no address in {line!r}"
            url = f"http://127.0.0.1:{match.group(1)}"
            drain = asyncio.create_task(process.stderr.read())  # never let the pipe fill
            async with aiohttp.ClientSession() as session:
                while True:
                    try:
                        async with session.get(url + "/health") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        await drain


async def test_two_gateway_processes_share_one_limit(tmp_path: Path) -> None:
    limit = 0.05
    async with redis_server() as redis:
        config = redis_config(tmp_path, redis.url, hourly_limit=limit)
        async with (
            run_gateway(config) as here,
            gateway_process(config, tmp_path / "resillm.yaml") as there,
            aiohttp.ClientSession() as session,
        ):
            statuses = await asyncio.gather(
                *(post(session, url) for _ in range(25) for url in (here.url, there))
            )
            status_here, status_there = await budget_of(here.url), await budget_of(there)
    ok = statuses.count(200)
    assert statuses.count(429) == 50 - ok
    assert status_here == status_there  # one set of windows
    spent = status_here["current_hour"]["spent"]
    assert spent == pytest.approx(ok * COST)
    assert spent <= limit + ESTIMATE
    assert ok == 5


async def test_spend_outlives_the_gateway_in_redis(tmp_path: Path) -> None:
    async with redis_server() as redis:
        config = redis_config(tmp_path, redis.url, hourly_limit=0.03)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            assert [await post(session, gw.url) for _ in range(2)] == [200, 200]
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            assert (await budget_of(gw.url))["current_hour"]["spent"] == 0.02
            assert [await post(session, gw.url) for _ in range(2)] == [200, 429]


@pytest.mark.parametrize(("policy", "expected"), [("closed", 503), ("open", 200)])
async def test_redis_killed_mid_test_follows_the_policy_without_hanging(
    tmp_path: Path, policy: str, expected: int
) -> None:
    async with redis_server() as redis:
        config = redis_config(
            tmp_path, redis.url, hourly_limit=1.0, redis_failure=policy, redis_timeout="300ms"
        )
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            assert await post(session, gw.url) == 200
            await redis.kill()
            started = time.monotonic()
            statuses = [await post(session, gw.url) for _ in range(3)]
            elapsed = time.monotonic() - started
            async with session.post(
                gw.url + "/v1/chat/completions", json={"model": "chat", "messages": []}
            ) as response:
                assert response.status == 400  # bad requests are still told so
            async with session.get(gw.url + "/v1/budget") as response:
                budget_status = response.status
            async with session.post(
                gw.url + "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
            ) as response:
                body = await response.json()
            async with session.get(gw.url + "/metrics") as response:
                metrics = await response.text()
    assert statuses == [expected] * 3
    assert elapsed < 3.0  # three requests, each bounded by the store's timeout
    assert budget_status == 503
    if policy == "closed":
        assert body["error"]["type"] == "budget_unavailable"
    else:
        assert body["choices"]
    assert re.search(
        rf'resillm_budget_store_errors_total\{{[^}}]*operation="reserve"[^}}]*policy="{policy}"',
        metrics,
    ) or re.search(
        rf'resillm_budget_store_errors_total\{{[^}}]*policy="{policy}"[^}}]*operation="reserve"',
        metrics,
    )
