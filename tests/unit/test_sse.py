"""The incremental SSE decoder and the encoder: events come out whole however bytes arrive."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.sse import DONE_EVENT, SSEDecoder, SSEEvent, encode_data

OPENAI_STREAM = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"content":"lo \xc3\xa9t\xc3\xa9"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)

ANTHROPIC_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_1","model":"claude"}}\n\n'
    b"event: ping\n"
    b'data: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)


def decode_whole(stream: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return decoder.feed(stream) + decoder.flush()


def decode_pieces(pieces: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    return events + decoder.flush()


def test_openai_stream_fed_whole() -> None:
    events = decode_whole(OPENAI_STREAM)
    assert [event.event for event in events] == ["message"] * 5
    assert events[-1].data == b"[DONE]"
    contents = [
        json.loads(event.data)["choices"][0]["delta"].get("content") for event in events[:-1]
    ]
    assert contents == ["", "Hel", "lo été", None]
    assert json.loads(events[3].data)["choices"][0]["finish_reason"] == "stop"


def test_openai_stream_one_byte_at_a_time_gives_same_events() -> None:
    pieces = [OPENAI_STREAM[i : i + 1] for i in range(len(OPENAI_STREAM))]
    assert decode_pieces(pieces) == decode_whole(OPENAI_STREAM)


def test_events_are_returned_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\n") == [SSEEvent("message", b"one")]
    assert decoder.feed(b"data: two\n\ndata: thr") == [SSEEvent("message", b"two")]
    assert decoder.feed(b"ee\n\n") == [SSEEvent("message", b"three")]
    assert decoder.flush() == []


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_line_endings(newline: bytes) -> None:
    stream = OPENAI_STREAM.replace(b"\n", newline)
    assert decode_whole(stream) == decode_whole(OPENAI_STREAM)


def test_mixed_line_endings() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\nevent: x\rdata: d\r\r"
    assert decode_whole(stream) == [SSEEvent("message", b"a\nb\nc"), SSEEvent("x", b"d")]


def test_crlf_split_between_two_feeds_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The \n completes the \r\n: it must not count as a blank line ending the event.
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [SSEEvent("message", b"a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.flush() == []


def test_cr_then_cr_is_two_line_ends() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [SSEEvent("message", b"a")]


def test_comments_and_keep_alives_are_ignored() -> None:
    stream = (
        b": keep-alive\n\n"
        b":\n"
        b"data: a\n"
        b": a comment inside the event\n"
        b"data: b\n\n"
        b": OPENROUTER PROCESSING\n\n"
    )
    assert decode_whole(stream) == [SSEEvent("message", b"a\nb")]


def test_event_names_are_kept_and_reset_after_each_event() -> None:
    events = decode_whole(ANTHROPIC_STREAM + b"data: plain\n\n")
    assert [event.event for event in events] == [
        "message_start",
        "ping",
        "content_block_delta",
        "message_stop",
        "message",
    ]
    assert json.loads(events[2].data)["delta"]["text"] == "Hi"


def test_event_name_without_data_is_not_dispatched_and_not_carried_over() -> None:
    events = decode_whole(b"event: ping\n\ndata: x\n\n")
    assert events == [SSEEvent("message", b"x")]


def test_multi_line_data_is_joined_with_newline() -> None:
    events = decode_whole(b'data: {"a":\ndata: 1}\n\n')
    assert events == [SSEEvent("message", b'{"a":\n1}')]
    assert json.loads(events[0].data) == {"a": 1}


def test_data_without_space_after_colon() -> None:
    assert decode_whole(b'data:{"x":1}\n\n') == [SSEEvent("message", b'{"x":1}')]


def test_only_one_leading_space_is_removed() -> None:
    assert decode_whole(b"data:  two spaces\n\n") == [SSEEvent("message", b" two spaces")]


def test_final_event_without_blank_line_is_delivered_by_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: first\n\ndata: last") == [SSEEvent("message", b"first")]
    assert decoder.flush() == [SSEEvent("message", b"last")]
    assert decoder.flush() == []


def test_final_event_with_one_newline_is_delivered_by_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: done\ndata: [DONE]\n") == []
    assert decoder.flush() == [SSEEvent("done", b"[DONE]")]


def test_empty_data_lines() -> None:
    assert decode_whole(b"data:\n\n") == [SSEEvent("message", b"")]
    assert decode_whole(b"data\n\n") == [SSEEvent("message", b"")]
    assert decode_whole(b"data: a\ndata:\ndata: b\n\n") == [SSEEvent("message", b"a\n\nb")]


def test_other_fields_are_ignored() -> None:
    stream = b"id: 7\nretry: 1000\nfoo: bar\ndata: x\n\n"
    assert decode_whole(stream) == [SSEEvent("message", b"x")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert decode_whole(b"\n\n\r\n\r\r\n") == []


def test_empty_feed_between_cr_and_lf_changes_nothing() -> None:
    stream = b"data: a\r\ndata: b\r\n\r\n"
    assert decode_pieces([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == decode_whole(stream)


def test_encode_data_round_trips_through_decoder() -> None:
    payload = b'{"choices":[{"delta":{"content":"hi"}}]}'
    encoded = encode_data(payload)
    assert encoded == b"data: " + payload + b"\n\n"
    assert decode_whole(encoded + DONE_EVENT) == [
        SSEEvent("message", payload),
        SSEEvent("message", b"[DONE]"),
    ]


def test_done_event_is_openai_terminator() -> None:
    assert DONE_EVENT == b"data: [DONE]\n\n"


# -- property: how the bytes are split never changes the events ------------------------------

_payload = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"),
    max_size=20,
).map(lambda text: text.encode())
_line_end = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        if draw(st.booleans()):
            out += b":" + draw(_payload) + draw(_line_end)
        if draw(st.booleans()):
            out += b"event: " + draw(_payload).replace(b":", b"") + draw(_line_end)
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            out += b"data:" + draw(st.sampled_from([b"", b" "])) + draw(_payload)
            out += draw(_line_end)
        out += draw(_line_end)
    return out


@st.composite
def streams_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    stream = draw(sse_streams())
    cuts = draw(st.lists(st.integers(min_value=1, max_value=max(1, len(stream) - 1)), max_size=12))
    return stream, sorted(set(cuts))


@settings(max_examples=300, deadline=None, database=None)
@given(streams_and_cuts())
def test_any_split_gives_the_same_events(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    bounds = [0, *(c for c in cuts if c < len(stream)), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert b"".join(pieces) == stream
    assert decode_pieces(pieces) == decode_whole(stream)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(_payload, max_size=8), _line_end)
def test_encoded_payloads_decode_to_themselves(payloads: list[bytes], line_end: bytes) -> None:
    stream = b"".join(encode_data(payload) for payload in payloads).replace(b"\n", line_end)
    events = decode_whole(stream)
    assert [event.data for event in events] == payloads
    assert all(event.event == "message" for event in events)
