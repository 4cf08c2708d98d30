"""Stream recovery (SPEC section 4): a stream that dies mid-way is finished, exactly once."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from resillm.mock_upstream import MockUpstream
from resillm.usage import estimate_tokens
from tests.conftest import run_gateway

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "tell me a story"}]
FAST = {
    "retry": {"initial_backoff": "5ms", "max_backoff": "50ms"},
    # One mid-stream death opens the circuit, so recovery moves on to the next target.
    "circuit_breaker": {"failure_threshold": 1, "open_timeout": "30s"},
    "timeouts": {"first_token": "2s", "stream_idle": "300ms", "request": "10s"},
}


def two_targets(
    upstream: MockUpstream, fault: dict[str, str], *, prefill: bool, **resilience: Any
) -> dict[str, Any]:
    base = {"type": "openai_compatible", "base_url": upstream.url + "/v1", "prefill": prefill}
    return {
        "providers": {"bad": {**base, "headers": fault}, "good": base},
        "models": {
            "chat": {
                "targets": [
                    {"provider": "bad", "model": "m"},
                    {"provider": "good", "model": "m"},
                ]
            }
        },
        "resilience": {**FAST, **resilience},
    }


async def full_answer(upstream: MockUpstream, messages: Any = HELLO) -> tuple[str, Any]:
    async with openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="x") as sdk:
        answer = await sdk.chat.completions.create(model="m", messages=messages)
    return answer.choices[0].message.content or "", answer.usage


async def raw_stream(url: str, **body: Any) -> list[str]:
    """Every SSE data payload the client received, in order."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/chat/completions",
            json={"model": "chat", "messages": HELLO, "stream": True, **body},
        ) as response,
    ):
        assert response.status == 200
        text = (await response.read()).decode()
    return [event[6:] for event in text.split("\n\n") if event.startswith("data: ")]


async def sdk_stream(url: str, **kwargs: Any) -> tuple[str, list[Any]]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="chat",
            messages=HELLO,
            stream=True,
            **kwargs,  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize(
    "fault", [{"x-mock-cut-after": "3"}, {"x-mock-stall-after": "3"}], ids=["cut", "stall"]
)
async def test_continuation_finishes_the_answer_exactly_once(
    upstream: MockUpstream, fault: dict[str, str]
) -> None:
    expected, _ = await full_answer(upstream)
    async with run_gateway(two_targets(upstream, fault, prefill=True)) as gw:
        events = await raw_stream(gw.url)
        # The continuation carried the delivered text as a trailing assistant message.
        sent = upstream.stats.last_request_json
    async with run_gateway(two_targets(upstream, fault, prefill=True)) as gw:
        text, chunks = await sdk_stream(gw.url)
    assert text == expected
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    # One stream: one id, one role chunk, one finish.
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert sent["messages"][-1]["role"] == "assistant"
    assert sent["messages"][-1]["content"]
    assert expected.startswith(sent["messages"][-1]["content"])


async def test_restart_when_no_target_takes_prefill(upstream: MockUpstream) -> None:
    expected, _ = await full_answer(upstream)
    config = two_targets(upstream, {"x-mock-cut-after": "4"}, prefill=False)
    async with run_gateway(config) as gw:
        text, chunks = await sdk_stream(gw.url)
    assert text == expected
    assert len({c.id for c in chunks}) == 1
    # The restart resent the original request: no assistant prefill.
    assert upstream.stats.last_request_json["messages"] == HELLO


async def test_restart_that_diverges_ends_with_an_error_event(upstream: MockUpstream) -> None:
    config = two_targets(upstream, {"x-mock-cut-after": "3"}, prefill=False)
    # The fallback is a different model altogether: its answer cannot reproduce the text.
    config["providers"]["good"] = {"type": "mock", "prefill": False}
    async with run_gateway(config) as gw:
        events = await raw_stream(gw.url)
    assert "[DONE]" not in events
    assert '"error"' in events[-1] and "diverged" in events[-1]


async def test_tool_call_in_flight_is_not_recovered(upstream: MockUpstream) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    config = two_targets(upstream, {"x-mock-cut-after": "1"}, prefill=True)
    async with run_gateway(config) as gw:
        events = await raw_stream(
            gw.url, tools=tools, messages=[{"role": "user", "content": "weather in Paris?"}]
        )
    assert any('"tool_calls"' in e for e in events)
    assert "[DONE]" not in events
    assert '"error"' in events[-1]


async def test_recovery_off_ends_with_an_error_event(upstream: MockUpstream) -> None:
    config = two_targets(upstream, {"x-mock-cut-after": "3"}, prefill=True, stream_recovery=False)
    async with run_gateway(config) as gw:
        events = await raw_stream(gw.url)
    assert "[DONE]" not in events
    assert '"error"' in events[-1]
    assert sum('"content"' in e for e in events[:-1]) >= 3


async def test_usage_of_a_recovered_stream_sums_every_upstream_call(
    upstream: MockUpstream,
) -> None:
    expected, _ = await full_answer(upstream)
    config = two_targets(upstream, {"x-mock-cut-after": "3"}, prefill=True)
    async with run_gateway(config) as gw:
        text, chunks = await sdk_stream(gw.url, stream_options={"include_usage": True})
    assert text == expected
    usage = chunks[-1].usage
    assert usage is not None
    # The continuation reported its usage; the cut call never did and is estimated.
    delivered = upstream.stats.last_request_json["messages"][-1]["content"]
    _, continuation = await full_answer(
        upstream, messages=[*HELLO, {"role": "assistant", "content": delivered}]
    )
    cut_prompt = estimate_tokens(len(HELLO[0]["content"]))
    cut_completion = estimate_tokens(len(delivered))
    assert usage.prompt_tokens == continuation.prompt_tokens + cut_prompt
    assert usage.completion_tokens == continuation.completion_tokens + cut_completion
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_a_target_refusing_the_prefill_leads_to_a_restart_the_client_never_sees(
    upstream: MockUpstream,
) -> None:
    expected, _ = await full_answer(upstream)
    # Both claim prefill; the one asked to continue refuses it with a 400.
    config = two_targets(upstream, {"x-mock-cut-after": "3"}, prefill=True)
    config["providers"]["good"]["headers"] = {"x-mock-reject-prefill": "1"}
    async with run_gateway(config) as gw:
        text, chunks = await sdk_stream(gw.url)
        events = await raw_stream(gw.url)
    assert upstream.stats.failed == 1  # the continuation was refused, once
    assert text == expected  # the restart path finished the answer
    assert len({c.id for c in chunks}) == 1
    assert not any("prefill" in e for e in events)  # the refusal never reached the client
    assert events[-1] == "[DONE]"


async def test_usage_of_a_continuation_that_failed_before_its_first_token_is_counted(
    upstream: MockUpstream,
) -> None:
    """A stream without a finish reason still reports its usage; so does the continuation
    sent back to the same target, which has nothing left to say and fails before any token.
    That call cost the upstream's prompt too: it is in the usage, as every other call."""
    expected, answer_usage = await full_answer(upstream)
    config = two_targets(
        upstream,
        {"x-mock-no-finish": "1"},
        prefill=True,
        circuit_breaker={"failure_threshold": 5},  # the continuation goes to it again
    )
    async with run_gateway(config) as gw:
        text, chunks = await sdk_stream(gw.url, stream_options={"include_usage": True})
    assert text == expected
    reported = upstream.stats.usage_by_model["m"]  # full_answer's call too
    # The stream, the continuation that failed, the one that ended.
    assert reported.answers == 1 + 3
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        reported.prompt_tokens - answer_usage.prompt_tokens,
        reported.completion_tokens - answer_usage.completion_tokens,
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_a_continuation_asks_only_for_the_tokens_still_allowed(
    upstream: MockUpstream, field: str
) -> None:
    async with run_gateway(two_targets(upstream, {"x-mock-cut-after": "3"}, prefill=True)) as gw:
        text, chunks = await sdk_stream(gw.url, **{field: 6})
        sent = upstream.stats.last_request_json
    prefill = sent["messages"][-1]["content"]
    assert sent["messages"][-1]["role"] == "assistant"
    # Three words went by (about 5 tokens by the gateway's 4-characters estimate): the
    # continuation may add only what is left of the 6, never 6 more.
    assert sent[field] == max(1, 6 - estimate_tokens(len(prefill)))
    assert sent[field] < 6
    assert text.startswith(prefill)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
