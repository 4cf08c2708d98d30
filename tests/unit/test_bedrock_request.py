"""OpenAI request -> Converse request, checked against botocore's own model of the API.

Every translated body must pass botocore's parameter validation for ``Converse`` and
serialize, through botocore's rest-json serializer, to the very JSON resillm sends.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from botocore.serialize import create_serializer

from providers.bedrock.request import to_converse, tool_use_id
from resillm.errors import InvalidRequest
from resillm.schema import ChatCompletionRequest
from tests.fakes.bedrock_server import bedrock_runtime_model, validation_errors

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def translate(**fields: Any) -> dict[str, Any]:
    """The Converse body for an OpenAI request, as JSON data; checked against botocore."""
    raw = {"model": "alias", **fields}
    request = msgspec.json.decode(json.dumps(raw), type=ChatCompletionRequest)
    body = json.loads(msgspec.json.encode(to_converse(request).body))
    assert validation_errors("Converse", {**body, "modelId": "m.model-v1:0"}) == ""
    return body


def botocore_serialized(model_id: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What boto3 itself would send for these parameters: (path, JSON body)."""
    params = copy.deepcopy(body)
    for message in params["messages"]:
        for block in message["content"]:
            if "image" in block:  # botocore takes raw bytes and base64-encodes them
                source = block["image"]["source"]
                source["bytes"] = base64.b64decode(source["bytes"])
    operation = bedrock_runtime_model().operation_model("Converse")
    request = create_serializer("rest-json").serialize_to_request(
        {**params, "modelId": model_id}, operation
    )
    return request["url_path"], json.loads(request["body"])


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_system_and_developer_messages_become_system_blocks() -> None:
    body = translate(
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            user("Hi"),
        ]
    )
    assert body["system"] == [{"text": "You are terse."}, {"text": "Answer in French."}]
    assert body["messages"] == [{"role": "user", "content": [{"text": "Hi"}]}]
    assert "inferenceConfig" not in body and "toolConfig" not in body


def test_inference_config_from_sampling_fields() -> None:
    body = translate(
        messages=[user("Hi")],
        max_completion_tokens=256,
        max_tokens=999,
        temperature=0.3,
        top_p=0.9,
        stop=["END", ""],
        presence_penalty=0.5,
        seed=7,
        user="someone",
    )
    assert body["inferenceConfig"] == {
        "maxTokens": 256,
        "temperature": 0.3,
        "topP": 0.9,
        "stopSequences": ["END"],
    }
    assert translate(messages=[user("Hi")], max_tokens=50, stop="X")["inferenceConfig"] == {
        "maxTokens": 50,
        "stopSequences": ["X"],
    }


def test_consecutive_turns_of_one_role_are_merged() -> None:
    body = translate(
        messages=[
            user("one"),
            user([{"type": "text", "text": "two"}]),
            {"role": "assistant", "content": "ok"},
        ]
    )
    assert body["messages"] == [
        {"role": "user", "content": [{"text": "one"}, {"text": "two"}]},
        {"role": "assistant", "content": [{"text": "ok"}]},
    ]


def test_tool_round_trip_translates_to_tool_use_and_tool_result() -> None:
    body = translate(
        messages=[
            user("Weather in Paris and Rome?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "25C"}],
            },
            user("Thanks"),
        ],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Paris"}}},
            {"toolUse": {"toolUseId": "call_2", "name": "get_weather", "input": {"city": "Rome"}}},
        ],
    }
    # Both results and the next user text share one user turn, results first.
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}]}},
            {"toolResult": {"toolUseId": "call_2", "content": [{"text": "25C"}]}},
            {"text": "Thanks"},
        ],
    }
    assert body["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},
                }
            }
        ]
    }


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", None),
        ("required", {"any": {}}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"tool": {"name": "get_weather"}},
        ),
    ],
)
def test_tool_choice(tool_choice: Any, expected: dict[str, Any] | None) -> None:
    body = translate(messages=[user("Hi")], tools=[WEATHER_TOOL], tool_choice=tool_choice)
    assert body["toolConfig"].get("toolChoice") == expected


def test_tool_choice_none_omits_the_tools() -> None:
    body = translate(messages=[user("Hi")], tools=[WEATHER_TOOL], tool_choice="none")
    assert "toolConfig" not in body


def test_tool_history_always_comes_with_a_tool_config() -> None:
    """Converse refuses toolUse blocks without a toolConfig: with tool_choice none, or with
    no tools at all, the tools used in the conversation are still declared."""
    messages = [
        user("Weather?"),
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with_none = translate(messages=messages, tools=[WEATHER_TOOL], tool_choice="none")
    names = [t["toolSpec"]["name"] for t in with_none["toolConfig"]["tools"]]
    assert names == ["get_weather", "lookup"] and "toolChoice" not in with_none["toolConfig"]
    without_tools = translate(messages=messages)
    assert without_tools["toolConfig"]["tools"] == [
        {
            "toolSpec": {
                "name": "lookup",
                "inputSchema": {"json": {"type": "object", "properties": {}}},
            }
        }
    ]
    assert without_tools["messages"][1]["content"][0]["toolUse"]["input"] == {}


def test_tool_ids_are_made_valid_for_converse_consistently() -> None:
    assert tool_use_id("call_abc-1.2:3") == "call_abc-1.2:3"
    assert tool_use_id("call/abc def") == "call_abc_def"
    assert len(tool_use_id("x" * 100)) == 64
    body = translate(
        messages=[
            user("Hi"),
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "id with space",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "id with space", "content": "ok"},
        ],
        tools=[WEATHER_TOOL],
    )
    use = body["messages"][1]["content"][0]["toolUse"]["toolUseId"]
    result = body["messages"][2]["content"][0]["toolResult"]["toolUseId"]
    assert use == result == "id_with_space"


def test_base64_images_become_image_blocks() -> None:
    body = translate(
        messages=[
            user(
                [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/jpg;base64,{PNG}", "detail": "low"},
                    },
                ]
            )
        ]
    )
    assert body["messages"][0]["content"][1:] == [
        {"image": {"format": "png", "source": {"bytes": PNG}}},
        {"image": {"format": "jpeg", "source": {"bytes": PNG}}},
    ]


def test_trailing_assistant_message_is_kept_as_a_prefill() -> None:
    raw = {
        "model": "alias",
        "messages": [user("Count to five"), {"role": "assistant", "content": "1, 2, 3, "}],
    }
    request = msgspec.json.decode(json.dumps(raw), type=ChatCompletionRequest)
    translated = to_converse(request)
    body = json.loads(msgspec.json.encode(translated.body))
    assert body["messages"][-1] == {"role": "assistant", "content": [{"text": "1, 2, 3,"}]}
    assert translated.strip_leading_whitespace
    raw["messages"][-1]["content"] = "1, 2"
    request = msgspec.json.decode(json.dumps(raw), type=ChatCompletionRequest)
    assert not to_converse(request).strip_leading_whitespace


def test_json_schema_response_format_becomes_structured_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = translate(
        messages=[user("Hi")],
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
    )
    text_format = body["outputConfig"]["textFormat"]
    assert text_format["type"] == "json_schema"
    assert json.loads(text_format["structure"]["jsonSchema"]["schema"]) == schema
    assert text_format["structure"]["jsonSchema"]["name"] == "thing"
    assert "outputConfig" not in translate(
        messages=[user("JSON")], response_format={"type": "json_object"}
    )


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
        "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-2-90b-instruct-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abcdefghijkl",
    ],
)
def test_path_and_body_are_what_botocore_itself_sends(model_id: str) -> None:
    body = translate(
        messages=[
            {"role": "system", "content": "sys"},
            user(
                [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": f"data:image/webp;base64,{PNG}"}},
                ]
            ),
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": "cold"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=100,
        stop="STOP",
    )
    path, botocore_body = botocore_serialized(model_id, body)
    assert path == f"/model/{quote(model_id, safe='')}/converse"
    assert botocore_body == body


# -- what Converse cannot express: a 400 naming the field -------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"n": 2}, "n", "one choice"),
        ({"logprobs": True}, "logprobs", "logprobs"),
        ({"temperature": 1.5}, "temperature", "between 0 and 1"),
        (
            {
                "messages": [
                    user(
                        [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
                    )
                ]
            },
            "messages[0].content[0].image_url.url",
            "does not fetch image URLs",
        ),
        (
            {
                "messages": [
                    user(
                        [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}]
                    )
                ]
            },
            "messages[0].content[0].image_url.url",
            "png, jpeg, gif and webp",
        ),
        (
            {
                "messages": [
                    user(
                        [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
                    )
                ]
            },
            "messages[0].content[0]",
            "audio",
        ),
        (
            {"messages": [{"role": "assistant", "content": "Hello!"}, user("Hi")]},
            "messages",
            "start with a user message",
        ),
        (
            {"messages": [{"role": "system", "content": "only a system prompt"}]},
            "messages",
            "at least one user",
        ),
        (
            {
                "messages": [
                    user("Hi"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1, 2]"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "JSON object",
        ),
        (
            {"messages": [user("Hi"), {"role": "function", "name": "f", "content": "x"}]},
            "messages[1].role",
            "tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ],
)
def test_what_converse_cannot_express_is_a_400(
    fields: dict[str, Any], param: str, words: str
) -> None:
    raw = {"model": "alias", "messages": [user("Hi")], **fields}
    request = msgspec.json.decode(json.dumps(raw), type=ChatCompletionRequest)
    with pytest.raises(InvalidRequest) as caught:
        to_converse(request)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert words in caught.value.message
