"""Anthropic answers -> OpenAI chat completions, finish reasons, usage and errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic.types
import openai.types.chat
import pytest

from providers.anthropic.response import (
    LeadingTrim,
    finish_reason,
    from_anthropic,
    stream_error,
    with_context_code,
)
from providers.anthropic.wire import ErrorView
from resillm.errors import UpstreamProtocolError, UpstreamStatusError
from resillm.retry import Next, decide, is_context_length

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "anthropic"


def recorded(name: str) -> bytes:
    body = (FIXTURES / name).read_bytes()
    anthropic.types.Message.model_validate_json(body)  # shaped exactly as the SDK reads it
    return body


def message(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 2},
    }
    body = json.dumps({**base, **fields}).encode()
    anthropic.types.Message.model_validate_json(body)
    return body


def convert(body: bytes, suffix: str = "") -> openai.types.chat.ChatCompletion:
    completion = from_anthropic(body, provider="claude", model="target", prefill_suffix=suffix)
    # What a client's SDK makes of it: the OpenAI shape, strictly.
    answer = openai.types.chat.ChatCompletion.model_validate_json(completion.body)
    assert completion.model == answer.model
    assert completion.finish_reason == answer.choices[0].finish_reason
    assert completion.usage is not None and answer.usage is not None
    assert completion.usage.total_tokens == answer.usage.total_tokens
    return answer


def test_a_text_answer_normalises_to_an_openai_completion() -> None:
    before = int(time.time())
    answer = convert(recorded("message_text.json"))
    assert answer.id == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert answer.object == "chat.completion"
    assert answer.model == "claude-sonnet-4-5-20250929"  # the model that answered
    assert before <= answer.created <= int(time.time())
    [choice] = answer.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello! How can I help you today?"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens() -> None:
    usage = convert(recorded("message_text.json")).usage
    assert usage is not None
    assert usage.prompt_tokens == 12 + 100 + 2048
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2048
    assert usage.completion_tokens == 9
    assert usage.total_tokens == 12 + 100 + 2048 + 9


def test_usage_without_cache_fields_has_no_cache_details() -> None:
    usage = convert(message()).usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 2, 12)
    assert usage.prompt_tokens_details is None


def test_tool_use_blocks_become_tool_calls_and_thinking_is_skipped() -> None:
    answer = convert(recorded("message_tool_use.json"))
    [choice] = answer.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll check the weather in both cities."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [call.id for call in calls] == [
        "toolu_01A09q90qw90lq917835lq9",
        "toolu_01B8q7e6q5w4e3r2t1y0u9",
    ]
    assert all(call.type == "function" for call in calls)
    assert [call.function.name for call in calls] == ["get_weather", "get_weather"]  # type: ignore[union-attr]
    assert [json.loads(call.function.arguments) for call in calls] == [  # type: ignore[union-attr]
        {"location": "San Francisco, CA", "unit": "celsius"},
        {"location": "Paris, France", "unit": "celsius"},
    ]


def test_an_answer_of_only_tool_calls_has_null_content() -> None:
    body = message(
        content=[{"type": "tool_use", "id": "toolu_9", "name": "get_time", "input": {}}],
        stop_reason="tool_use",
    )
    choice = convert(body).choices[0]
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].function.arguments == "{}"  # type: ignore[union-attr]


def test_an_empty_answer_has_empty_content() -> None:
    assert convert(message(content=[])).choices[0].message.content == ""


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_every_stop_reason_maps_to_a_finish_reason(stop_reason: str, finish: str) -> None:
    assert convert(message(stop_reason=stop_reason)).choices[0].finish_reason == finish


def test_every_stop_reason_the_sdk_knows_is_mapped() -> None:
    known = set(anthropic.types.StopReason.__args__)  # type: ignore[attr-defined]
    assert {reason for reason in known if finish_reason(reason) != "stop"} | {
        "end_turn",
        "stop_sequence",
        "pause_turn",
    } == known


def test_the_answer_to_a_trimmed_prefill_drops_the_cut_whitespace() -> None:
    body = message(content=[{"type": "text", "text": " three, four"}])
    assert convert(body, suffix=" ").choices[0].message.content == "three, four"
    # A model that went on without the space gives its text unchanged.
    body = message(content=[{"type": "text", "text": "three"}])
    assert convert(body, suffix=" ").choices[0].message.content == "three"


def test_leading_trim_consumes_the_suffix_across_pieces() -> None:
    trim = LeadingTrim("\n\n")
    assert [trim("\n"), trim("\nNext"), trim("\n\nkept")] == ["", "Next", "\n\nkept"]


def test_an_unreadable_answer_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        from_anthropic(b"{not json", provider="claude", model="target")
    with pytest.raises(UpstreamProtocolError):
        from_anthropic(b'{"type": "message"}', provider="claude", model="target")


@pytest.mark.parametrize(
    ("error_type", "status", "retryable"),
    [
        ("overloaded_error", 529, True),
        ("rate_limit_error", 429, True),
        ("api_error", 500, True),
        ("timeout_error", 504, True),
        ("invalid_request_error", 400, False),
        ("authentication_error", 401, False),
        ("permission_error", 403, False),
        ("not_found_error", 404, False),
        ("request_too_large", 413, False),
        ("brand_new_error", 500, True),
    ],
)
def test_a_stream_error_event_carries_the_status_of_its_type(
    error_type: str, status: int, retryable: bool
) -> None:
    error = stream_error(ErrorView(type=error_type, message="boom"), provider="p", model="m")
    assert (error.status, error.retryable, error.message) == (status, retryable, "boom")
    assert error.upstream_type == error_type


@pytest.mark.parametrize(
    "message_text",
    [
        "prompt is too long: 250000 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 198000 + 4096 > 200000, "
        "decrease input length or `max_tokens` and try again",
    ],
)
def test_context_length_errors_are_recognised_for_fallback(message_text: str) -> None:
    error = with_context_code(UpstreamStatusError(400, message_text, error_type="x"))
    assert error.code == "context_length_exceeded"
    assert is_context_length(error)
    assert decide(error, others_left=True) is Next.FALLBACK


def test_a_plain_400_stays_a_client_error() -> None:
    error = with_context_code(UpstreamStatusError(400, "messages: roles must alternate"))
    assert error.code is None
    assert decide(error, others_left=True) is Next.CLIENT
