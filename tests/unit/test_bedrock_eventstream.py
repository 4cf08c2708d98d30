"""The fake's event-stream frames are real: botocore's parser decodes them, CRCs and all,
and the Converse stream translator turns them into OpenAI chunks."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer, EventStreamMessage

from providers.bedrock.stream import StreamTranslator
from resillm.schema import ChatCompletionChunk
from tests.fakes.bedrock_server import (
    Scenario,
    ToolUse,
    bedrock_runtime_model,
    encode_frame,
    event_frame,
    exception_frame,
    stream_frames,
)

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"


def decode_all(data: bytes, step: int | None = None) -> list[EventStreamMessage]:
    buffer = EventStreamBuffer()
    messages: list[EventStreamMessage] = []
    step = step or len(data)
    for i in range(0, len(data), step):
        buffer.add_data(data[i : i + step])
        messages.extend(buffer)
    return messages


def test_encoded_frame_decodes_with_botocore() -> None:
    frame = encode_frame({":event-type": "messageStart", ":message-type": "event"}, b'{"a":1}')
    [message] = decode_all(frame)
    assert message.headers == {":event-type": "messageStart", ":message-type": "event"}
    assert message.payload == b'{"a":1}'
    assert message.prelude.total_length == len(frame)


def test_frames_fed_one_byte_at_a_time_decode_the_same() -> None:
    frames = stream_frames(Scenario(tool_use=ToolUse("f", {"x": 1})))
    data = b"".join(frames)
    whole = decode_all(data)
    trickled = decode_all(data, step=1)
    assert len(whole) == len(frames) == len(trickled)
    assert [m.payload for m in whole] == [m.payload for m in trickled]


def test_a_corrupted_frame_fails_its_checksum() -> None:
    frame = bytearray(event_frame("messageStart", {"role": "assistant"}))
    frame[-6] ^= 0xFF  # a payload byte: the message CRC no longer matches
    with pytest.raises(ChecksumMismatch):
        decode_all(bytes(frame))


def test_exception_frame_headers() -> None:
    [message] = decode_all(exception_frame("throttlingException", "slow down"))
    assert message.headers[":message-type"] == "exception"
    assert message.headers[":exception-type"] == "throttlingException"
    assert json.loads(message.payload) == {"message": "slow down"}


def test_fake_event_payloads_match_botocores_event_shapes() -> None:
    """Each event the fake sends is a member of botocore's ConverseStreamOutput."""
    output = bedrock_runtime_model().operation_model("ConverseStream").output_shape
    stream_shape = output.members["stream"]
    frames = stream_frames(Scenario(tool_use=ToolUse("f", {"x": 1})))
    for message in decode_all(b"".join(frames)):
        event_type = message.headers[":event-type"]
        shape = stream_shape.members[event_type]
        payload = json.loads(message.payload)
        payload.pop("p")  # Bedrock's padding, not part of the model
        assert set(payload) <= set(shape.members), event_type
        assert set(shape.required_members) <= set(payload), event_type


# -- translation ----------------------------------------------------------------------------


def translate(
    frames: list[bytes], **options: Any
) -> tuple[StreamTranslator, list[tuple[dict[str, Any], bool]]]:
    translator = StreamTranslator(MODEL, request_id="req-1", **options)
    chunks = []
    for message in decode_all(b"".join(frames)):
        chunk = translator.on_event(message.headers[":event-type"], message.payload)
        if chunk is not None:
            # Every chunk is a valid OpenAI chunk.
            msgspec.json.decode(chunk.data, type=ChatCompletionChunk)
            chunks.append((json.loads(chunk.data), chunk.forward))
    return translator, chunks


def test_text_stream_becomes_openai_chunks() -> None:
    translator, chunks = translate(stream_frames(Scenario(text="Hello there, world")))
    bodies = [body for body, _ in chunks]
    # The role rides on the first token; messageStart alone sends nothing.
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    text = "".join(b["choices"][0]["delta"].get("content", "") for b in bodies if b["choices"])
    assert text == "Hello there, world"
    assert bodies[-2]["choices"][0]["finish_reason"] == "stop"
    assert bodies[-1]["choices"] == []
    assert bodies[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert {b["id"] for b in bodies} == {"chatcmpl-req-1"}
    assert {b["model"] for b in bodies} == {MODEL}
    assert translator.complete and translator.finish_reason == "stop"


def test_usage_chunk_is_forwarded_only_when_the_client_asked() -> None:
    _, hidden = translate(stream_frames(Scenario()))
    _, shown = translate(stream_frames(Scenario()), include_usage=True)
    assert hidden[-1][1] is False and shown[-1][1] is True
    assert all(forward for _, forward in hidden[:-1])


def test_tool_calls_are_numbered_from_zero_after_a_text_block() -> None:
    frames = [
        event_frame("messageStart", {"role": "assistant"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Let me"}}),
        event_frame("contentBlockStop", {"contentBlockIndex": 0}),
    ]
    for block, (call_id, name, args) in enumerate(
        [("tooluse_a", "weather", '{"city": "Paris"}'), ("tooluse_b", "time", '{"tz": "CET"}')],
        start=1,
    ):
        start = {"toolUse": {"toolUseId": call_id, "name": name}}
        frames.append(
            event_frame("contentBlockStart", {"contentBlockIndex": block, "start": start})
        )
        for piece in (args[:5], args[5:]):
            delta = {"toolUse": {"input": piece}}
            frames.append(
                event_frame("contentBlockDelta", {"contentBlockIndex": block, "delta": delta})
            )
        frames.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
    frames.append(event_frame("messageStop", {"stopReason": "tool_use"}))
    _, chunks = translate(frames)
    calls: dict[int, dict[str, str]] = {}
    for body, _ in chunks:
        for call in body["choices"][0]["delta"].get("tool_calls", []) if body["choices"] else []:
            entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.get("id", "")
            entry["name"] += call.get("function", {}).get("name") or ""
            entry["arguments"] += call.get("function", {}).get("arguments") or ""
    assert calls == {
        0: {"id": "tooluse_a", "name": "weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "tooluse_b", "name": "time", "arguments": '{"tz": "CET"}'},
    }
    assert chunks[-1][0]["choices"][0]["finish_reason"] == "tool_calls"


def test_chunks_say_what_they_carry_for_stream_recovery() -> None:
    translator = StreamTranslator(MODEL)
    text = translator.on_event("contentBlockDelta", b'{"delta": {"text": "Hi"}}')
    start = b'{"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "t", "name": "f"}}}'
    tool = translator.on_event("contentBlockStart", start)
    assert text is not None and text.text == "Hi" and not text.tool_call
    assert tool is not None and tool.tool_call and tool.text == ""
    # A content delta before any messageStart still tells the client the role.
    assert json.loads(text.data)["choices"][0]["delta"]["role"] == "assistant"


def test_leading_whitespace_is_dropped_after_a_trimmed_prefill() -> None:
    frames = [
        event_frame("messageStart", {"role": "assistant"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "  "}}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " world"}}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " again"}}),
        event_frame("messageStop", {"stopReason": "end_turn"}),
    ]
    _, chunks = translate(frames, strip_leading_whitespace=True)
    texts = [b["choices"][0]["delta"].get("content") for b, _ in chunks]
    assert texts == ["world", " again", None]


def test_an_empty_answer_still_names_the_role() -> None:
    frames = [
        event_frame("messageStart", {"role": "assistant"}),
        event_frame("messageStop", {"stopReason": "end_turn"}),
    ]
    _, chunks = translate(frames)
    [(body, _)] = chunks
    assert body["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": "stop",
    }


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_stop_reasons_become_finish_reasons(stop_reason: str, finish: str) -> None:
    translator, chunks = translate([event_frame("messageStop", {"stopReason": stop_reason})])
    assert chunks[-1][0]["choices"][0]["finish_reason"] == finish
    assert translator.finish_reason == finish


def test_cached_prompt_tokens_count_in_the_prompt() -> None:
    _, chunks = translate(stream_frames(Scenario(cache_read_tokens=100)), include_usage=True)
    assert chunks[-1][0]["usage"] == {
        "prompt_tokens": 111,
        "completion_tokens": 7,
        "total_tokens": 118,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
