"""Faults in time and in streams, through the real gateway (SPEC 4 and 5).

Silence: a target that sends nothing until `first_token` is left for the next one, and no
wait outlives the request's deadline. After the start: once the first chunk reached the
client, a failure can no longer be retried or sent to another target (stream recovery is
off here), so the client must see the stream end with one `data: {"error": ...}` event,
never with `[DONE]`, and the text before it must be a true prefix of the answer. A
malformed event is skipped, and an upstream that ends after its finish reason without
`[DONE]` is complete. A client that leaves cancels its upstream request. Helpers are
shared with `test_faults.py`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import openai
import pytest

from resillm.mock_upstream import MockUpstream
from tests.integration.test_faults import (
    FULL_ANSWER,
    HELLO,
    Raw,
    alias,
    alone,
    ask,
    assert_all_failed,
    bad_then_good,
    gateway_config,
    post,
    provider,
    serving,
    settled,
)

pytestmark = pytest.mark.anyio


# --- silence before the first byte --------------------------------------------------------


@pytest.mark.parametrize("fault", ["hang", "slow-first-byte"])
async def test_a_silent_target_is_left_after_first_token_for_the_next(
    upstream: MockUpstream, fault: str
) -> None:
    async with serving(bad_then_good(upstream, {"fault": fault}), upstream) as gw:
        started = time.monotonic()
        reply = await ask(gw.url, stream=True)
        took = time.monotonic() - started

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 2)
    assert upstream.stats.by_model == {"bad-model": 1, "good-model": 1}  # tried only once
    assert 0.3 <= took < 0.9  # one first_token (300 ms), not the mock's 1 s nor a retry


async def test_a_silent_target_alone_is_retried_then_the_stream_gets_504(
    upstream: MockUpstream,
) -> None:
    async with serving(alone(upstream, {"fault": "hang"}), upstream) as gw:
        raw = await post(gw.url, stream=True)

    assert_all_failed(raw, 504, [("bad", "bad-model", None)] * 3)
    assert raw.error["attempts"][0]["message"]
    assert 0.9 <= raw.seconds < 2.0  # three first_token waits, well within `request`


@pytest.mark.parametrize("fault", ["hang", "slow-first-byte"])
async def test_a_silent_target_without_stream_is_left_at_its_provider_timeout(
    upstream: MockUpstream, fault: str
) -> None:
    # Without a stream, the provider's `timeout` bounds an attempt (first_token is for
    # streams, as the README says).
    config = bad_then_good(upstream, {"fault": fault}, timeout="300ms")
    async with serving(config, upstream) as gw:
        started = time.monotonic()
        reply = await ask(gw.url, stream=False)
        took = time.monotonic() - started

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 2)
    assert upstream.stats.by_model == {"bad-model": 1, "good-model": 1}
    assert took < 0.9


async def test_a_silent_target_alone_without_stream_gets_504_at_the_request_deadline(
    upstream: MockUpstream,
) -> None:
    async with serving(
        alone(upstream, {"fault": "hang"}, timeouts={"request": "500ms"}), upstream
    ) as gw:
        raw = await post(gw.url, stream=False)

    assert_all_failed(raw, 504, [("bad", "bad-model", None)])
    assert 0.5 <= raw.seconds < 1.2


async def test_no_retry_outlives_the_request_deadline(upstream: MockUpstream) -> None:
    config = alone(
        upstream,
        {"fail_status": 503, "retry_after": 0.09},  # each wait within max_backoff (100 ms)
        retry={"max_attempts": 20},
        timeouts={"request": "250ms"},
    )
    async with serving(config, upstream) as gw:
        raw = await post(gw.url, stream=False)

    assert raw.status == 502
    assert 2 <= len(raw.error["attempts"]) <= 3  # 20 allowed, but the deadline came first
    assert raw.seconds < 0.4


async def test_silent_targets_share_one_request_deadline(upstream: MockUpstream) -> None:
    config = gateway_config(
        {
            "one": provider(upstream, {"fault": "hang"}),
            "two": provider(upstream, {"fault": "hang"}),
        },
        {"chat": alias(("one", "m1"), ("two", "m2"))},
        timeouts={"request": "500ms"},
    )
    async with serving(config, upstream) as gw:
        raw = await post(gw.url, stream=True)

    # 300 ms on the first target, what is left of 500 ms on the second, then the end.
    assert_all_failed(raw, 504, [("one", "m1", None), ("two", "m2", None)])
    assert 0.5 <= raw.seconds < 0.9


# --- after the start ----------------------------------------------------------------------

WORDS = FULL_ANSWER.split(" ")
# A fault after the start, and how many words of the answer reach the client before it.
DIES_MID_STREAM = pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("cut-3", 3),  # the connection drops
        ("stall-2", 2),  # silence past stream_idle
        ("error-event-2", 2),  # the upstream says it failed
        ("no-finish", 8),  # a clean end, but no finish reason
        ("no-finish,omit-done", 8),  # neither a finish reason nor [DONE]
    ],
)


def decoded(raw: Raw) -> list[dict[str, Any]]:
    """The stream's JSON events; asserts there is no `[DONE]` among them."""
    assert raw.status == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in raw.events
    events = [msgspec.json.decode(event) for event in raw.events]
    assert all(isinstance(event, dict) for event in events)
    return events


def content_of(events: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        for choice in event.get("choices", ())
    )


@DIES_MID_STREAM
async def test_a_stream_that_dies_after_content_ends_with_one_error_event_and_no_done(
    upstream: MockUpstream, fault: str, words: int
) -> None:
    async with serving(bad_then_good(upstream, {"fault": fault}), upstream) as gw:
        raw = await post(gw.url, stream=True)

    events = decoded(raw)
    errors = [event for event in events if "error" in event]
    assert len(errors) == 1 and errors[0] is events[-1]  # one error event, and it is the end
    error = errors[0]["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    chunks = events[:-1]
    assert content_of(chunks) == " ".join(WORDS[:words])  # a true prefix, nothing made up
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks if c["choices"])
    assert raw.headers["x-resillm-provider"] == "bad"
    # Too late for the next target: the client already has part of the answer.
    assert upstream.stats.by_model == {"bad-model": 1}
    if fault.startswith("stall"):
        assert raw.seconds >= 0.3  # stream_idle


@DIES_MID_STREAM
async def test_the_sdk_raises_when_a_stream_dies_after_content(
    upstream: MockUpstream, fault: str, words: int
) -> None:
    async with (
        serving(bad_then_good(upstream, {"fault": fault}), upstream) as gw,
        openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True)
        received: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                received.extend(choice.delta.content or "" for choice in chunk.choices)

    assert not isinstance(caught.value, openai.APIConnectionError)  # an answer, not a drop
    assert caught.value.message
    assert "".join(received) == " ".join(WORDS[:words])


@pytest.mark.parametrize("position", [0, 2, 8])
async def test_a_malformed_event_is_skipped_and_the_answer_is_complete(
    upstream: MockUpstream, position: int
) -> None:
    async with serving(bad_then_good(upstream, {"malformed_at": position}), upstream) as gw:
        raw = await post(gw.url, stream=True)
        reply = await ask(gw.url, stream=True)

    assert raw.status == 200 and raw.events[-1] == "[DONE]"
    assert raw.events.count("[DONE]") == 1
    events = [msgspec.json.decode(event) for event in raw.events[:-1]]  # all valid JSON
    assert not any("error" in event for event in events)
    assert content_of(events) == FULL_ANSWER
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "bad", 1)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_without_done_after_its_finish_is_complete_at_once(
    upstream: MockUpstream, include_usage: bool
) -> None:
    config = bad_then_good(upstream, {"omit_done": 1})
    config["resilience"]["timeouts"]["stream_idle"] = "2s"  # what a wait would cost
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with serving(config, upstream) as gw:
        raw = await post(gw.url, stream=True, **extra)
        reply = await ask(gw.url, stream=True, **extra)

    assert raw.events[-1] == "[DONE]" and raw.events.count("[DONE]") == 1
    events = [msgspec.json.decode(event) for event in raw.events[:-1]]
    assert content_of(events) == FULL_ANSWER
    assert not any("error" in event for event in events)
    usage = [event["usage"] for event in events if event.get("usage")]
    if include_usage:
        assert len(usage) == 1 and usage[0]["completion_tokens"] == 8
        assert events[-1]["choices"] == []  # the usage chunk comes last, as OpenAI sends it
    else:
        assert usage == []
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert raw.seconds < 1.0  # [DONE] at once, not after stream_idle (2 s)
    assert (reply.text, reply.finish_reason, reply.provider) == (FULL_ANSWER, "stop", "bad")
    assert upstream.stats.by_model == {"bad-model": 2}


@pytest.mark.parametrize("fault", ["error-event-2", "no-finish", "omit-done"])
async def test_stream_only_faults_leave_a_json_answer_alone(
    upstream: MockUpstream, fault: str
) -> None:
    async with serving(bad_then_good(upstream, {"fault": fault}), upstream) as gw:
        reply = await ask(gw.url, stream=False)

    assert (reply.text, reply.finish_reason, reply.provider, reply.attempts) == (
        FULL_ANSWER,
        "stop",
        "bad",
        1,
    )


@pytest.mark.parametrize("fault", ["cut-3", "stall-2"])
async def test_mid_stream_faults_hit_a_json_answer_before_any_byte_and_fall_back(
    upstream: MockUpstream, fault: str
) -> None:
    # Without a stream the mock cuts (or stalls) before the status line: still retryable.
    async with serving(bad_then_good(upstream, {"fault": fault}, timeout="200ms"), upstream) as gw:
        reply = await ask(gw.url, stream=False)

    assert (reply.text, reply.provider) == (FULL_ANSWER, "good")
    # A cut is retried on the same target; a silent one is left at once.
    bad_tries = 3 if fault.startswith("cut") else 1
    assert reply.attempts == bad_tries + 1
    assert upstream.stats.by_model == {"bad-model": bad_tries, "good-model": 1}


async def test_a_client_leaving_mid_stream_cancels_the_upstream_request(
    upstream: MockUpstream,
) -> None:
    slow = {"chunk_delay": 0.1, "chunks": 30}
    async with (
        serving(bad_then_good(upstream, slow), upstream) as gw,
        openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        assert upstream.stats.active == 1
        started = time.monotonic()
        await stream.close()
        await settled(upstream, within_s=1.0)

    assert time.monotonic() - started < 1.0  # well before the 3 s the answer would take
    assert (upstream.stats.disconnected, upstream.stats.completed) == (1, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_client_leaving_before_the_first_token_cancels_the_upstream_request(
    upstream: MockUpstream, stream: bool
) -> None:
    config = bad_then_good(upstream, {"fault": "hang"})
    config["resilience"]["timeouts"] = {"first_token": "5s", "request": "10s"}
    async with (
        serving(config, upstream) as gw,
        openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=0.3
        ) as client,
    ):
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="chat", messages=HELLO, stream=stream)
        started = time.monotonic()
        await settled(upstream, within_s=1.0)

    assert time.monotonic() - started < 1.0  # not the 5 s first_token, nor the next target
    assert upstream.stats.by_model == {"bad-model": 1}
    assert upstream.stats.disconnected == 1


async def test_a_target_whose_streams_keep_dying_mid_way_opens_its_circuit(
    upstream: MockUpstream,
) -> None:
    # A stream counts as a success only once it ends well: were the first chunk enough, the
    # failure after it would never be the second in a row.
    config = bad_then_good(upstream, {"fault": "cut-3"})
    config["resilience"]["circuit_breaker"] = {"failure_threshold": 2, "open_timeout": "30s"}
    async with serving(config, upstream) as gw:
        broken = [await post(gw.url, stream=True) for _ in range(2)]
        after = await post(gw.url, stream=True)

    assert all("error" in msgspec.json.decode(raw.events[-1]) for raw in broken)
    # Two failures in a row open `bad`'s circuit: the next stream goes to `good` at once.
    assert after.headers["x-resillm-provider"] == "good"
    assert after.events[-1] == "[DONE]"
    assert upstream.stats.by_model == {"bad-model": 2, "good-model": 1}


@pytest.mark.parametrize("fault", ["cut-0", "error-event-0", "stall-0"])
async def test_a_stream_that_dies_after_its_role_chunk_still_falls_back(
    upstream: MockUpstream, fault: str
) -> None:
    # The role chunk carries no token: the client has seen nothing, so the failure is an
    # ordinary failed attempt and the next target answers the whole stream.
    async with serving(bad_then_good(upstream, {"fault": fault}), upstream) as gw:
        reply = await ask(gw.url, stream=True)

    assert (reply.text, reply.finish_reason, reply.provider) == (FULL_ANSWER, "stop", "good")
    assert upstream.stats.by_model["bad-model"] >= 1
    await settled(upstream)
