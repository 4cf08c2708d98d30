"""The Anthropic provider through the real gateway, in front of the fake Anthropic server.

The client is the official `openai` SDK: what a team that puts Claude behind an
OpenAI-shaped endpoint sees. Faults are put on a target with `x-mock-*` headers (provider
`headers`) or a `mock-fault:NAME` model; `upstream.stats` shows what the fake received.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from resillm.mock_upstream import MockUpstream, MockUpstreamOptions, start_mock_upstream
from tests.conftest import run_gateway

pytestmark = pytest.mark.anyio
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
WEATHER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# Long enough that redacting it from upstream messages leaves their words alone.
API_KEY = "test-anthropic-key"
FAST_RETRIES = {"retry": {"initial_backoff": "1ms", "max_backoff": "10ms", "jitter": "none"}}


def anthropic(upstream: MockUpstream, **fields: Any) -> dict[str, Any]:
    return {"type": "anthropic", "base_url": upstream.url, "api_key": API_KEY, **fields}


def config(providers: dict[str, Any], *targets: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "providers": providers,
        "models": {"chat": {"targets": list(targets)}},
        "resilience": FAST_RETRIES,
        "logging": {"level": "error"},
        **sections,
    }


def single(upstream: MockUpstream, model: str = "claude-target", **fields: Any) -> dict[str, Any]:
    return config({"claude": anthropic(upstream, **fields)}, {"provider": "claude", "model": model})


def last_request(upstream: MockUpstream) -> Any:
    """The body of the last request the fake Anthropic server received."""
    return upstream.stats.last_request_json


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def stream_text(sdk: openai.AsyncOpenAI, **kwargs: Any) -> str:
    stream = await sdk.chat.completions.create(model="chat", stream=True, **kwargs)
    parts = [choice.delta.content or "" async for chunk in stream for choice in chunk.choices]
    return "".join(parts)


# -- completions ---------------------------------------------------------------------------


async def test_a_completion_is_an_openai_answer_from_the_model_that_answered(
    upstream: MockUpstream,
) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "system", "content": "Be brief."}, *HELLO],
            max_tokens=100,
        )
        answer = raw.parse()
    assert answer.id.startswith("chatcmpl-msg_")
    assert answer.model == "claude-target"
    assert raw.headers["x-resillm-model"] == "claude-target"
    assert raw.headers["x-resillm-provider"] == "claude"
    [choice] = answer.choices
    assert choice.message.content and choice.finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    sent = last_request(upstream)
    assert sent["model"] == "claude-target"
    assert sent["system"] == "Be brief."
    assert sent["max_tokens"] == 100
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]}
    ]
    headers = upstream.stats.last_headers
    assert headers["x-api-key"] == API_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers and "anthropic-beta" not in headers


async def test_version_beta_and_extra_headers_are_sent_as_configured(
    upstream: MockUpstream,
) -> None:
    cfg = single(
        upstream,
        anthropic_version="2024-02-02",
        anthropic_beta=["prompt-caching-2024-07-31", "token-efficient-tools-2025-02-19"],
        headers={"x-team": "agents"},
    )
    async with run_gateway(cfg) as gw, client(gw.url) as sdk:
        await sdk.chat.completions.create(model="chat", messages=HELLO)
    headers = upstream.stats.last_headers
    assert headers["anthropic-version"] == "2024-02-02"
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19"
    assert headers["x-team"] == "agents"


async def test_a_target_overrides_the_providers_key_and_base_url() -> None:
    async with await start_mock_upstream(MockUpstreamOptions(api_key="target-key")) as up:
        cfg = config(
            {"claude": {"type": "anthropic", "base_url": "http://127.0.0.1:9", "api_key": "x"}},
            {
                "provider": "claude",
                "model": "claude-target",
                "base_url": up.url + "/",
                "api_key": "target-key",
            },
        )
        async with run_gateway(cfg) as gw, client(gw.url) as sdk:
            answer = await sdk.chat.completions.create(model="chat", messages=HELLO)
        assert answer.choices[0].message.content
        assert up.stats.last_headers["x-api-key"] == "target-key"


async def test_a_tool_call_answer_has_openai_tool_calls(upstream: MockUpstream) -> None:
    async with run_gateway(single(upstream)) as gw:
        async with aiohttp.ClientSession() as http:
            body = {"model": "chat", "messages": WEATHER, "tools": TOOLS, "tool_choice": "required"}
            async with http.post(gw.url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
                answer = await response.json()
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("toolu_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    sent = last_request(upstream)
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert sent["tool_choice"] == {"type": "any"}


async def test_a_tool_result_conversation_reaches_anthropic_as_tool_blocks(
    upstream: MockUpstream,
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C and sunny"},
    ]
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(model="chat", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    sent = last_request(upstream)["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
        ],
    }
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C and sunny"}],
    }


async def test_a_trailing_assistant_message_is_continued(upstream: MockUpstream) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        whole = (await sdk.chat.completions.create(model="chat", messages=HELLO)).choices[0]
        text = whole.message.content or ""
        head = text[: text.index(" ", 3) + 1]  # the first word or two and a space
        prefilled: list[ChatCompletionMessageParam] = [
            *HELLO,
            {"role": "assistant", "content": head},
        ]
        rest = (await sdk.chat.completions.create(model="chat", messages=prefilled)).choices[0]
        streamed = await stream_text(sdk, messages=prefilled)
    # Anthropic got the prefill without its trailing space (it refuses one) ...
    assert last_request(upstream)["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": head.rstrip()}],
    }
    # ... and the client gets only the continuation, exactly.
    assert head + (rest.message.content or "") == text
    assert head + streamed == text


async def test_a_request_anthropic_cannot_express_is_a_400_and_never_sent(
    upstream: MockUpstream,
) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        with pytest.raises(openai.BadRequestError) as several:
            await sdk.chat.completions.create(model="chat", messages=HELLO, n=2)
        with pytest.raises(openai.BadRequestError) as hot:
            await sdk.chat.completions.create(
                model="chat", messages=HELLO, temperature=1.5, stream=True
            )
    assert several.value.status_code == 400
    assert several.value.body["param"] == "n"  # type: ignore[index]
    assert hot.value.body["param"] == "temperature"  # type: ignore[index]
    assert "0 to 1" in hot.value.body["message"]  # type: ignore[index]
    assert upstream.stats.requests == 0


# -- streams -------------------------------------------------------------------------------


async def test_a_stream_reassembles_to_the_completion_text(upstream: MockUpstream) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        whole = await sdk.chat.completions.create(model="chat", messages=HELLO)
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].model == "claude-target"
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert last_request(upstream)["stream"] is True


async def test_stream_usage_is_sent_when_the_client_asks(upstream: MockUpstream) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(
            model="chat", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1
    assert chunks[-1].usage is usages[0] and chunks[-1].choices == []
    assert usages[0].completion_tokens == 8
    assert usages[0].total_tokens == usages[0].prompt_tokens + 8


async def test_a_streamed_tool_call_accumulates_in_the_openai_sdk(upstream: MockUpstream) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        async with sdk.chat.completions.stream(
            model="chat", messages=WEATHER, tools=TOOLS
        ) as stream:
            events = [event.type async for event in stream]
            final = await stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("toolu_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "tool_calls.function.arguments.done" in events


@pytest.mark.parametrize("fault", ["omit-done", "malformed-3"])
async def test_a_stream_survives_a_missing_message_stop_or_a_malformed_event(
    upstream: MockUpstream, fault: str
) -> None:
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        expected = await stream_text(sdk, messages=HELLO)
    async with run_gateway(single(upstream, headers={"x-mock-fault": fault})) as gw:
        async with client(gw.url) as sdk:
            assert await stream_text(sdk, messages=HELLO) == expected


@pytest.mark.parametrize("fault", ["error-event-2", "no-finish"])
async def test_a_broken_stream_ends_with_an_error_event_not_done(
    upstream: MockUpstream, fault: str
) -> None:
    cfg = single(upstream, model=f"mock-fault:{fault}")
    cfg["resilience"] = {**FAST_RETRIES, "stream_recovery": False}
    async with run_gateway(cfg) as gw, aiohttp.ClientSession() as http:
        body = {"model": "chat", "messages": HELLO, "stream": True}
        async with http.post(gw.url + "/v1/chat/completions", json=body) as response:
            raw = await response.read()
    events = [line for line in raw.split(b"\n\n") if line]
    assert b"[DONE]" not in raw
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["message"]
    if fault == "error-event-2":
        assert last["error"]["type"] == "overloaded_error"
        assert sum(b'"content"' in event for event in events) == 3  # role chunk + 2 words


async def test_a_stalled_stream_times_out_after_stream_idle(upstream: MockUpstream) -> None:
    cfg = single(upstream, model="mock-fault:stall-2")
    cfg["resilience"] = {
        **FAST_RETRIES,
        "stream_recovery": False,
        "timeouts": {"stream_idle": "300ms"},
    }
    async with run_gateway(cfg) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        parts: list[str] = []
        with pytest.raises(openai.APIError, match="timed out"):
            async for chunk in stream:
                parts.extend(choice.delta.content or "" for choice in chunk.choices)
    assert len([p for p in parts if p]) == 2


async def test_an_anthropic_error_event_is_recovered_by_continuing_on_another_target(
    upstream: MockUpstream,
) -> None:
    cfg = config(
        {"broken": anthropic(upstream, prefill=False), "claude": anthropic(upstream)},
        {"provider": "broken", "model": "mock-fault:error-event-3"},
        {"provider": "claude", "model": "claude-b"},
    )
    async with run_gateway(single(upstream)) as gw, client(gw.url) as sdk:
        expected = await stream_text(sdk, messages=HELLO)
    async with run_gateway(cfg) as gw, client(gw.url) as sdk:
        assert await stream_text(sdk, messages=HELLO) == expected
    # The continuation went to Anthropic as a prefill: the three words already sent.
    prefill = last_request(upstream)["messages"][-1]
    assert prefill["role"] == "assistant"
    assert expected.startswith(prefill["content"][0]["text"])


# -- errors, retries, fallback ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "client_status", "attempts"),
    [
        (400, 400, 1),  # the request is wrong: straight back, no retry
        (401, 502, 1),  # the key is wrong: no retry, another target might do
        (403, 502, 1),
        (404, 502, 1),
        (413, 413, 1),
        (429, 429, 3),  # retried, then every failure a 429
        (500, 502, 3),
        (529, 502, 3),  # overloaded: retried
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_error_statuses_map_to_resillm_errors(
    upstream: MockUpstream, status: int, client_status: int, attempts: int, stream: bool
) -> None:
    cfg = single(upstream, headers={"x-mock-fail-status": str(status), "x-mock-retry-after": "0"})
    async with run_gateway(cfg) as gw, aiohttp.ClientSession() as http:
        body = {"model": "chat", "messages": HELLO, "stream": stream}
        async with http.post(gw.url + "/v1/chat/completions", json=body) as response:
            error = (await response.json())["error"]
            assert response.status == client_status
            if status == 429:  # Anthropic's retry-after (0s) is read, rounded up to 1s
                assert response.headers["Retry-After"] == "1"
    assert upstream.stats.requests == attempts
    if client_status in (400, 413):
        assert error["message"] == f"mock upstream failure ({status})"  # Anthropic's words
        assert error["type"] in ("invalid_request_error", "request_too_large")
    else:
        assert [a["status"] for a in error["attempts"]] == [status] * attempts
        assert all(a["provider"] == "claude" for a in error["attempts"])


async def test_529_is_retried_on_the_same_target_then_succeeds(upstream: MockUpstream) -> None:
    cfg = single(upstream, headers={"x-mock-fail-first": "1", "x-mock-fail-status": "529"})
    async with run_gateway(cfg) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-resillm-attempts"] == "2"
    assert upstream.stats.by_model == {"claude-target": 2}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_529_is_retried_then_falls_back_to_a_second_target(
    upstream: MockUpstream, stream: bool
) -> None:
    cfg = config(
        {"claude": anthropic(upstream)},
        {"provider": "claude", "model": "mock-fault:529"},
        {"provider": "claude", "model": "claude-b"},
    )
    async with run_gateway(cfg) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, stream=stream
        )
        answer = raw.parse()
        if isinstance(answer, openai.AsyncStream):
            models = {chunk.model async for chunk in answer}
        else:
            models = {answer.model}
    assert models == {"claude-b"}
    assert raw.headers["x-resillm-attempts"] == "4"
    assert upstream.stats.by_model == {"mock-fault:529": 3, "claude-b": 1}


async def test_a_prompt_too_long_falls_back_at_once_to_a_target_with_room(
    upstream: MockUpstream,
) -> None:
    cfg = config(
        {"claude": anthropic(upstream)},
        {"provider": "claude", "model": "mock-fault:context-length"},
        {"provider": "claude", "model": "claude-long"},
    )
    async with run_gateway(cfg) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(model="chat", messages=HELLO)
    assert answer.model == "claude-long"
    assert upstream.stats.by_model == {"mock-fault:context-length": 1, "claude-long": 1}


async def test_a_prompt_too_long_everywhere_is_the_upstreams_400(upstream: MockUpstream) -> None:
    async with run_gateway(single(upstream, model="mock-fault:context-length")) as gw:
        async with client(gw.url) as sdk:
            with pytest.raises(openai.BadRequestError) as caught:
                await sdk.chat.completions.create(model="chat", messages=HELLO)
    assert caught.value.code == "context_length_exceeded"
    assert "prompt is too long" in caught.value.message
