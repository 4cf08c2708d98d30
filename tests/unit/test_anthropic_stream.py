"""Anthropic stream events -> OpenAI chunks, from recorded transcripts split anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic.types
import openai.types.chat
import pydantic
import pytest
from anthropic.types.shared import ErrorResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState

from providers.anthropic.stream import StreamTranslator
from providers.base import Chunk
from providers.sse import SSEDecoder
from resillm.errors import UpstreamProtocolError, UpstreamStatusError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "anthropic"
_EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)


def transcript(name: str) -> bytes:
    """A recorded stream; every event is checked against the official SDK's types."""
    raw = (FIXTURES / name).read_bytes()
    decoder = SSEDecoder()
    for event in [*decoder.feed(raw), *decoder.flush()]:
        if event.event == "error":
            ErrorResponse.model_validate_json(event.data)
        elif event.event != "ping":
            _EVENT.validate_json(event.data)
    return raw


def translator(include_usage: bool = False, suffix: str = "") -> StreamTranslator:
    return StreamTranslator(
        provider="claude",
        model="target",
        include_usage=include_usage,
        prefill_suffix=suffix,
        created=1700000000,
    )


def run(
    raw: bytes, pieces: list[int] | None = None, *, include_usage: bool = False
) -> tuple[list[Chunk], StreamTranslator]:
    """Feed ``raw`` in pieces of the given sizes (the rest in one), as reads would."""
    tr = translator(include_usage)
    decoder = SSEDecoder()
    chunks: list[Chunk] = []
    position = 0
    for size in [*(pieces or []), len(raw)]:
        for event in decoder.feed(raw[position : position + size]):
            chunks.extend(tr.feed(event))
        position += size
    for event in decoder.flush():
        chunks.extend(tr.feed(event))
    return chunks, tr


def bodies(chunks: list[Chunk], *, forwarded_only: bool = True) -> list[dict[str, Any]]:
    return [json.loads(c.data) for c in chunks if c.forward or not forwarded_only]


def content(chunks: list[Chunk]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for body in bodies(chunks)
        for choice in body["choices"]
    )


def accumulate(chunks: list[Chunk]) -> openai.types.chat.ParsedChatCompletion[None]:
    """What the official openai SDK's stream helper makes of the forwarded chunks."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        if chunk.forward:
            state.handle_chunk(
                openai.types.chat.ChatCompletionChunk.model_validate_json(chunk.data)
            )
    return state.get_final_completion()


TEXT = "Hello, wörld! \u2764\ufe0f"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_a_text_stream_translates_the_same_however_the_bytes_are_split(
    pieces: list[int],
) -> None:
    raw = transcript("stream_text.sse")
    chunks, tr = run(raw, pieces)
    assert content(chunks) == TEXT
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert tr.stopped
    assert tr.malformed == 0


def test_a_text_stream_is_openai_shaped_with_one_id_created_and_model() -> None:
    chunks, _ = run(transcript("stream_text.sse"))
    forwarded = bodies(chunks)
    for body in forwarded:
        openai.types.chat.ChatCompletionChunk.model_validate(body)
    assert {(b["id"], b["created"], b["model"]) for b in forwarded} == {
        (
            "chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            1700000000,
            "claude-sonnet-4-5-20250929",
        )
    }
    assert {b["object"] for b in forwarded} == {"chat.completion.chunk"}
    assert forwarded[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert [b["choices"][0]["delta"].get("content") for b in forwarded[1:-1]] == [
        "Hello",
        ", wörld",
        "! \u2764\ufe0f",
    ]
    assert forwarded[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    # What the gateway reads of each chunk, for stream recovery and the logs.
    assert "".join(c.text for c in chunks) == TEXT
    assert all(c.model == "claude-sonnet-4-5-20250929" for c in chunks)


def test_stream_usage_is_made_always_but_forwarded_only_when_asked() -> None:
    for include_usage in (False, True):
        chunks, _ = run(transcript("stream_text.sse"), include_usage=include_usage)
        usage_chunks = [c for c in chunks if c.usage is not None]
        assert len(usage_chunks) == 1
        [usage_chunk] = usage_chunks
        assert usage_chunk.forward is include_usage
        body = json.loads(usage_chunk.data)
        assert body["choices"] == []
        # input tokens from message_start (cache reads included), output from message_delta.
        assert body["usage"] == {
            "prompt_tokens": 25 + 512,
            "completion_tokens": 15,
            "total_tokens": 25 + 512 + 15,
            "prompt_tokens_details": {"cached_tokens": 512},
        }
        assert chunks[-1] is usage_chunk  # after the finish chunk, as OpenAI sends it


def test_message_delta_usage_is_cumulative_and_wins_over_message_start() -> None:
    tr = translator(include_usage=True)
    feed(tr, "message_start", message_start(usage={"input_tokens": 40, "output_tokens": 1}))
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    [_, usage_chunk] = feed(
        tr, "message_delta", {**delta, "usage": {"output_tokens": 30, "input_tokens": 41}}
    )
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (41, 30)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=80))
def test_streamed_tool_calls_accumulate_in_the_openai_sdk(pieces: list[int]) -> None:
    chunks, _ = run(transcript("stream_tool_use.sse"), pieces)
    final = accumulate(chunks)
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Okay, let me check both cities."  # thinking skipped
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name) for c in calls] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
        ("toolu_01B8q7e6q5w4e3r2t1y0u9", "get_time"),
    ]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"location": "San Francisco, CA", "unit": "celsius"},
        {"timezone": "Europe/Paris"},
    ]


def test_tool_call_deltas_use_the_tool_call_index_with_id_and_name_first() -> None:
    chunks, _ = run(transcript("stream_tool_use.sse"))
    deltas = [
        call
        for body in bodies(chunks)
        for choice in body["choices"]
        for call in choice["delta"].get("tool_calls") or ()
    ]
    # Content blocks 2 and 3 (after a thinking and a text block) are tool calls 0 and 1.
    assert deltas[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert [d["index"] for d in deltas] == [0, 0, 0, 0, 1, 1, 1]
    assert all("id" not in d and "name" not in d["function"] for d in deltas[1:4] + deltas[5:])
    for chunk in chunks:
        choices = json.loads(chunk.data)["choices"]
        assert chunk.tool_call is bool(choices and "tool_calls" in choices[0]["delta"])


def test_an_error_event_mid_stream_raises_a_retryable_529_after_the_text_before_it() -> None:
    raw = transcript("stream_overloaded.sse")
    tr = translator()
    decoder = SSEDecoder()
    delivered: list[Chunk] = []
    with pytest.raises(UpstreamStatusError) as caught:
        for event in decoder.feed(raw):
            delivered.extend(tr.feed(event))
    assert content(delivered) == "The first"
    error = caught.value
    assert (error.status, error.retryable, error.upstream_type) == (529, True, "overloaded_error")
    assert error.message == "Overloaded"


def test_an_error_event_before_any_chunk_raises_at_once() -> None:
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    with pytest.raises(UpstreamStatusError) as caught:
        feed(translator(), "error", error)
    assert (caught.value.status, caught.value.retryable) == (429, True)


def test_a_stream_ending_without_a_stop_reason_is_a_protocol_error() -> None:
    raw = transcript("stream_text.sse")
    cut = raw[: raw.index(b"event: message_delta")]
    chunks, tr = run(cut)
    assert content(chunks) == TEXT
    with pytest.raises(UpstreamProtocolError, match="without a stop reason"):
        tr.check_complete()


def test_a_message_stop_without_message_delta_is_not_complete() -> None:
    tr = translator()
    feed(tr, "message_start", message_start())
    feed(tr, "message_stop", {"type": "message_stop"})
    assert tr.stopped
    with pytest.raises(UpstreamProtocolError):
        tr.check_complete()


def test_a_stream_that_ends_after_its_stop_reason_is_complete_without_message_stop() -> None:
    raw = transcript("stream_text.sse")
    chunks, tr = run(raw[: raw.index(b"event: message_stop")])
    tr.check_complete()
    assert not tr.stopped
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_a_malformed_event_is_skipped_counted_and_the_stream_goes_on() -> None:
    raw = transcript("stream_text.sse").replace(
        b"event: ping\n", b"event: content_block_delta\ndata: {not json\n\nevent: ping\n"
    )
    chunks, tr = run(raw)
    assert tr.malformed == 1
    assert content(chunks) == TEXT


def test_content_before_message_start_is_a_protocol_error() -> None:
    tr = translator()
    start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    with pytest.raises(UpstreamProtocolError, match="before message_start"):
        feed(tr, "content_block_start", start)


def test_pings_and_unknown_events_add_nothing() -> None:
    tr = translator()
    feed(tr, "message_start", message_start())
    assert feed(tr, "ping", {"type": "ping"}) == []
    assert feed(tr, "future_event", {"type": "future_event", "anything": [1]}) == []
    citation = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "citations_delta", "citation": {"type": "char_location"}},
    }
    assert feed(tr, "content_block_delta", citation) == []


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_the_finish_chunk_maps_the_stop_reason(stop_reason: str, finish: str) -> None:
    tr = translator()
    feed(tr, "message_start", message_start())
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason},
        "usage": {"output_tokens": 3},
    }
    finish_chunk = feed(tr, "message_delta", delta)[0]
    assert finish_chunk.finish_reason == finish
    assert json.loads(finish_chunk.data)["choices"][0]["finish_reason"] == finish


def test_a_continued_prefill_drops_the_whitespace_cut_from_it() -> None:
    tr = translator(suffix=" ")
    feed(tr, "message_start", message_start())
    start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    feed(tr, "content_block_start", start)
    texts = [
        chunk.text
        for piece in (" three", ", four")
        for chunk in feed(tr, "content_block_delta", text_delta(piece))
    ]
    assert texts == ["three", ", four"]


# -- helpers -------------------------------------------------------------------------------


def message_start(usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_x",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-haiku-4-5",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage or {"input_tokens": 5, "output_tokens": 1},
        },
    }


def text_delta(text: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


def feed(tr: StreamTranslator, name: str, data: dict[str, Any]) -> list[Chunk]:
    decoder = SSEDecoder()
    payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    return [chunk for event in decoder.feed(payload) for chunk in tr.feed(event)]
