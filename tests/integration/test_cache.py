"""The response cache through the real gateway, in front of a real fake upstream."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from resillm.app import create_app
from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, run_gateway, serve_asgi

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hello there"}]
WEATHER = [{"role": "user", "content": "what is the weather in Paris?"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def cached(upstream: MockUpstream, cache: dict[str, Any] | None = None, **provider: Any) -> Any:
    config = openai_compatible(upstream, **provider)
    config["cache"] = {"enabled": True, **(cache or {})}
    return config


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def metric(url: str, result: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    found = re.search(rf'resillm_cache_requests_total{{result="{result}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


async def stream_text(sdk: openai.AsyncOpenAI, **extra: Any) -> tuple[str, str | None, Any]:
    response = await sdk.chat.completions.with_raw_response.create(
        model="chat", messages=HELLO, stream=True, **extra
    )
    parts, finish, usage = [], None, None
    async for chunk in response.parse():
        usage = chunk.usage or usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), response.headers["x-resillm-cache"], (finish, usage)


async def test_a_second_identical_request_never_reaches_the_upstream(
    upstream: MockUpstream,
) -> None:
    async with run_gateway(cached(upstream)) as gw, client(gw.url) as sdk:
        first = await sdk.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
        second = await sdk.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
        assert (await metric(gw.url, "miss"), await metric(gw.url, "hit")) == (1, 1)
    assert upstream.stats.requests == 1
    assert first.headers["x-resillm-cache"] == "miss"
    assert second.headers["x-resillm-cache"] == "hit"
    assert second.headers["x-resillm-attempts"] == "0"
    assert second.headers["x-resillm-provider"] == "up"
    assert second.headers["x-resillm-model"] == "upstream-model"
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.id != b.id and b.model == "upstream-model"
    assert b.usage is not None and b.usage.completion_tokens == a.usage.completion_tokens  # type: ignore[union-attr]


async def test_a_different_request_is_a_miss(upstream: MockUpstream) -> None:
    async with run_gateway(cached(upstream)) as gw, client(gw.url) as sdk:
        await sdk.chat.completions.create(model="chat", messages=HELLO)
        other = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, temperature=0.5
        )
    assert other.headers["x-resillm-cache"] == "miss" and upstream.stats.requests == 2


async def test_a_stream_is_replayed_from_the_cache_as_valid_sse(upstream: MockUpstream) -> None:
    async with run_gateway(cached(upstream)) as gw, client(gw.url) as sdk:
        original, first, _ = await stream_text(sdk)
        replayed, second, (finish, usage) = await stream_text(sdk)
        _, _, (_, with_usage) = await stream_text(sdk, stream_options={"include_usage": True})
    assert (first, second) == ("miss", "hit")
    assert replayed == original and original
    assert finish == "stop" and usage is None
    assert with_usage is not None and with_usage.completion_tokens == 8
    assert upstream.stats.requests == 1


async def test_a_json_answer_is_replayed_as_a_stream_and_back(upstream: MockUpstream) -> None:
    async with run_gateway(cached(upstream)) as gw, client(gw.url) as sdk:
        whole = await sdk.chat.completions.create(model="chat", messages=HELLO)
        text, status, _ = await stream_text(sdk)
        assert (text, status) == (whole.choices[0].message.content, "hit")
        # The other way round, with another prompt: stream first, then JSON.
        stream = await sdk.chat.completions.create(model="chat", messages=WEATHER, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=WEATHER)
    assert raw.headers["x-resillm-cache"] == "hit"
    assert raw.parse().choices[0].message.content == streamed
    assert upstream.stats.requests == 2


async def test_a_tool_call_is_replayed_for_the_sdk_stream_helper(upstream: MockUpstream) -> None:
    async with run_gateway(cached(upstream)) as gw, client(gw.url) as sdk:
        finals = []
        for _ in range(2):
            async with sdk.chat.completions.stream(
                model="chat", messages=WEATHER, tools=TOOLS
            ) as stream:
                finals.append(await stream.get_final_completion())
        whole = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=WEATHER, tools=TOOLS
        )
    assert upstream.stats.requests == 1
    assert whole.headers["x-resillm-cache"] == "hit"
    for final in (*finals, whole.parse()):
        choice = final.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        assert calls[0].type == "function"
        assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        assert calls[0].id == finals[0].choices[0].message.tool_calls[0].id  # type: ignore[index]


async def test_a_cut_stream_is_not_cached(upstream: MockUpstream) -> None:
    config = cached(upstream, headers={"x-mock-cut-after": "2"})
    config["resilience"] = {"stream_recovery": False, "retry": {"max_attempts": 1}}
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        for _ in range(2):
            status, headers, body = await post(
                session, gw.url, {"model": "chat", "messages": HELLO, "stream": True}
            )
            assert status == 200 and headers["x-resillm-cache"] == "miss"
            assert b'data: {"error"' in body and b"[DONE]" not in body
    assert upstream.stats.requests == 2


async def test_a_recovered_stream_is_cached_whole(upstream: MockUpstream) -> None:
    config = cached(upstream)
    base = {**config["providers"]["up"], "prefill": True}
    config["providers"] = {"bad": {**base, "headers": {"x-mock-cut-after": "3"}}, "good": base}
    config["models"]["chat"]["targets"] = [
        {"provider": "bad", "model": "upstream-model"},
        {"provider": "good", "model": "upstream-model"},
    ]
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        recovered, first, _ = await stream_text(sdk)
        assert upstream.stats.aborted >= 1  # it was cut, and recovered
        calls = upstream.stats.requests
        replayed, second, (finish, _) = await stream_text(sdk)
        assert upstream.stats.requests == calls
    async with client(upstream.url) as direct:
        whole = await direct.chat.completions.create(model="upstream-model", messages=HELLO)
    assert (first, second) == ("miss", "hit")
    assert replayed == recovered == whole.choices[0].message.content and finish == "stop"


async def test_an_upstream_error_is_not_cached_and_carries_the_header(
    upstream: MockUpstream,
) -> None:
    config = cached(upstream, headers={"x-mock-fail-status": "400"})
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        for _ in range(2):
            status, headers, _ = await post(session, gw.url, {"model": "chat", "messages": HELLO})
            assert status == 400 and headers["x-resillm-cache"] == "miss"
    assert upstream.stats.requests == 2


async def test_cache_control_from_the_client(upstream: MockUpstream) -> None:
    body = {"model": "chat", "messages": HELLO}
    async with run_gateway(cached(upstream)) as gw, aiohttp.ClientSession() as session:
        _, headers, _ = await post(session, gw.url, body, **{"Cache-Control": "no-store"})
        assert headers["x-resillm-cache"] == "miss"
        _, headers, _ = await post(session, gw.url, body)
        assert headers["x-resillm-cache"] == "miss"  # the no-store answer was not kept
        assert upstream.stats.requests == 2
        _, headers, _ = await post(session, gw.url, body, **{"Cache-Control": "no-cache"})
        assert headers["x-resillm-cache"] == "bypass"
        assert upstream.stats.requests == 3
        _, headers, _ = await post(session, gw.url, body, **{"Cache-Control": "no-store"})
        assert headers["x-resillm-cache"] == "hit"
        assert upstream.stats.requests == 3


async def test_uncacheable_requests_bypass_the_cache(upstream: MockUpstream) -> None:
    body = {"model": "chat", "messages": HELLO, "n": 2}
    async with run_gateway(cached(upstream)) as gw, aiohttp.ClientSession() as session:
        for _ in range(2):
            status, headers, _ = await post(session, gw.url, body)
            assert status == 200 and headers["x-resillm-cache"] == "bypass"
    assert upstream.stats.requests == 2


async def test_twenty_concurrent_identical_requests_reach_the_upstream_once(
    upstream: MockUpstream,
) -> None:
    config = cached(upstream, headers={"x-mock-chunk-delay": "0.05"})
    async with run_gateway(config) as gw, client(gw.url) as sdk:

        async def ask(stream: bool) -> tuple[str | None, str]:
            response = await sdk.chat.completions.with_raw_response.create(
                model="chat", messages=HELLO, stream=stream
            )
            if stream:
                chunks = [c async for c in response.parse()]  # type: ignore[union-attr]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = response.parse().choices[0].message.content or ""  # type: ignore[union-attr]
            return response.headers["x-resillm-cache"], text

        results = await asyncio.gather(*(ask(stream=i % 2 == 0) for i in range(20)))
        assert (await metric(gw.url, "miss"), await metric(gw.url, "hit")) == (1, 19)
    assert upstream.stats.requests == 1
    assert sorted(status for status, _ in results) == ["hit"] * 19 + ["miss"]
    assert len({text for _, text in results}) == 1


async def test_waiters_go_upstream_themselves_when_the_first_fails(
    upstream: MockUpstream,
) -> None:
    config = cached(upstream, headers={"x-mock-fail-first": "1", "x-mock-latency": "0.2"})
    config["resilience"] = {"retry": {"max_attempts": 1}}
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        body = {"model": "chat", "messages": HELLO}
        results = await asyncio.gather(*(post(session, gw.url, body) for _ in range(5)))
    statuses = sorted((status, headers["x-resillm-cache"]) for status, headers, _ in results)
    assert statuses == [(200, "miss")] * 4 + [(502, "miss")]  # none shares the failure
    assert upstream.stats.requests == 5


async def test_a_cache_hit_costs_nothing(upstream: MockUpstream, tmp_path: Path) -> None:
    config = cached(upstream)
    config["models"]["chat"]["pricing"] = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
    config["budget"] = {"hourly_limit": 100.0, "snapshot_path": str(tmp_path / "b.json")}
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:

        async def spent() -> float:
            async with session.get(gw.url + "/v1/budget") as response:
                return float((await response.json())["current_hour"]["spent"])

        await post(session, gw.url, {"model": "chat", "messages": HELLO})
        after_miss = await spent()
        _, headers, _ = await post(session, gw.url, {"model": "chat", "messages": HELLO})
        assert headers["x-resillm-cache"] == "hit"
        assert after_miss > 0 and await spent() == after_miss


async def test_with_the_cache_off_there_is_no_cache_header(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw, aiohttp.ClientSession() as s:
        for _ in range(2):
            _, headers, _ = await post(s, gw.url, {"model": "chat", "messages": HELLO})
            assert "x-resillm-cache" not in headers
    assert upstream.stats.requests == 2


async def test_answers_survive_a_reload_and_the_cache_can_be_turned_off(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text(json.dumps(cached(upstream)))  # JSON is YAML
    gateway = create_app(path)
    body = {"model": "chat", "messages": HELLO}
    async with serve_asgi(gateway) as url, aiohttp.ClientSession() as session:
        await post(session, url, body)
        assert (await gateway.reload()).applied
        _, headers, _ = await post(session, url, body)
        assert headers["x-resillm-cache"] == "hit"
        config = cached(upstream)
        config["cache"]["enabled"] = False
        path.write_text(json.dumps(config))
        assert (await gateway.reload()).applied
        _, headers, _ = await post(session, url, body)
        assert "x-resillm-cache" not in headers
    assert upstream.stats.requests == 2
