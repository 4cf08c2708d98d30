"""The OpenAI wire types: what clients send is accepted, what resillm sends is OpenAI's shape."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from resillm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ImagePart,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ResponseMessage,
    SystemMessage,
    TextPart,
    ToolMessage,
    Usage,
    UserMessage,
    json_decoder,
    json_encoder,
    view_decoder,
)

USER_HI = {"role": "user", "content": "hi"}

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": WEATHER_PARAMETERS,
        "strict": True,
    },
}

OPENAI_ANSWER = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "created": 1_730_000_000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
    "system_fingerprint": "fp_123",
    "service_tier": "default",
}

OPENAI_CHUNK = {
    "id": "chatcmpl-abc",
    "object": "chat.completion.chunk",
    "created": 1_730_000_000,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_123",
    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    "usage": None,
}


def request(**fields: Any) -> ChatCompletionRequest:
    raw: dict[str, Any] = {"model": "gpt-4o", "messages": [USER_HI], **fields}
    return msgspec.convert(raw, ChatCompletionRequest)


# -- requests accepted ---------------------------------------------------------------------


def test_simple_request() -> None:
    parsed = request(stream=True, temperature=0.2, max_tokens=100, stop=["\n\n"])
    assert parsed.model == "gpt-4o"
    assert parsed.stream is True
    assert parsed.stop == ["\n\n"]
    assert parsed.token_limit == 100
    message = parsed.messages[0]
    assert isinstance(message, UserMessage)
    assert message.content == "hi"


def test_max_completion_tokens_wins_as_token_limit() -> None:
    assert request(max_tokens=100, max_completion_tokens=50).token_limit == 50
    assert request().token_limit is None


def test_system_and_developer_roles() -> None:
    parsed = request(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "json only"}]},
            USER_HI,
        ]
    )
    assert isinstance(parsed.messages[0], SystemMessage)
    assert [type(m).__name__ for m in parsed.messages] == [
        "SystemMessage",
        "DeveloperMessage",
        "UserMessage",
    ]


def test_multi_part_content_with_image_url() -> None:
    parsed = request(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.png", "detail": "high"},
                    },
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                ],
            }
        ]
    )
    message = parsed.messages[0]
    assert isinstance(message, UserMessage)
    assert isinstance(message.content, list)
    text, image, inline = message.content
    assert isinstance(text, TextPart) and text.text == "What is in this picture?"
    assert isinstance(image, ImagePart)
    assert (image.image_url.url, image.image_url.detail) == ("https://example.com/cat.png", "high")
    assert isinstance(inline, ImagePart)
    assert inline.image_url.url.startswith("data:image/png;base64,")


def test_tools_and_tool_choice_string() -> None:
    for choice in ("auto", "none", "required"):
        parsed = request(tools=[WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=False)
        assert parsed.tool_choice == choice
        assert parsed.tools is not None
        assert parsed.tools[0].function.name == "get_weather"
        assert parsed.tools[0].function.parameters == WEATHER_PARAMETERS


def test_tool_choice_named_function() -> None:
    parsed = request(
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert isinstance(parsed.tool_choice, NamedToolChoice)
    assert parsed.tool_choice.function.name == "get_weather"


def test_response_format_json_schema() -> None:
    schema = {
        "name": "answer",
        "strict": True,
        "schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    }
    parsed = request(response_format={"type": "json_schema", "json_schema": schema})
    assert parsed.response_format is not None
    assert parsed.response_format.type == "json_schema"
    assert parsed.response_format.json_schema == schema


def test_stream_options() -> None:
    parsed = request(stream=True, stream_options={"include_usage": True})
    assert parsed.stream_options is not None
    assert parsed.stream_options.include_usage is True


def test_assistant_tool_calls_with_null_content_and_tool_result() -> None:
    parsed = request(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        ],
        tools=[WEATHER_TOOL],
    )
    _, assistant, tool = parsed.messages
    assert isinstance(assistant, AssistantMessage)
    assert assistant.content is None
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert isinstance(tool, ToolMessage)
    assert tool.tool_call_id == "call_1"


def test_unknown_top_level_and_nested_fields_are_tolerated() -> None:
    parsed = request(
        metadata={"team": "a"},
        store=False,
        reasoning_effort="low",
        messages=[{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}],
    )
    assert parsed.model == "gpt-4o"


# -- requests rejected ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"messages": [USER_HI]}, "model"),
        ({"model": "gpt-4o"}, "messages"),
        ({"model": "", "messages": [USER_HI]}, "$.model"),
        ({"model": 42, "messages": [USER_HI]}, "$.model"),
        ({"model": "gpt-4o", "messages": []}, "$.messages"),
        ({"model": "gpt-4o", "messages": "hi"}, "$.messages"),
        ({"model": "gpt-4o", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": "gpt-4o", "messages": [{"content": "x"}]}, "role"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": 7}]}, "content"),
        ({"model": "gpt-4o", "messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"model": "gpt-4o", "messages": [USER_HI], "stream": "yes"}, "$.stream"),
        ({"model": "gpt-4o", "messages": [USER_HI], "temperature": 3}, "$.temperature"),
        ({"model": "gpt-4o", "messages": [USER_HI], "max_tokens": 0}, "$.max_tokens"),
        ({"model": "gpt-4o", "messages": [USER_HI], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": [{"type": "video", "v": 1}]}],
            },
            "content[0].type",
        ),
    ],
)
def test_invalid_requests_are_rejected(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(raw, ChatCompletionRequest)
    assert where in str(info.value)


# -- responses always carry OpenAI's required fields ------------------------------------------


def test_completion_encodes_object_index_role_and_null_finish_reason() -> None:
    answer = ChatCompletion(
        id="chatcmpl-1",
        object="chat.completion",
        created=1,
        model="gpt-4o-2024-08-06",
        choices=[
            Choice(
                index=0,
                message=ResponseMessage(role="assistant", content=None),
                finish_reason=None,
                logprobs=None,
            )
        ],
    )
    body = json.loads(json_encoder.encode(answer))
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert "finish_reason" in choice and choice["finish_reason"] is None
    assert choice["message"]["role"] == "assistant"
    assert "content" in choice["message"] and choice["message"]["content"] is None


def test_openai_answer_round_trips() -> None:
    answer = msgspec.json.decode(json.dumps(OPENAI_ANSWER), type=ChatCompletion)
    body = json.loads(json_encoder.encode(answer))
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-2024-08-06"
    assert body["choices"][0]["index"] == 0
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["usage"]["total_tokens"] == 12
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_chunk_encodes_object_index_role_and_null_finish_reason() -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        created=1,
        model="gpt-4o-2024-08-06",
        choices=[
            ChunkChoice(index=0, delta=Delta(role="assistant", content=""), finish_reason=None)
        ],
    )
    body = json.loads(json_encoder.encode(chunk))
    assert body["object"] == "chat.completion.chunk"
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert "finish_reason" in choice and choice["finish_reason"] is None
    assert choice["delta"] == {"role": "assistant", "content": ""}


def test_last_chunk_keeps_finish_reason_and_usage() -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        created=1,
        model="m",
        choices=[ChunkChoice(index=0, delta=Delta(), finish_reason="stop")],
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    body = json.loads(json_encoder.encode(chunk))
    assert body["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_openai_chunk_round_trips() -> None:
    chunk = msgspec.json.decode(json.dumps(OPENAI_CHUNK), type=ChatCompletionChunk)
    body = json.loads(json_encoder.encode(chunk))
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["index"] == 0


# -- the light view --------------------------------------------------------------------------


def test_view_reads_model_finish_reason_and_usage_from_answer() -> None:
    view = view_decoder.decode(json.dumps(OPENAI_ANSWER).encode())
    assert view.model == "gpt-4o-2024-08-06"
    assert [choice.finish_reason for choice in view.choices] == ["stop"]
    assert view.usage is not None
    assert (view.usage.prompt_tokens, view.usage.completion_tokens) == (9, 3)
    assert view.error is None


def test_view_reads_chunk() -> None:
    view = view_decoder.decode(json.dumps(OPENAI_CHUNK).encode())
    assert view.model == "gpt-4o-2024-08-06"
    assert view.choices[0].finish_reason == "length"
    assert view.usage is None


def test_view_reads_usage_only_chunk() -> None:
    raw = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    view = view_decoder.decode(json.dumps(raw).encode())
    assert view.choices == []
    assert view.usage is not None and view.usage.total_tokens == 12


def test_view_sees_error_event() -> None:
    view = view_decoder.decode(b'{"error": {"message": "overloaded", "type": "server_error"}}')
    assert view.error == {"message": "overloaded", "type": "server_error"}
    assert view.model == ""


# -- /v1/models ----------------------------------------------------------------------------


def test_model_list_shape() -> None:
    body = json.loads(json_encoder.encode(ModelList(data=[ModelCard(id="gpt-4o")])))
    assert body == {
        "object": "list",
        "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "resillm"}],
    }


def test_empty_model_list() -> None:
    assert json.loads(json_encoder.encode(ModelList(data=[]))) == {"object": "list", "data": []}


def test_json_decoder_is_untyped() -> None:
    assert json_decoder.decode(b'{"a": [1, null]}') == {"a": [1, None]}
