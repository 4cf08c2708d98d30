"""The mock upstream on a real loopback socket, read by the official SDKs and raw aiohttp."""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import anyio
import msgspec
import openai
import pytest
from aiohttp import web
from anthropic.types import MessageParam, ToolParam
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from resillm.mock_upstream import (
    MockUpstream,
    MockUpstreamOptions,
    app_stats,
    build_mock_app,
    start_mock_upstream,
)

pytestmark = pytest.mark.anyio

HELLO_TEXT = "Say something resilient."
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": HELLO_TEXT}]
CLAUDE_HELLO: list[MessageParam] = [{"role": "user", "content": HELLO_TEXT}]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


# `anyio_backend` and `upstream` (default options) come from tests/conftest.py.


@pytest.fixture
async def oai(upstream: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=upstream.url + "/v1", api_key="x", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def claude(upstream: MockUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=upstream.url, api_key="x", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sse_data(
    http: aiohttp.ClientSession, url: str, body: object, headers: dict[str, str] | None = None
) -> list[str]:
    """The `data:` payloads of a streamed answer, in order."""
    async with http.post(url, json=body, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [
            line.decode().removeprefix("data: ").rstrip("\n")
            async for line in response.content
            if line.startswith(b"data: ")
        ]


# --- OpenAI wire format -------------------------------------------------------------------


async def test_openai_sdk_reads_a_plain_answer(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.chat.completions.create(model="mock-model", messages=HELLO)

    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == "mock-model"
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert len(choice.message.content.split()) == 8
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens == len(HELLO_TEXT) // 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8


async def test_openai_stream_carries_the_same_text_as_the_plain_answer(
    oai: openai.AsyncOpenAI,
) -> None:
    plain = await oai.chat.completions.create(model="m", messages=HELLO)
    stream = await oai.chat.completions.create(model="m", messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert len({chunk.id for chunk in chunks}) == 1
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {"m"}
    content = [chunk.choices[0].delta.content for chunk in chunks[1:-1]]
    assert len(content) == 8
    assert "".join(c or "" for c in content) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None


async def test_same_request_gets_same_answer_and_another_prompt_another(
    oai: openai.AsyncOpenAI,
) -> None:
    other: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Something else entirely."}
    ]
    first = await oai.chat.completions.create(model="m", messages=HELLO)
    again = await oai.chat.completions.create(model="m", messages=HELLO)
    different = await oai.chat.completions.create(model="m", messages=other)

    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != different.choices[0].message.content


async def test_usage_chunk_is_sent_only_when_asked_for(oai: openai.AsyncOpenAI) -> None:
    plain = await oai.chat.completions.create(model="m", messages=HELLO, stream=True)
    without = [chunk async for chunk in plain]
    asked = await oai.chat.completions.create(
        model="m",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    with_usage = [chunk async for chunk in asked]

    assert all(chunk.usage is None for chunk in without)
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 8
    assert with_usage[-2].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in with_usage[:-1])


async def test_max_tokens_below_the_answer_cuts_it_with_finish_length(
    oai: openai.AsyncOpenAI,
) -> None:
    full = await oai.chat.completions.create(model="m", messages=HELLO)
    cut = await oai.chat.completions.create(model="m", messages=HELLO, max_tokens=3)
    newer = await oai.chat.completions.create(
        model="m",
        messages=HELLO,
        max_completion_tokens=3,
    )

    full_words = (full.choices[0].message.content or "").split()
    for answer in (cut, newer):
        assert answer.choices[0].finish_reason == "length"
        assert (answer.choices[0].message.content or "").split() == full_words[:3]
        assert answer.usage is not None and answer.usage.completion_tokens == 3


async def test_weather_question_with_tools_gets_a_tool_call(oai: openai.AsyncOpenAI) -> None:
    ask: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    answer = await oai.chat.completions.create(model="m", messages=ask, tools=[WEATHER_TOOL])

    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert msgspec.json.decode(calls[0].function.arguments) == {"city": "Paris"}

    no_tools = await oai.chat.completions.create(model="m", messages=ask)
    assert no_tools.choices[0].finish_reason == "stop"


async def test_streamed_tool_call_arrives_as_argument_fragments(oai: openai.AsyncOpenAI) -> None:
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather tomorrow?"}]
    stream = await oai.chat.completions.create(
        model="m",
        messages=ask,
        tools=[WEATHER_TOOL],
        stream=True,
    )
    chunks = [chunk async for chunk in stream]

    head = (chunks[0].choices[0].delta.tool_calls or [])[0]
    assert (head.index, head.type) == (0, "function")
    assert head.id and head.function and head.function.name == "get_weather"
    fragments = [
        call.function.arguments or ""
        for chunk in chunks[1:]
        for call in chunk.choices[0].delta.tool_calls or []
        if call.function is not None
    ]
    assert len(fragments) > 1
    assert msgspec.json.decode("".join(fragments)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_trailing_assistant_message_is_continued(oai: openai.AsyncOpenAI) -> None:
    full = await oai.chat.completions.create(model="m", messages=HELLO)
    text = full.choices[0].message.content or ""
    prefix = text[: len(text) // 2]
    prefilled: list[ChatCompletionMessageParam] = [
        *HELLO,
        {"role": "assistant", "content": prefix},
    ]
    rest = await oai.chat.completions.create(model="m", messages=prefilled)

    assert prefix + (rest.choices[0].message.content or "") == text


# --- Anthropic wire format ----------------------------------------------------------------


async def test_anthropic_sdk_reads_a_plain_and_a_streamed_message(
    claude: anthropic.AsyncAnthropic,
) -> None:
    plain = await claude.messages.create(model="claude-x", max_tokens=100, messages=CLAUDE_HELLO)
    async with claude.messages.stream(
        model="claude-x", max_tokens=100, messages=CLAUDE_HELLO
    ) as stream:
        kinds = [event.type async for event in stream]
        streamed = await stream.get_final_message()

    assert plain.type == "message" and plain.role == "assistant" and plain.model == "claude-x"
    assert plain.stop_reason == "end_turn"
    assert plain.content[0].type == "text"
    assert len(plain.content[0].text.split()) == 8
    assert plain.usage.output_tokens == 8 and plain.usage.input_tokens >= 1
    assert streamed.content[0].type == "text"
    assert streamed.content[0].text == plain.content[0].text
    assert streamed.stop_reason == "end_turn" and streamed.usage.output_tokens == 8
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_delta") == 8


async def test_anthropic_max_tokens_stops_early_and_is_required(
    upstream: MockUpstream, claude: anthropic.AsyncAnthropic, http: aiohttp.ClientSession
) -> None:
    short = await claude.messages.create(model="c", max_tokens=2, messages=CLAUDE_HELLO)
    assert short.stop_reason == "max_tokens"
    assert short.content[0].type == "text" and len(short.content[0].text.split()) == 2

    # The SDK refuses to send this, so it goes raw.
    body = {"model": "c", "messages": HELLO}
    async with http.post(upstream.url + "/v1/messages", json=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "max_tokens" in error["message"]


async def test_anthropic_tool_use(claude: anthropic.AsyncAnthropic) -> None:
    tool: ToolParam = {"name": "get_weather", "input_schema": {"type": "object"}}
    ask: list[MessageParam] = [{"role": "user", "content": "weather in Paris?"}]
    async with claude.messages.stream(
        model="c",
        max_tokens=100,
        messages=ask,
        tools=[tool],
    ) as stream:
        message = await stream.get_final_message()

    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})


# --- failures and faults ------------------------------------------------------------------


async def test_fail_rate_one_answers_fail_status_in_each_providers_shape() -> None:
    options = MockUpstreamOptions(fail_rate=1.0, fail_status=429, retry_after=0.5)
    async with (
        await start_mock_upstream(options) as server,
        openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=server.url, api_key="x", max_retries=0) as claude,
    ):
        with pytest.raises(openai.RateLimitError) as openai_error:
            await oai.chat.completions.create(model="m", messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as anthropic_error:
            await claude.messages.create(model="c", max_tokens=10, messages=CLAUDE_HELLO)

        assert openai_error.value.response.headers["retry-after"] == "0.5"
        assert openai_error.value.code == "rate_limit_exceeded"
        assert anthropic_error.value.response.json()["error"]["type"] == "rate_limit_error"
        assert (server.stats.requests, server.stats.failed) == (2, 2)


async def test_seeded_fail_rate_fails_the_same_requests_every_run(
    http: aiohttp.ClientSession,
) -> None:
    async def statuses() -> list[int]:
        options = MockUpstreamOptions(fail_rate=0.5, fail_status=500, seed=7)
        async with await start_mock_upstream(options) as server:
            body = {"model": "m", "messages": HELLO}
            url = server.url + "/v1/chat/completions"
            found = []
            for _ in range(20):
                async with http.post(url, json=body) as response:
                    found.append(response.status)
            return found

    first = await statuses()
    assert first == await statuses()
    assert set(first) == {200, 500}


async def test_fail_status_header_always_fails_and_fail_first_only_at_first(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    url, body = upstream.url + "/v1/chat/completions", {"model": "m", "messages": HELLO}
    always = {"x-mock-fail-status": "502"}
    first_two = {"x-mock-fail-first": "2", "x-mock-fail-status": "503"}
    seen = []
    for headers in (always, always, first_two, first_two, first_two, first_two):
        async with http.post(url, json=body, headers=headers) as response:
            seen.append(response.status)
            error = (await response.json()).get("error")
            assert (error is None) == (response.status == 200)

    assert seen == [502, 502, 503, 503, 200, 200]


async def test_fail_code_names_the_error(upstream: MockUpstream, oai: openai.AsyncOpenAI) -> None:
    headers = {"x-mock-fail-status": "400", "x-mock-fail-code": "context_length_exceeded"}
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model="m", messages=HELLO, extra_headers=headers)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length" in caught.value.message


async def test_cut_after_breaks_the_stream_midway(
    upstream: MockUpstream, oai: openai.AsyncOpenAI
) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=HELLO,
        stream=True,
        extra_headers={"x-mock-cut-after": "3"},
    )
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)

    assert len(received) == 1 + 3  # the role chunk and three words, never a finish
    assert upstream.stats.aborted == 1
    assert upstream.stats.completed == 0


async def test_cut_after_without_stream_drops_the_connection_before_any_byte(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": HELLO}
    headers = {"x-mock-cut-after": "0"}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.post(upstream.url + "/v1/chat/completions", json=body, headers=headers)


async def test_client_disconnect_mid_stream_is_counted(upstream: MockUpstream) -> None:
    async with openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="x") as oai:
        stream = await oai.chat.completions.create(
            model="m",
            messages=HELLO,
            stream=True,
            extra_headers={"x-mock-stall-after": "2"},
        )
        async for chunk in stream:
            if chunk.choices[0].delta.content:
                break
        assert upstream.stats.active == 1
        await stream.close()

    with anyio.fail_after(2):
        while upstream.stats.disconnected == 0:  # noqa: ASYNC110 - plain counters, polled
            await anyio.sleep(0.01)
    assert upstream.stats.active == 0
    assert upstream.stats.completed == 0


async def test_chunks_are_written_as_they_are_made(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"x-mock-chunk-delay": "0.1", "x-mock-chunks": "4", "x-mock-latency": "0.1"}
    body = {"model": "m", "messages": HELLO, "stream": True}
    started = time.monotonic()
    arrivals = []
    async with http.post(upstream.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        async for line in resp.content:
            if b'"content":"' in line and b'"content":""' not in line:
                arrivals.append(time.monotonic() - started)

    assert len(arrivals) == 4
    assert arrivals[0] >= 0.1  # latency before the first chunk
    assert arrivals[0] < 0.25  # ...which came well before the stream's end
    assert arrivals[-1] - arrivals[0] >= 0.29  # three gaps of 0.1 s


async def test_malformed_event_comes_before_the_given_chunk_and_the_stream_goes_on(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    data = await sse_data(
        http, upstream.url + "/v1/chat/completions", body, {"x-mock-malformed-at": "2"}
    )

    assert data[3] == "{not json"  # role chunk, two words, then the bad event
    assert data[-1] == "[DONE]"
    assert len(data) == 1 + 8 + 1 + 1 + 1


async def test_error_event_ends_the_stream_without_done(
    upstream: MockUpstream, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    headers = {"x-mock-error-event-after": "2"}
    data = await sse_data(http, upstream.url + "/v1/chat/completions", body, headers)

    assert len(data) == 1 + 2 + 1
    assert "message" in msgspec.json.decode(data[-1])["error"]
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async with claude.messages.stream(
            model="c",
            max_tokens=100,
            messages=CLAUDE_HELLO,
            extra_headers=headers,
        ) as stream:
            await stream.get_final_message()


async def test_no_finish_ends_cleanly_without_a_finish_reason(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    data = await sse_data(
        http, upstream.url + "/v1/chat/completions", body, {"x-mock-no-finish": "1"}
    )

    assert data[-1] == "[DONE]"
    chunks = [msgspec.json.decode(item) for item in data[:-1]]
    assert len(chunks) == 9
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)


async def test_omit_done_sends_the_finish_and_usage_then_ends_cleanly_without_done(
    upstream: MockUpstream, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    body = {
        "model": "m",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = await sse_data(
        http, upstream.url + "/v1/chat/completions", body, {"x-mock-omit-done": "1"}
    )

    assert "[DONE]" not in data
    chunks = [msgspec.json.decode(item) for item in data]
    assert len(chunks) == 1 + 8 + 1 + 1  # role, words, finish, usage
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert upstream.stats.completed == 1  # a clean end of the body, not a cut

    # Anthropic's `[DONE]` is `message_stop`.
    async with claude.messages.stream(
        model="c", max_tokens=100, messages=CLAUDE_HELLO, extra_headers={"x-mock-omit-done": "1"}
    ) as stream:
        kinds = [event.type async for event in stream]
    assert "message_stop" not in kinds
    assert kinds[-1] == "message_delta"


async def test_omit_done_with_no_finish_ends_with_neither(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    headers = {"x-mock-omit-done": "1", "x-mock-no-finish": "1"}
    data = await sse_data(http, upstream.url + "/v1/chat/completions", body, headers)

    chunks = [msgspec.json.decode(item) for item in data]  # no `[DONE]` to decode
    assert len(chunks) == 1 + 8
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)


async def post_status(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str = "m"
) -> tuple[int, str | None]:
    body = {"model": model, "messages": HELLO}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        await response.read()
        return response.status, response.headers.get("retry-after")


async def test_down_for_fails_for_that_long_after_the_first_request_then_recovers(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    down = {"x-mock-down-for": "0.3", "x-mock-retry-after": "0.1"}
    started = time.monotonic()
    assert await post_status(http, upstream.url, down) == (503, "0.1")
    assert await post_status(http, upstream.url, {}) == (200, None)  # others are not affected
    assert await post_status(http, upstream.url, down) == (503, "0.1")
    await anyio.sleep(0.35 - (time.monotonic() - started))
    assert await post_status(http, upstream.url, down) == (200, None)
    assert await post_status(http, upstream.url, down) == (200, None)

    # Another duration is another outage, from its own first request, in its fail-status.
    other = {"x-mock-down-for": "5", "x-mock-fail-status": "500"}
    assert await post_status(http, upstream.url, other) == (500, None)


async def test_down_for_option_takes_the_whole_server_down_for_a_while(
    http: aiohttp.ClientSession,
) -> None:
    options = MockUpstreamOptions(down_for=0.2, fail_status=502)
    async with await start_mock_upstream(options) as server:
        first = await post_status(http, server.url, {})
        await anyio.sleep(0.25)
        later = await post_status(http, server.url, {})
    assert (first, later) == ((502, None), (200, None))
    with pytest.raises(ValueError, match="down_for"):
        MockUpstreamOptions(down_for=-1)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("headers", [{"x-mock-reset": "1"}, {"x-mock-fault": "reset"}])
async def test_reset_sends_a_tcp_reset_before_any_byte(
    upstream: MockUpstream, http: aiohttp.ClientSession, headers: dict[str, str], stream: bool
) -> None:
    body = {"model": "m", "messages": HELLO, "stream": stream}
    with pytest.raises(aiohttp.ClientOSError) as caught:
        async with http.post(
            upstream.url + "/v1/chat/completions", json=body, headers=headers
        ) as response:
            await response.read()

    assert caught.value.errno == errno.ECONNRESET  # a reset, not the clean close of cut-after
    assert (upstream.stats.aborted, upstream.stats.completed) == (1, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_sends_nothing_until_the_client_gives_up(
    upstream: MockUpstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    body = {"model": "m", "messages": HELLO, "stream": stream}
    with pytest.raises(TimeoutError):
        async with http.post(
            upstream.url + "/v1/chat/completions",
            json=body,
            headers={"x-mock-fault": "hang"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass  # not reached: not even the status line comes

    with anyio.fail_after(2):
        while upstream.stats.disconnected == 0:  # noqa: ASYNC110 - plain counters, polled
            await anyio.sleep(0.01)
    assert (upstream.stats.active, upstream.stats.completed) == (0, 0)


@pytest.mark.parametrize("pick", ["header", "model"])
async def test_named_faults_pick_a_scenario_by_header_or_by_model(
    upstream: MockUpstream, http: aiohttp.ClientSession, pick: str
) -> None:
    url = upstream.url + "/v1/chat/completions"

    def request(names: str, stream: bool = False) -> tuple[dict[str, object], dict[str, str]]:
        if pick == "header":
            return {"model": "m", "messages": HELLO, "stream": stream}, {"x-mock-fault": names}
        return {"model": "mock-fault:" + names, "messages": HELLO, "stream": stream}, {}

    async def status_of(names: str) -> tuple[int, dict[str, object]]:
        body, headers = request(names)
        async with http.post(url, json=body, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    async def data_of(names: str) -> list[str]:
        body, headers = request(names, stream=True)
        return await sse_data(http, url, body, headers)

    assert [(await status_of("fail-first-2"))[0] for _ in range(3)] == [503, 503, 200]
    body, headers = request("429")
    async with http.post(url, json=body, headers=headers) as response:
        assert (response.status, response.headers["retry-after"]) == (429, "0")
    for name, code in (
        ("context-length", "context_length_exceeded"),
        ("content-policy", "content_policy_violation"),
    ):
        status, answer = await status_of(name)
        assert (status, answer["error"]["code"]) == (400, code)  # type: ignore[index]
    assert (await status_of("504"))[0] == 504

    started = time.monotonic()
    assert (await status_of("slow-first-byte"))[0] == 200
    assert time.monotonic() - started >= 1.0

    assert "{not json" in await data_of("malformed-1")
    error_event = await data_of("error-event-2")
    assert len(error_event) == 1 + 2 + 1 and "error" in error_event[-1]
    assert "[DONE]" not in await data_of("omit-done")
    no_finish = await data_of("no-finish")
    assert no_finish[-1] == "[DONE]" and '"finish_reason":"stop"' not in "".join(no_finish)
    body, headers = request("cut-3", stream=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        await sse_data(http, url, body, headers)

    # Several at once: the first two requests fail, the third is cut after one chunk. This
    # list counts its own two failures, apart from the plain `fail-first-2` above.
    assert (await status_of("fail-first-2,cut-1"))[0] == 503
    assert (await status_of("fail-first-2,cut-1"))[0] == 503
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await status_of("fail-first-2,cut-1")

    assert [(await status_of("down-300ms"))[0] for _ in range(2)] == [503, 503]
    await anyio.sleep(0.35)
    assert (await status_of("down-300ms"))[0] == 200
    assert (await status_of("down-1s"))[0] == 503


async def test_stalled_named_fault_sends_chunks_then_nothing(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "mock-fault:stall-2", "messages": HELLO, "stream": True}
    found: list[bytes] = []
    with pytest.raises(TimeoutError):
        async with http.post(
            upstream.url + "/v1/chat/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(sock_read=0.3),
        ) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    found.append(line)
    assert len(found) == 1 + 2  # the role chunk and two words


async def test_explicit_headers_win_over_named_faults_and_model_names(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"x-mock-fault": "429", "x-mock-retry-after": "2"}
    assert await post_status(http, upstream.url, headers) == (429, "2")
    # The header's names win over the model's.
    status = await post_status(http, upstream.url, {"x-mock-fault": "500"}, "mock-fault:502")
    assert status == (500, None)
    assert await post_status(http, upstream.url, {}, "mock-fault:502") == (502, None)
    assert upstream.stats.by_model == {"m": 1, "mock-fault:502": 2}


@pytest.mark.parametrize(
    ("headers", "model", "named"),
    [
        ({"x-mock-fault": "explode"}, "m", "x-mock-fault: unknown fault 'explode'"),
        ({"x-mock-fault": "cut-3,nope"}, "m", "unknown fault 'nope'"),
        ({}, "mock-fault:cut-x", "model mock-fault:cut-x: unknown fault 'cut-x'"),
        ({"x-mock-down-for": "soon"}, "m", "x-mock-down-for"),
    ],
)
async def test_unknown_named_faults_get_400_listing_the_known_ones(
    upstream: MockUpstream,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    model: str,
    named: str,
) -> None:
    body = {"model": model, "messages": HELLO}
    async with http.post(
        upstream.url + "/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status == 400
        message = (await response.json())["error"]["message"]
    assert named in message
    if "unknown fault" in named:
        assert "fail-first-N" in message and "omit-done" in message


# --- request validation, auth and the side routes -----------------------------------------


async def test_bad_requests_get_400_in_each_apis_error_shape(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    openai_url, anthropic_url = upstream.url + "/v1/chat/completions", upstream.url + "/v1/messages"
    async with http.post(openai_url, data=b"{nope") as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    async with http.post(openai_url, json={"messages": HELLO}) as response:
        assert response.status == 400
        assert "model" in (await response.json())["error"]["message"]
    async with http.post(anthropic_url, data=b"{nope") as response:
        assert response.status == 400
        payload = await response.json()
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "invalid_request_error"
    async with http.post(
        openai_url, json={"model": "m", "messages": HELLO}, headers={"x-mock-chunks": "zero"}
    ) as response:
        assert response.status == 400
        assert "x-mock-chunks" in (await response.json())["error"]["message"]


async def test_api_key_option_requires_the_key(http: aiohttp.ClientSession) -> None:
    async with (
        await start_mock_upstream(MockUpstreamOptions(api_key="sekret")) as server,
        openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad,
        openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0) as good,
        anthropic.AsyncAnthropic(base_url=server.url, api_key="wrong", max_retries=0) as bad_c,
        anthropic.AsyncAnthropic(base_url=server.url, api_key="sekret", max_retries=0) as good_c,
    ):
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="m", messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await bad_c.messages.create(model="c", max_tokens=5, messages=CLAUDE_HELLO)
        assert caught.value.response.json()["error"]["type"] == "authentication_error"

        await good.chat.completions.create(model="m", messages=HELLO)
        await good_c.messages.create(model="c", max_tokens=5, messages=CLAUDE_HELLO)
        body = {"model": "c", "max_tokens": 5, "messages": HELLO}
        url = server.url + "/v1/messages"
        for key, status in (("sekret", 200), ("wrong", 401)):
            async with http.post(url, json=body, headers={"x-api-key": key}) as response:
                assert response.status == status


async def test_azure_deployment_route_names_the_model(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    url = upstream.url + "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21"
    async with http.post(url, json={"messages": HELLO}, headers={"api-key": "k"}) as response:
        assert response.status == 200
        assert (await response.json())["model"] == "my-gpt"


async def test_side_routes_and_stats(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    body: dict[str, object] = {"model": "m", "messages": HELLO, "temperature": 0.2}
    async with http.post(upstream.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
    async with http.get(upstream.url + "/health") as response:
        assert await response.json() == {"status": "ok"}
    async with http.get(upstream.url + "/v1/models") as response:
        assert (await response.json())["data"][0]["id"] == "mock-model"
    async with http.get(upstream.url + "/_mock/stats") as response:
        stats = await response.json()

    assert stats["requests"] == stats["completed"] == 1
    assert stats["last_request_json"] == body
    assert stats["last_headers"]["content-type"] == "application/json"


async def test_stats_sum_the_usage_reported_per_model(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    """Only usage actually written out counts: a JSON answer, an OpenAI stream's usage chunk
    (when asked for), an Anthropic stream's message_delta; not a cut, a malformed body or a
    stream that never got to its usage."""
    url, claude_url = upstream.url + "/v1/chat/completions", upstream.url + "/v1/messages"
    usage_stream: dict[str, object] = {"stream": True, "stream_options": {"include_usage": True}}
    sent: list[tuple[str, dict[str, object], dict[str, str]]] = [
        (url, {"model": "a"}, {}),
        (url, {"model": "a", **usage_stream}, {}),
        (url, {"model": "a", "stream": True}, {}),  # no usage asked for: none reported
        (url, {"model": "a", **usage_stream}, {"x-mock-no-finish": "1"}),  # usage, no finish
        (url, {"model": "a", **usage_stream}, {"x-mock-cut-after": "2"}),
        (url, {"model": "a", **usage_stream}, {"x-mock-error-event-after": "2"}),
        (url, {"model": "a"}, {"x-mock-malformed-at": "1"}),
        (url, {"model": "a"}, {"x-mock-fail-status": "503"}),
        (claude_url, {"model": "c", "max_tokens": 50, "stream": True}, {}),
        (claude_url, {"model": "c", "max_tokens": 50, "stream": True}, {"x-mock-no-finish": "1"}),
        (claude_url, {"model": "c", "max_tokens": 50}, {}),
    ]
    for target, fields, headers in sent:
        body = {"messages": HELLO, **fields}
        cut = "x-mock-cut-after" in headers
        with pytest.raises(aiohttp.ClientPayloadError) if cut else contextlib.nullcontext():
            async with http.post(target, json=body, headers=headers) as response:
                await response.read()
    prompt_tokens, completion_tokens = len(HELLO_TEXT) // 4, 8
    async with http.get(upstream.url + "/_mock/stats") as response:
        usage = (await response.json())["usage_by_model"]
    assert usage == {
        "a": {"answers": 3, "prompt_tokens": 3 * prompt_tokens, "completion_tokens": 24},
        "c": {"answers": 2, "prompt_tokens": 2 * prompt_tokens, "completion_tokens": 16},
    }
    assert upstream.stats.usage_by_model["a"].completion_tokens == 3 * completion_tokens


async def test_a_client_gone_before_the_handler_is_cancelled_logs_no_traceback(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Without handler cancellation (or before it arrives), the mock finds out itself that
    its client left: it counts the disconnection and ends quietly, not with a handler error."""
    app = build_mock_app(MockUpstreamOptions())
    runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    try:
        with pytest.raises(TimeoutError):
            async with http.post(
                url,
                json={"model": "m", "messages": HELLO},
                headers={"x-mock-hang": "1"},
                timeout=aiohttp.ClientTimeout(total=0.2),
            ):
                pass
        stats = app_stats(app)
        with anyio.fail_after(2):
            while stats.disconnected == 0:  # noqa: ASYNC110 - plain counters, polled
                await anyio.sleep(0.01)
        assert (stats.active, stats.completed) == (0, 0)
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.name == "aiohttp.server"]
