"""Converse answers and Bedrock errors -> OpenAI answers and the statuses resillm acts on."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from botocore.validate import ParamValidator

from providers.bedrock.response import (
    bedrock_error,
    completion_from_converse,
    error_message,
    error_type_of,
)
from resillm.errors import UpstreamProtocolError
from resillm.retry import Next, decide, is_context_length
from resillm.schema import ChatCompletion
from tests.fakes.bedrock_server import bedrock_runtime_model

MODEL = "amazon.nova-pro-v1:0"

# Recorded shapes of ConverseResponse (checked against botocore's model below).
TEXT_ANSWER: dict[str, Any] = {
    "output": {"message": {"role": "assistant", "content": [{"text": "Paris."}]}},
    "stopReason": "end_turn",
    "usage": {"inputTokens": 12, "outputTokens": 3, "totalTokens": 15},
    "metrics": {"latencyMs": 321},
}
TOOL_ANSWER: dict[str, Any] = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {"text": "Checking."},
                {
                    "reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig"}},
                },
                {
                    "toolUse": {
                        "toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q",
                        "name": "get_weather",
                        "input": {"city": "Paris", "units": ["C"]},
                    }
                },
            ],
        }
    },
    "stopReason": "tool_use",
    "usage": {
        "inputTokens": 40,
        "outputTokens": 20,
        "totalTokens": 160,
        "cacheReadInputTokens": 100,
        "cacheWriteInputTokens": 0,
    },
    "metrics": {"latencyMs": 800},
}


@pytest.mark.parametrize("answer", [TEXT_ANSWER, TOOL_ANSWER])
def test_recorded_answers_fit_botocores_output_shape(answer: dict[str, Any]) -> None:
    shape = bedrock_runtime_model().operation_model("Converse").output_shape
    report = ParamValidator().validate(answer, shape)
    assert not report.has_errors(), report.generate_report()


def completion(answer: dict[str, Any], **options: Any) -> tuple[dict[str, Any], Any]:
    result = completion_from_converse(
        json.dumps(answer).encode(), provider="bedrock", model=MODEL, request_id="abc", **options
    )
    msgspec.json.decode(result.body, type=ChatCompletion)  # a valid OpenAI answer
    return json.loads(result.body), result


def test_text_answer() -> None:
    body, result = completion(TEXT_ANSWER)
    assert body["id"] == "chatcmpl-abc"
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL == result.model
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris."},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert result.finish_reason == "stop" and result.usage.completion_tokens == 3


def test_tool_answer() -> None:
    body, _ = completion(TOOL_ANSWER)
    message = body["choices"][0]["message"]
    assert message["content"] == "Checking."
    assert message["tool_calls"] == [
        {
            "id": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris","units":["C"]}'},
        }
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {
        "prompt_tokens": 140,
        "completion_tokens": 20,
        "total_tokens": 160,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


def test_tool_only_answer_has_null_content() -> None:
    answer = json.loads(json.dumps(TOOL_ANSWER))
    del answer["output"]["message"]["content"][:2]
    body, _ = completion(answer)
    assert body["choices"][0]["message"]["content"] is None


def test_leading_whitespace_after_a_trimmed_prefill_is_dropped() -> None:
    answer = json.loads(json.dumps(TEXT_ANSWER))
    answer["output"]["message"]["content"] = [{"text": "  four, five"}]
    body, _ = completion(answer, strip_leading_whitespace=True)
    assert body["choices"][0]["message"]["content"] == "four, five"


def test_an_answer_without_request_id_gets_a_unique_id() -> None:
    first = completion_from_converse(
        json.dumps(TEXT_ANSWER).encode(), provider="b", model=MODEL, request_id=None
    )
    second = completion_from_converse(
        json.dumps(TEXT_ANSWER).encode(), provider="b", model=MODEL, request_id=None
    )
    ids = {json.loads(first.body)["id"], json.loads(second.body)["id"]}
    assert len(ids) == 2 and all(i.startswith("chatcmpl-") for i in ids)


def test_an_unreadable_answer_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        completion_from_converse(b"<html>", provider="b", model=MODEL, request_id=None)


# -- errors --------------------------------------------------------------------------------


def test_error_type_comes_from_the_header_or_the_body() -> None:
    header = {"x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/"}
    assert error_type_of(header, None) == "ThrottlingException"
    assert error_type_of({}, "com.amazon.coral.validate#ValidationException") == (
        "ValidationException"
    )
    assert error_type_of({}, "throttlingException") == "ThrottlingException"
    assert error_type_of({}, None) is None


def test_error_message_reads_either_spelling() -> None:
    assert error_message(b'{"message": "slow down"}') == ("slow down", None)
    assert error_message(b'{"Message": "nope", "__type": "X#AccessDeniedException"}') == (
        "nope",
        "X#AccessDeniedException",
    )
    assert error_message(b"Service Unavailable") == ("Service Unavailable", None)


@pytest.mark.parametrize(
    ("error_type", "http_status", "status", "step"),
    [
        ("ThrottlingException", 429, 429, Next.RETRY),
        ("ServiceUnavailableException", 503, 503, Next.RETRY),
        ("ModelNotReadyException", 429, 503, Next.RETRY),
        ("ModelTimeoutException", 408, 408, Next.RETRY),
        ("InternalServerException", 500, 500, Next.RETRY),
        ("ModelErrorException", 424, 502, Next.RETRY),
        ("ServiceQuotaExceededException", 400, 429, Next.RETRY),
        ("AccessDeniedException", 403, 403, Next.FALLBACK),
        ("ResourceNotFoundException", 404, 404, Next.FALLBACK),
        ("UnrecognizedClientException", 403, 403, Next.FALLBACK),
        ("ExpiredTokenException", 403, 403, Next.FALLBACK),
        ("InvalidSignatureException", 403, 403, Next.FALLBACK),
        ("ValidationException", 400, 400, Next.CLIENT),
        (None, 424, 502, Next.RETRY),
        ("SomethingNewException", 409, 409, Next.RETRY),
    ],
)
def test_bedrock_errors_map_to_statuses_retry_understands(
    error_type: str | None, http_status: int, status: int, step: Next
) -> None:
    error = bedrock_error(http_status, error_type, "went wrong", provider="b", model=MODEL)
    assert error.status == status
    assert decide(error, others_left=True) is step
    assert "went wrong" in error.message
    if error_type:
        assert error.message.startswith(f"{error_type}: ")


@pytest.mark.parametrize(
    "message",
    [
        "Input is too long for requested model.",
        "The model returned the following errors: prompt is too long: 215000 tokens > 200000",
        "The model returned the following errors: input length and `max_tokens` exceed context "
        "limit: 199000 + 8192 > 200000, decrease input length or `max_tokens` and try again",
        "Too many input tokens. Max input tokens: 8192, request input token count: 9000",
    ],
)
def test_context_length_errors_fall_back(message: str) -> None:
    error = bedrock_error(400, "ValidationException", message, provider="b", model=MODEL)
    assert error.code == "context_length_exceeded"
    assert is_context_length(error)
    assert decide(error, others_left=True) is Next.FALLBACK


def test_a_plain_validation_error_goes_back_to_the_client_as_it_is() -> None:
    error = bedrock_error(
        400,
        "ValidationException",
        "The provided model identifier is invalid.",
        provider="b",
        model=MODEL,
    )
    assert error.code == "ValidationException"
    assert not is_context_length(error)
    detail = error.detail()
    assert detail.type == "invalid_request_error"
    assert detail.message == "ValidationException: The provided model identifier is invalid."


def test_credential_errors_say_what_to_check_and_hide_keys() -> None:
    expired = bedrock_error(
        403,
        "ExpiredTokenException",
        "The security token included in the request is expired",
        provider="b",
        model=MODEL,
    )
    assert "refresh the AWS credentials" in expired.message
    leaky = bedrock_error(
        403,
        "UnrecognizedClientException",
        "key AKIAABCDEFGHIJKLMNOP and token sekrit-token are invalid",
        provider="b",
        model=MODEL,
        secret="sekrit-token",
    )
    assert "AKIAABCDEFGHIJKLMNOP" not in leaky.message and "sekrit-token" not in leaky.message
