"""The gateway under hypercorn in front of a real fake upstream, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, run_gateway

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hello there"}]


def client(url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kwargs)


async def test_completion_matches_the_upstream_answer(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw:
        async with client(gw.url) as via_gateway, client(upstream.url) as direct:
            raw = await via_gateway.chat.completions.with_raw_response.create(
                model="chat", messages=HELLO
            )
            answer = raw.parse()
            expected = await direct.chat.completions.create(model="upstream-model", messages=HELLO)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.choices[0].message.content
    # The model that answered, not the alias the client sent.
    assert answer.model == "upstream-model"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert raw.headers["x-resillm-provider"] == "up"
    assert raw.headers["x-resillm-model"] == "upstream-model"
    assert raw.headers["x-resillm-attempts"] == "1"
    assert raw.headers["x-request-id"]


async def test_stream_reassembles_to_the_same_text(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw, client(gw.url) as sdk:
        whole = await sdk.chat.completions.create(model="chat", messages=HELLO)
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        parts, finish, models, usage = [], None, set(), None
        async for chunk in stream:
            models.add(chunk.model)
            usage = usage or chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == "stop"
    assert models == {"upstream-model"}
    # resillm asks the upstream for usage, but the client did not ask: it must not see it.
    assert usage is None
    assert upstream.stats.last_request_json["stream_options"] == {"include_usage": True}


async def test_stream_usage_is_forwarded_when_the_client_asks(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(
            model="chat", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    assert usages[0].completion_tokens == 8


async def test_stream_sends_chunks_as_the_upstream_produces_them(upstream: MockUpstream) -> None:
    delay = 0.15
    config = openai_compatible(
        upstream, headers={"x-mock-chunk-delay": str(delay), "x-mock-chunks": "6"}
    )
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        arrivals = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 6
    # Buffered anywhere, all six would land together; relayed, they keep the upstream's pace.
    assert arrivals[-1] - arrivals[0] >= 5 * delay * 0.6


async def test_unknown_request_fields_reach_the_upstream(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw, client(gw.url) as sdk:
        await sdk.chat.completions.create(
            model="chat",
            messages=HELLO,
            temperature=0.2,
            extra_body={"top_k": 5, "vendor_flag": {"a": [1, 2]}},
        )
    sent = upstream.stats.last_request_json
    assert sent["model"] == "upstream-model"
    assert sent["top_k"] == 5
    assert sent["vendor_flag"] == {"a": [1, 2]}
    assert sent["temperature"] == 0.2


async def test_provider_key_and_headers_are_sent_upstream(upstream: MockUpstream) -> None:
    config = openai_compatible(upstream, api_key="sk-upstream-key", headers={"x-team": "blue"})
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        await sdk.chat.completions.create(model="chat", messages=HELLO)
    headers = upstream.stats.last_headers
    assert headers["authorization"] == "Bearer sk-upstream-key"
    assert headers["x-team"] == "blue"


async def test_azure_uses_deployment_url_and_api_key_header(upstream: MockUpstream) -> None:
    config = {
        "providers": {
            "az": {
                "type": "azure",
                "base_url": upstream.url,
                "api_key": "azure-secret",
                "api_version": "2024-10-21",
            }
        },
        "models": {"chat": {"targets": [{"provider": "az", "model": "my-deployment"}]}},
    }
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(model="chat", messages=HELLO)
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert answer.choices[0].message.content == text
    headers = upstream.stats.last_headers
    assert headers["api-key"] == "azure-secret"
    assert "authorization" not in headers


async def test_client_disconnect_mid_stream_closes_the_upstream(upstream: MockUpstream) -> None:
    config = openai_compatible(
        upstream, headers={"x-mock-chunk-delay": "0.2", "x-mock-chunks": "50"}
    )
    async with run_gateway(config) as gw:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                gw.url + "/v1/chat/completions",
                json={"model": "chat", "messages": HELLO, "stream": True},
            )
            assert response.status == 200
            await response.content.readline()  # the first event arrived: the stream is live
            assert upstream.stats.active == 1
            response.close()  # the client goes away mid-stream
        for _ in range(100):
            if upstream.stats.disconnected == 1:
                break
            await asyncio.sleep(0.02)
        # Well before the 10 s the full answer would take, the upstream saw the connection go.
        assert upstream.stats.disconnected == 1
        assert upstream.stats.active == 0
        assert upstream.stats.completed == 0


async def test_models_lists_every_alias(upstream: MockUpstream) -> None:
    config = openai_compatible(upstream)
    config["models"]["other"] = {"targets": [{"provider": "up", "model": "m2"}]}
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        page = await sdk.models.list()
    assert sorted(m.id for m in page.data) == ["chat", "other"]
    assert {m.owned_by for m in page.data} == {"resillm"}


async def test_health_and_ready(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/health") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}
            async with session.get(gw.url + "/ready") as response:
                assert response.status == 200
                body = await response.json()
    assert body["status"] == "ready"
    assert body["models"]["chat"]["targets"] == [
        {"provider": "up", "model": "upstream-model", "available": True}
    ]


async def test_in_process_mock_provider_answers_without_network() -> None:
    config = {
        "providers": {"m": {"type": "mock", "chunks": 5}},
        "models": {"demo": {"targets": [{"provider": "m", "model": "mock-1"}]}},
    }
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        first = await sdk.chat.completions.create(model="demo", messages=HELLO)
        again = await sdk.chat.completions.create(model="demo", messages=HELLO)
        stream = await sdk.chat.completions.create(
            model="demo", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    text = first.choices[0].message.content
    assert text and len(text.split()) == 5
    assert again.choices[0].message.content == text  # deterministic
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
