"""Budgets through the real gateway under hypercorn, the in-process mock provider priced exactly.

"hello there" is 11 characters: the mock reports 2 prompt tokens and (by default) 8
completion tokens, so at $1000 per million tokens each answer costs exactly $0.01. The
reservation with ``max_tokens: 8`` is 3 estimated prompt tokens + 8 = $0.011.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from resillm.app import create_app
from resillm.mock_upstream import MockUpstream
from resillm.pricing import Price, cost_nano_usd, to_usd
from tests.conftest import run_gateway, serve_asgi

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hello there"}]
PRICING = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
COST = 0.01
ESTIMATE = 0.011


def budget_config(
    tmp_path: Path, *, mock: dict[str, Any] | None = None, **budget: Any
) -> dict[str, Any]:
    return {
        "providers": {"m": {"type": "mock", **(mock or {})}},
        "models": {"chat": {"targets": [{"provider": "m", "model": "m"}], "pricing": PRICING}},
        "budget": {"snapshot_path": str(tmp_path / "budget.json"), **budget},
        "logging": {"level": "warning"},
    }


def sdk(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def budget_of(url: str, key: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/budget", headers=headers) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body


async def post(session: aiohttp.ClientSession, url: str, **body: Any) -> int:
    async with session.post(
        url + "/v1/chat/completions",
        json={"model": "chat", "messages": HELLO, "max_tokens": 8, **body},
    ) as response:
        await response.read()
        return response.status


async def test_the_sdk_sees_a_rate_limit_error_of_type_budget_exceeded(tmp_path: Path) -> None:
    async with run_gateway(budget_config(tmp_path, hourly_limit=0.03)) as gw, sdk(gw.url) as client:
        for _ in range(3):
            await client.chat.completions.create(model="chat", messages=HELLO)
        started = time.time()
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="chat", messages=HELLO)
        status = await budget_of(gw.url)
    error = caught.value
    assert error.status_code == 429
    assert error.type == "budget_exceeded" and error.code == "budget_exceeded"
    retry_after = int(error.response.headers["retry-after"])
    next_hour = (int(started) // 3600 + 1) * 3600
    assert abs(retry_after - (next_hour - started)) <= 2
    assert status["current_hour"]["spent"] == 0.03
    assert status["current_hour"]["remaining"] == 0.0


async def test_warn_mode_lets_requests_through_with_a_header(tmp_path: Path) -> None:
    config = budget_config(tmp_path, hourly_limit=0.01, action="warn")
    async with run_gateway(config) as gw, sdk(gw.url) as client:
        first = await client.chat.completions.with_raw_response.create(
            model="chat",
            messages=HELLO,
        )
        second = await client.chat.completions.with_raw_response.create(
            model="chat",
            messages=HELLO,
        )
        stream = await client.chat.completions.with_raw_response.create(
            model="chat",
            messages=HELLO,
            stream=True,
        )
        text = "".join(
            [c.choices[0].delta.content or "" async for c in stream.parse() if c.choices]
        )
        status = await budget_of(gw.url)
    assert "x-resillm-budget-warning" not in first.headers
    assert second.headers["x-resillm-budget-warning"].startswith("over budget: global hourly")
    assert second.parse().choices[0].message.content
    assert stream.headers["x-resillm-budget-warning"]
    assert text
    assert status["current_hour"]["spent"] == 0.03


async def test_fifty_parallel_requests_stay_within_one_estimate_of_the_limit(
    tmp_path: Path,
) -> None:
    limit = 0.05  # about five requests
    config = budget_config(tmp_path, mock={"latency": "100ms"}, hourly_limit=limit)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(post(session, gw.url) for _ in range(50)))
        status = await budget_of(gw.url)
    ok = statuses.count(200)
    assert statuses.count(429) == 50 - ok
    spent = status["current_hour"]["spent"]
    assert spent == pytest.approx(ok * COST)
    assert spent <= limit + ESTIMATE
    # Five reservations of $0.011 fit under $0.05, the sixth does not: without them all
    # fifty would have passed the check at once.
    assert ok == 5


async def test_streams_are_billed_at_their_end(tmp_path: Path) -> None:
    async with run_gateway(budget_config(tmp_path, hourly_limit=1.0)) as gw, sdk(gw.url) as client:
        stream = await client.chat.completions.create(
            model="chat",
            messages=HELLO,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        status = await budget_of(gw.url)
    assert all(chunk.usage is None for chunk in chunks)  # usage counted, not shown
    assert status["current_hour"]["spent"] == COST


async def test_a_client_that_leaves_mid_stream_pays_for_what_it_received(tmp_path: Path) -> None:
    config = budget_config(tmp_path, mock={"chunks": 50, "chunk_delay": "100ms"}, hourly_limit=1.0)
    full_cost = cost_nano_usd(Price(1000.0, 1000.0), 2, 50)
    async with run_gateway(config) as gw:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                gw.url + "/v1/chat/completions",
                json={"model": "chat", "messages": HELLO, "stream": True},
            )
            assert response.status == 200
            for _ in range(4):  # the role chunk and three words
                await response.content.readline()
                await response.content.readline()
            response.close()
        spent = 0.0
        for _ in range(200):
            spent = (await budget_of(gw.url))["current_hour"]["spent"]
            if spent:
                break
            await asyncio.sleep(0.02)
    # Estimated at four characters a token: 3 for the prompt, at least one for the words.
    assert spent >= 0.004
    assert spent < to_usd(full_cost) / 2


async def test_a_recovered_stream_pays_for_every_upstream_call(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    base = {"type": "openai_compatible", "base_url": upstream.url + "/v1", "prefill": True}
    config = {
        "providers": {"bad": {**base, "headers": {"x-mock-cut-after": "3"}}, "good": base},
        "models": {
            "chat": {
                "targets": [{"provider": "bad", "model": "m"}, {"provider": "good", "model": "m"}],
                "pricing": PRICING,
            }
        },
        "resilience": {"circuit_breaker": {"failure_threshold": 1}},
        "budget": {"hourly_limit": 1.0, "snapshot_path": str(tmp_path / "budget.json")},
        "logging": {"level": "warning"},
    }
    async with run_gateway(config) as gw, sdk(gw.url) as client:
        stream = await client.chat.completions.create(
            model="chat",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        usages = [c.usage async for c in stream if c.usage is not None]
        status = await budget_of(gw.url)
    # The cut call (estimated) and the continuation (reported): both are in the usage.
    (usage,) = usages
    assert usage.completion_tokens > 3
    expected = cost_nano_usd(Price(1000.0, 1000.0), usage.prompt_tokens, usage.completion_tokens)
    assert status["current_hour"]["spent"] == to_usd(expected)


async def test_spend_survives_a_restart_with_the_same_snapshot(tmp_path: Path) -> None:
    config = budget_config(tmp_path, hourly_limit=0.03)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        assert [await post(session, gw.url) for _ in range(2)] == [200, 200]
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["windows"]
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        assert (await budget_of(gw.url))["current_hour"]["spent"] == 0.02
        assert [await post(session, gw.url) for _ in range(2)] == [200, 429]


async def test_budget_status_has_the_spec_shape(tmp_path: Path) -> None:
    config = budget_config(tmp_path, hourly_limit=1.0, daily_limit=10.0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        empty = await budget_of(gw.url)
        for _ in range(2):
            assert await post(session, gw.url) == 200
        status = await budget_of(gw.url)
        async with session.post(gw.url + "/v1/budget") as response:
            assert response.status == 405
    assert empty["requests_left_estimate"] is None
    assert set(status) == {"current_hour", "current_day", "requests_left_estimate", "key"}
    hour, day = status["current_hour"], status["current_day"]
    assert hour.keys() == day.keys() == {"spent", "limit", "remaining", "resets_at"}
    assert (hour["spent"], hour["limit"], hour["remaining"]) == (0.02, 1.0, 0.98)
    assert (day["spent"], day["limit"], day["remaining"]) == (0.02, 10.0, 9.98)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00Z", hour["resets_at"])
    assert day["resets_at"].endswith("T00:00:00Z")
    assert status["requests_left_estimate"] == 98  # $0.98 left in the tighter window
    assert status["key"] is None


async def test_key_budgets_limit_their_key_only(tmp_path: Path) -> None:
    config = budget_config(tmp_path, daily_limit=1.0)
    config["auth"] = {
        "keys": [
            {"name": "a", "key": "key-a", "budget": {"hourly_limit": 0.02}},
            {"name": "b", "key": "key-b"},
        ]
    }
    async with run_gateway(config) as gw, sdk(gw.url, "key-a") as a, sdk(gw.url, "key-b") as b:
        for _ in range(2):
            await a.chat.completions.create(model="chat", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as caught:
            await a.chat.completions.create(model="chat", messages=HELLO)
        await b.chat.completions.create(model="chat", messages=HELLO)
        status_a, status_b = await budget_of(gw.url, "key-a"), await budget_of(gw.url, "key-b")
    assert "key 'a' hourly budget" in caught.value.message
    assert status_a["key"]["current_hour"] == {
        "spent": 0.02,
        "limit": 0.02,
        "remaining": 0.0,
        "resets_at": status_a["current_hour"]["resets_at"],
    }
    assert status_a["key"]["current_day"]["limit"] is None
    assert status_b["key"] is None
    assert status_b["current_day"]["spent"] == 0.03


async def test_cost_and_spend_reach_the_metrics(tmp_path: Path) -> None:
    async with run_gateway(budget_config(tmp_path, hourly_limit=1.0)) as gw:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                assert await post(session, gw.url) == 200
            async with session.get(gw.url + "/metrics") as response:
                text = await response.text()
    assert re.search(r'resillm_cost_usd_total\{[^}]*model="chat"[^}]*\} 0\.02\b', text)
    assert re.search(r'resillm_budget_spent_usd\{window="hour"\} 0\.02\b', text)


async def test_a_reload_brings_new_limits_to_the_same_spend(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    config = budget_config(tmp_path, hourly_limit=0.02)
    path.write_text(json.dumps(config))  # JSON is YAML
    gateway = create_app(path)
    async with serve_asgi(gateway, config) as url, aiohttp.ClientSession() as session:
        assert [await post(session, url) for _ in range(3)] == [200, 200, 429]
        config["budget"]["hourly_limit"] = 0.03
        path.write_text(json.dumps(config))
        assert (await gateway.reload()).applied
        assert [await post(session, url) for _ in range(2)] == [200, 429]
        assert (await budget_of(url))["current_hour"]["spent"] == 0.03
