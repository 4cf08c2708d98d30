"""OpenAI request -> Anthropic Messages request: what Anthropic receives, and what is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pydantic
import pytest
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)

from providers.anthropic.request import to_anthropic
from providers.anthropic.wire import request_encoder
from resillm.config import AnthropicProviderConfig
from resillm.errors import InvalidRequest
from resillm.schema import ChatCompletionRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
_NON_STREAMING = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)
_STREAMING = pydantic.TypeAdapter(MessageCreateParamsStreaming)


def materialize(value: Any) -> Any:
    """The SDK's params hold lazy iterables: walk them so every nested block is validated."""
    if isinstance(value, dict):
        return {key: materialize(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, Iterator)):
        return [materialize(item) for item in value]
    return value


def anthropic_body(
    body: dict[str, Any], *, stream: bool = False, **config: Any
) -> tuple[dict[str, Any], str]:
    """What Anthropic receives for ``body`` (checked against the official SDK's request
    types), and the whitespace cut from a trailing assistant message."""
    request = msgspec.convert({"model": "alias", **body}, ChatCompletionRequest)
    translated = to_anthropic(
        request,
        {"model": "alias", **body},
        model="claude-target",
        config=AnthropicProviderConfig(**config),
        stream=stream,
    )
    wire: dict[str, Any] = msgspec.json.decode(request_encoder.encode(translated.body))
    materialize((_STREAMING if stream else _NON_STREAMING).validate_python(wire))
    return wire, translated.prefill_suffix


def translate(body: dict[str, Any], **config: Any) -> dict[str, Any]:
    return anthropic_body(body, **config)[0]


def rejected(body: dict[str, Any]) -> InvalidRequest:
    request = msgspec.convert({"model": "alias", **body}, ChatCompletionRequest)
    with pytest.raises(InvalidRequest) as caught:
        to_anthropic(
            request,
            {"model": "alias", **body},
            model="claude-target",
            config=AnthropicProviderConfig(),
            stream=False,
        )
    assert caught.value.status == 400
    return caught.value


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def test_converts_a_conversation_to_anthropic_turns() -> None:
    wire = translate(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": [{"type": "text", "text": "Tell me a joke"}]},
            ]
        }
    )
    assert wire == {
        "model": "claude-target",
        "max_tokens": 4096,
        "messages": [
            user(text("Hi")),
            {"role": "assistant", "content": [text("Hello! How can I help?")]},
            user(text("Tell me a joke")),
        ],
    }


def test_system_and_developer_messages_are_joined_into_system_in_order() -> None:
    wire = translate(
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Bye"},
            ]
        }
    )
    assert wire["system"] == "You are terse.\n\nAnswer in French."
    # Without the system message between them, the two user messages are one turn.
    assert wire["messages"] == [user(text("Hi"), text("Bye"))]


def test_no_system_field_without_system_messages() -> None:
    assert "system" not in translate({"messages": [{"role": "user", "content": "Hi"}]})


def test_consecutive_same_role_turns_are_merged() -> None:
    wire = translate(
        {
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "three"},
                {"role": "assistant", "content": [{"type": "text", "text": "four"}]},
                {"role": "user", "content": "five"},
            ]
        }
    )
    assert wire["messages"] == [
        user(text("one"), text("two")),
        {"role": "assistant", "content": [text("three"), text("four")]},
        user(text("five")),
    ]


def test_empty_messages_are_dropped_not_sent_as_empty_turns() -> None:
    wire = translate(
        {
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "two"},
            ]
        }
    )
    assert wire["messages"] == [user(text("one"), text("two"))]


def test_image_url_becomes_a_url_source_and_data_url_a_base64_source() -> None:
    wire = translate(
        {
            "messages": [
                user(
                    text("What is in these?"),
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": f"data:image/jpg;base64,{PNG}"}},
                )
            ]
        }
    )
    assert wire["messages"][0]["content"] == [
        text("What is in these?"),
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}},
    ]


@pytest.mark.parametrize(
    "url",
    [
        f"data:image/tiff;base64,{PNG}",  # a type Anthropic does not read
        "data:image/png,rawbytes",  # not base64
        "ftp://example.com/cat.png",
    ],
)
def test_an_image_anthropic_cannot_read_is_a_400_naming_the_part(url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    error = rejected({"messages": [user(text("look"), part)]})
    assert error.param == "messages[0].content[1].image_url.url"


def test_a_pdf_file_becomes_a_document_block() -> None:
    part = {
        "type": "file",
        "file": {"file_data": "data:application/pdf;base64,JVBERi0x", "filename": "a.pdf"},
    }
    wire = translate({"messages": [user(text("Summarise"), part)]})
    assert wire["messages"][0]["content"][1] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"},
        "title": "a.pdf",
    }


def test_tools_become_input_schema_and_a_missing_schema_an_empty_object() -> None:
    wire = translate(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL, TIME_TOOL],
        }
    )
    assert wire["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in wire  # Anthropic's default is auto


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            None,
            {"type": "tool", "name": "get_time"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            False,
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        ),
        ("required", True, {"type": "any"}),
        ("none", False, {"type": "none"}),  # no tool calls at all: nothing to serialise
    ],
)
def test_every_tool_choice_form(tool_choice: Any, parallel: bool | None, expected: Any) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body)["tool_choice"] == expected


def test_a_tool_choice_naming_an_unknown_tool_is_a_400() -> None:
    error = rejected(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "launch"}},
        }
    )
    assert error.param == "tool_choice"
    assert "launch" in error.message


def test_assistant_tool_calls_and_tool_results_round_trip() -> None:
    wire = translate(
        {
            "messages": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "toolu_2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": ""},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "toolu_2",
                    "content": [{"type": "text", "text": "14:05"}],
                },
                {"role": "user", "content": "Thanks! Anything else?"},
            ],
            "tools": [WEATHER_TOOL, TIME_TOOL],
        }
    )
    assert wire["messages"] == [
        user(text("Weather and time in Paris?")),
        {
            "role": "assistant",
            "content": [
                text("Let me look."),
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        user(
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [text("14:05")]},
            text("Thanks! Anything else?"),
        ),
    ]


def test_tool_results_lead_their_user_turn_whatever_the_message_order() -> None:
    wire = translate(
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "user", "content": "(it is for Paris)"},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            ],
            "tools": [WEATHER_TOOL],
        }
    )
    assert wire["messages"][-1] == user(
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        text("(it is for Paris)"),
    )


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_tool_call_arguments_that_are_not_a_json_object_are_a_400(
    arguments: str, complaint: str
) -> None:
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": arguments}}
    error = rejected(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "t", "content": "ok"},
            ]
        }
    )
    assert error.param == "messages[1].tool_calls[0].function.arguments"
    assert complaint in error.message


def test_sampling_and_limits_are_carried_over() -> None:
    wire = translate(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 50,
            "max_completion_tokens": 300,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": ["\n\nHuman:", "END"],
            "user": "user-42",
        }
    )
    assert wire["max_tokens"] == 300  # max_completion_tokens wins, as with OpenAI
    assert wire["temperature"] == 0.2
    assert wire["top_p"] == 0.9
    assert wire["stop_sequences"] == ["\n\nHuman:", "END"]
    assert wire["metadata"] == {"user_id": "user-42"}


def test_a_single_stop_string_and_max_tokens() -> None:
    wire = translate(
        {"messages": [{"role": "user", "content": "Hi"}], "stop": "END", "max_tokens": 7}
    )
    assert wire["stop_sequences"] == ["END"]
    assert wire["max_tokens"] == 7


def test_max_tokens_defaults_to_the_configured_value() -> None:
    wire = translate({"messages": [{"role": "user", "content": "Hi"}]}, default_max_tokens=1234)
    assert wire["max_tokens"] == 1234


def test_temperature_above_anthropics_range_is_a_400_not_clamped() -> None:
    error = rejected({"messages": [{"role": "user", "content": "Hi"}], "temperature": 1.5})
    assert error.param == "temperature"
    assert "0 to 1" in error.message
    assert (
        translate({"messages": [{"role": "user", "content": "Hi"}], "temperature": 1})[
            "temperature"
        ]
        == 1
    )


def test_streaming_is_asked_for_only_on_streams() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    assert anthropic_body(body, stream=True)[0]["stream"] is True
    assert "stream" not in translate(body)


def test_a_trailing_assistant_message_is_sent_last_as_a_prefill() -> None:
    wire, suffix = anthropic_body(
        {
            "messages": [
                {"role": "user", "content": "Count to five"},
                {"role": "assistant", "content": "one, two, "},
            ]
        }
    )
    # Anthropic refuses a final assistant turn ending in whitespace: it is cut, and the
    # answer's start drops it again (see the response tests).
    assert wire["messages"][-1] == {"role": "assistant", "content": [text("one, two,")]}
    assert suffix == " "


def test_a_prefill_without_trailing_whitespace_is_sent_unchanged() -> None:
    wire, suffix = anthropic_body(
        {
            "messages": [
                {"role": "user", "content": "Count"},
                {"role": "assistant", "content": "one, two"},
            ]
        }
    )
    assert wire["messages"][-1]["content"] == [text("one, two")]
    assert suffix == ""


def test_json_schema_response_format_becomes_output_config() -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    wire = translate(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": True},
            },
        }
    )
    assert wire["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"tool_choice": "required"}, "tool_choice"),  # and no tools
    ],
)
def test_what_anthropic_cannot_express_is_a_clear_400(extra: dict[str, Any], param: str) -> None:
    error = rejected({"messages": [{"role": "user", "content": "Hi"}], **extra})
    assert error.param == param
    assert error.message


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            user({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}),
            "messages[0].content[0]",
        ),
        (
            user({"type": "file", "file": {"file_id": "file-abc123"}}),
            "messages[0].content[0].file",
        ),
        ({"role": "function", "name": "f", "content": "x"}, "messages[0].role"),
    ],
)
def test_messages_anthropic_cannot_express_are_a_clear_400(
    message: dict[str, Any], param: str
) -> None:
    assert rejected({"messages": [message]}).param == param


def test_hints_without_an_anthropic_equivalent_are_ignored() -> None:
    wire = translate(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "n": 1,
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logprobs": False,
            "logit_bias": {},
            "response_format": {"type": "text"},
            "stream_options": {"include_usage": True},
        }
    )
    assert set(wire) == {"model", "max_tokens", "messages"}
