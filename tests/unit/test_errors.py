"""The error tree's statuses and OpenAI JSON, and the mapping of transport failures."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from providers.http import parse_retry_after, redact_secrets, status_error, upstream_errors
from resillm.errors import (
    AllTargetsFailed,
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    RequestTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)

ERROR_KEYS = {"message", "type", "code", "param"}


def body_of(error: GatewayError) -> dict[str, Any]:
    body = json.loads(error.body())
    assert set(body) == {"error"}
    assert ERROR_KEYS <= set(body["error"])
    detail: dict[str, Any] = body["error"]
    return detail


# -- client errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code"),
    [
        (InvalidRequest("bad"), 400, "invalid_request_error", None),
        (RequestTooLarge("too big"), 413, "invalid_request_error", "request_too_large"),
        (ModelNotFound("no such model"), 404, "invalid_request_error", "model_not_found"),
        (AuthenticationFailed("who"), 401, "authentication_error", "invalid_api_key"),
        (PermissionDenied("no"), 403, "permission_error", None),
        (NotFound("nothing here"), 404, "invalid_request_error", "not_found"),
        (MethodNotAllowed("GET only"), 405, "invalid_request_error", "method_not_allowed"),
        (GatewayError("oops"), 500, "server_error", None),
        (UpstreamTimeout("slow"), 504, "upstream_error", "upstream_timeout"),
        (UpstreamConnectError("down"), 502, "upstream_error", "upstream_connect_error"),
        (UpstreamProtocolError("garbled"), 502, "upstream_error", "upstream_protocol_error"),
    ],
)
def test_error_status_type_code_and_json(
    error: GatewayError, status: int, error_type: str, code: str | None
) -> None:
    assert error.status == status
    detail = body_of(error)
    assert detail == {"message": str(error), "type": error_type, "code": code, "param": None}


def test_param_is_rendered() -> None:
    detail = body_of(InvalidRequest("invalid 'messages[0].role'", param="messages[0].role"))
    assert detail["param"] == "messages[0].role"
    assert detail["message"] == "invalid 'messages[0].role'"


def test_headers_are_kept_for_the_response() -> None:
    error = GatewayError("busy", headers={"Retry-After": "3"})
    assert error.headers == {"Retry-After": "3"}
    assert InvalidRequest("x").headers == {}


def test_client_errors_are_gateway_errors_not_upstream_errors() -> None:
    assert isinstance(ModelNotFound("x"), InvalidRequest)
    assert isinstance(RequestTooLarge("x"), InvalidRequest)
    assert not isinstance(InvalidRequest("x"), UpstreamError)
    assert isinstance(UpstreamTimeout("x"), UpstreamError)


# -- upstream status errors ------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_retryable_upstream_statuses(status: int) -> None:
    assert UpstreamStatusError(status, "x").retryable is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 413, 451])
def test_non_retryable_upstream_statuses(status: int) -> None:
    assert UpstreamStatusError(status, "x").retryable is False


def test_upstream_client_error_goes_back_as_upstream_said() -> None:
    error = UpstreamStatusError(
        400,
        "This model's maximum context length is 8192 tokens",
        error_type="invalid_request_error",
        code="context_length_exceeded",
        param="messages",
        provider="openai",
        model="gpt-4",
    )
    assert error.status == 400
    assert body_of(error) == {
        "message": "This model's maximum context length is 8192 tokens",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
        "param": "messages",
    }


def test_upstream_status_error_without_type_gets_one_by_status() -> None:
    assert body_of(UpstreamStatusError(404, "nope"))["type"] == "invalid_request_error"
    assert body_of(UpstreamStatusError(503, "busy"))["type"] == "upstream_error"


def test_upstream_error_carries_provider_model_and_retry_after() -> None:
    error = UpstreamStatusError(
        429, "slow down", provider="openai", model="gpt-4o", retry_after_s=2
    )
    assert (error.provider, error.model, error.retry_after_s) == ("openai", "gpt-4o", 2)


# -- every target failed ---------------------------------------------------------------------


def test_all_targets_failed_with_429s_is_429() -> None:
    error = AllTargetsFailed(
        "gpt-4o",
        [
            UpstreamStatusError(429, "rate limited", provider="openai", model="gpt-4o"),
            UpstreamStatusError(429, "rate limited", provider="azure", model="gpt-4o"),
        ],
    )
    assert error.status == 429


def test_all_targets_timed_out_is_504() -> None:
    error = AllTargetsFailed(
        "gpt-4o",
        [
            UpstreamTimeout("timed out", provider="openai", model="gpt-4o"),
            UpstreamTimeout("timed out", provider="azure", model="gpt-4o"),
        ],
    )
    assert error.status == 504


@pytest.mark.parametrize(
    "failures",
    [
        [UpstreamStatusError(429, "rl"), UpstreamTimeout("slow")],
        [UpstreamStatusError(503, "busy"), UpstreamStatusError(429, "rl")],
        [UpstreamConnectError("refused")],
        [UpstreamStatusError(504, "gateway timeout")],
        [],
    ],
)
def test_mixed_failures_are_502(failures: list[UpstreamError]) -> None:
    assert AllTargetsFailed("chat", failures).status == 502


def test_all_targets_failed_body_lists_attempts() -> None:
    error = AllTargetsFailed(
        "gpt-4o",
        [
            UpstreamStatusError(503, "overloaded", provider="openai", model="gpt-4o"),
            UpstreamTimeout("anthropic/claude: timed out", provider="anthropic", model="claude"),
        ],
    )
    detail = body_of(error)
    assert detail["type"] == "upstream_error"
    assert detail["code"] == "upstream_error"
    assert detail["param"] is None
    assert "gpt-4o" in detail["message"]
    assert "timed out" in detail["message"]  # the last error is named
    assert detail["attempts"] == [
        {"provider": "openai", "model": "gpt-4o", "status": 503, "message": "overloaded"},
        {
            "provider": "anthropic",
            "model": "claude",
            "status": None,
            "message": "anthropic/claude: timed out",
        },
    ]


# -- Retry-After -----------------------------------------------------------------------------


def test_retry_after_seconds() -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": "7"})) == 7.0
    assert parse_retry_after(CIMultiDict({"retry-after": "1.5"})) == 1.5


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    waited = parse_retry_after(CIMultiDict({"Retry-After": when}))
    assert waited is not None
    assert 25.0 <= waited <= 31.0


def test_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0


def test_retry_after_ms_is_preferred() -> None:
    headers = CIMultiDict({"Retry-After": "10", "retry-after-ms": "250"})
    assert parse_retry_after(headers) == pytest.approx(0.25)


def test_bad_retry_after_ms_falls_back_to_retry_after() -> None:
    headers = CIMultiDict({"Retry-After": "4", "Retry-After-Ms": "soon"})
    assert parse_retry_after(headers) == 4.0


@pytest.mark.parametrize("value", ["garbage", "", "in a while", "Mon, 99 Foo 20xx"])
def test_garbage_retry_after_is_none(value: str) -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": value})) is None


def test_no_retry_after_is_none() -> None:
    assert parse_retry_after(CIMultiDict()) is None


def test_negative_retry_after_is_zero() -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": "-3"})) == 0.0


# -- secrets ---------------------------------------------------------------------------------


def test_redact_removes_the_given_secret() -> None:
    text = redact_secrets("key abc123XYZsecret is not valid", "abc123XYZsecret")
    assert "abc123XYZsecret" not in text
    assert "not valid" in text


def test_redact_removes_openai_style_keys() -> None:
    message = "Incorrect API key provided: sk-proj-AbCdEf123456789. Find your key at ..."
    text = redact_secrets(message, None)
    assert "sk-proj-AbCdEf123456789" not in text
    assert "AbCdEf123456789" not in text
    assert text.startswith("Incorrect API key provided: ")


def test_redact_removes_masked_keys_too() -> None:
    text = redact_secrets("Incorrect API key provided: sk-abc12****************wxyz.", None)
    assert "wxyz" not in text


def test_redact_keeps_ordinary_text() -> None:
    message = "The model `gpt-4o` does not exist or you do not have access to it."
    assert redact_secrets(message, None) == message
    assert redact_secrets("task-1234567 failed", None) == "task-1234567 failed"


def test_redact_keeps_azure_api_version_wording() -> None:
    message = "Unsupported api-version. The supported api-version values are 2024-10-21."
    assert redact_secrets(message, None) == message


class _FakeContent:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self, limit: int) -> bytes:
        return self.body[:limit]


class _FakeResponse:
    """What ``status_error`` reads from an ``aiohttp.ClientResponse``."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = "Reason"
        self.content = _FakeContent(body)
        self.headers = CIMultiDict(headers or {})


@pytest.mark.anyio
async def test_status_error_reads_openai_error_and_redacts_the_key() -> None:
    body = json.dumps(
        {
            "error": {
                "message": "Incorrect API key provided: sk-live-0123456789abcdef.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
                "param": None,
            }
        }
    ).encode()
    response: Any = _FakeResponse(401, body, {"retry-after": "3"})
    error = await status_error(response, "openai", "gpt-4o", secret="sk-live-0123456789abcdef")
    assert error.status == 401
    assert error.retryable is False
    assert (error.provider, error.model) == ("openai", "gpt-4o")
    assert error.code == "invalid_api_key"
    assert error.upstream_type == "invalid_request_error"
    assert error.retry_after_s == 3.0
    assert "0123456789abcdef" not in error.message
    assert "0123456789abcdef" not in error.body().decode()


@pytest.mark.anyio
async def test_status_error_with_plain_text_body() -> None:
    response: Any = _FakeResponse(502, b"<html>Bad Gateway</html>")
    error = await status_error(response, "local", "llama")
    assert error.status == 502
    assert error.retryable is True
    assert "Bad Gateway" in error.message


# -- transport failures ----------------------------------------------------------------------


def test_timeout_becomes_upstream_timeout() -> None:
    with pytest.raises(UpstreamTimeout) as info, upstream_errors("openai", "gpt-4o"):
        raise TimeoutError  # asyncio.TimeoutError is this builtin since Python 3.11
    error = info.value
    assert (error.provider, error.model, error.status) == ("openai", "gpt-4o", 504)
    assert "openai/gpt-4o" in error.message
    assert isinstance(error.__cause__, TimeoutError)


def test_aiohttp_read_timeout_becomes_upstream_timeout() -> None:
    with pytest.raises(UpstreamTimeout), upstream_errors("openai", "gpt-4o"):
        raise aiohttp.ServerTimeoutError("Timeout on reading data from socket")


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectionError("Cannot connect to host"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError("Network is unreachable"),
    ],
)
def test_connection_failures_become_upstream_connect_error(exc: BaseException) -> None:
    with pytest.raises(UpstreamConnectError) as info, upstream_errors("local", "llama"):
        raise exc
    error = info.value
    assert (error.provider, error.model, error.status) == ("local", "llama", 502)
    assert error.retryable is True
    assert error.message.startswith("local/llama: ")
    assert error.__cause__ is exc


def test_upstream_error_passes_through_untouched() -> None:
    original = UpstreamStatusError(503, "busy", provider="openai", model="gpt-4o")
    with pytest.raises(UpstreamStatusError) as info, upstream_errors("x", "y"):
        raise original
    assert info.value is original


def test_cancellation_passes_through_untouched() -> None:
    with pytest.raises(asyncio.CancelledError), upstream_errors("x", "y"):
        raise asyncio.CancelledError


def test_unrelated_errors_pass_through() -> None:
    with pytest.raises(KeyError), upstream_errors("x", "y"):
        raise KeyError("bug")


def test_no_error_no_effect() -> None:
    with upstream_errors("x", "y"):
        value = 1
    assert value == 1
