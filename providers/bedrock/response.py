"""Bedrock answers -> OpenAI shapes: Converse responses, stop reasons, usage and errors.

Bedrock names its errors by exception type (the ``x-amzn-ErrorType`` header, or the
``:exception-type`` of a stream frame); each maps to the HTTP status resillm's retry and
fallback rules act on: throttling 429, unavailable 503, timeouts 408, model errors 502 (all
retried), access and credential errors 403 and missing models 404 (the next target is
tried), validation 400 (back to the client, or to the next target when the input is too
long for the model's context).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping

import msgspec

from providers.base import Completion
from providers.bedrock.wire import (
    ContentBlock,
    ConverseResponse,
    TokenUsage,
    converse_response_decoder,
    error_body_decoder,
)
from providers.http import redact_secrets
from resillm.errors import UpstreamProtocolError, UpstreamStatusError
from resillm.schema import (
    ChatCompletion,
    Choice,
    FunctionCall,
    PromptTokensDetails,
    ResponseMessage,
    ToolCall,
    Usage,
    json_encoder,
)

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

ERROR_STATUS = {
    "ThrottlingException": 429,
    "ServiceQuotaExceededException": 429,  # an account quota: retry later, or elsewhere
    "ServiceUnavailableException": 503,
    "ModelNotReadyException": 503,
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ModelTimeoutException": 408,
    "InternalServerException": 500,
    "InternalFailure": 500,
    "ModelErrorException": 502,  # 424 on the wire: the model failed, not the request
    "ModelStreamErrorException": 502,
    "UnrecognizedClientException": 403,
    "ExpiredTokenException": 403,
    "InvalidSignatureException": 403,
    "IncompleteSignatureException": 403,
    "MissingAuthenticationTokenException": 403,
}

_HINTS = {
    "ExpiredTokenException": "refresh the AWS credentials (a new session token, "
    "'aws sso login', or the profile's source)",
    "InvalidSignatureException": "check the AWS secret access key",
    "UnrecognizedClientException": "check the AWS access key id and session token",
    "AccessDeniedException": "the IAM identity needs bedrock:InvokeModel and "
    "bedrock:InvokeModelWithResponseStream on this model, with model access granted",
}

# Wordings Bedrock's models use for "the prompt does not fit", beyond the generic ones
# resillm.retry recognises: mark them with OpenAI's code so the next target is tried.
_CONTEXT_LENGTH_RE = re.compile(
    r"(?:input|prompt|request|messages?) (?:is |are )?too long|"
    r"context (?:length|window|limit)|too many (?:input )?tokens|"
    r"exceeds? (?:the )?(?:model'?s? )?(?:maximum )?(?:context|input)",
    re.IGNORECASE,
)


def finish_reason(stop_reason: str | None) -> str:
    # malformed_model_output / malformed_tool_use and future reasons: the turn is over.
    return FINISH_REASONS.get(stop_reason or "", "stop")


def to_usage(usage: TokenUsage | None) -> Usage | None:
    """OpenAI counts cached prompt tokens inside ``prompt_tokens``; Bedrock apart."""
    if usage is None:
        return None
    cache_read = usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + cache_read + (usage.cache_write_input_tokens or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=usage.output_tokens,
        total_tokens=prompt + usage.output_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cache_read) if cache_read else None,
    )


def completion_id(request_id: str | None) -> str:
    return "chatcmpl-" + (request_id or uuid.uuid4().hex)


def completion_from_converse(
    raw: bytes,
    *,
    provider: str,
    model: str,
    request_id: str | None,
    strip_leading_whitespace: bool = False,
) -> Completion:
    try:
        answer: ConverseResponse = converse_response_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise UpstreamProtocolError(
            f"{provider}/{model}: answer is not Converse JSON: {exc}",
            provider=provider,
            model=model,
        ) from exc
    blocks = answer.output.message.content if answer.output.message else []
    text, tool_calls = _content(blocks)
    if strip_leading_whitespace:
        text = text.lstrip()
    usage = to_usage(answer.usage)
    finish = finish_reason(answer.stop_reason)
    body = ChatCompletion(
        id=completion_id(request_id),
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            Choice(
                index=0,
                message=ResponseMessage(
                    role="assistant",
                    content=text if text or not tool_calls else None,
                    tool_calls=tool_calls or None,
                ),
                finish_reason=finish,
                logprobs=None,
            )
        ],
        usage=usage,
    )
    return Completion(json_encoder.encode(body), model, usage, finish)


def _content(blocks: list[ContentBlock]) -> tuple[str, list[ToolCall]]:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in blocks:
        if block.text is not None:
            texts.append(block.text)
        elif block.tool_use is not None:
            use = block.tool_use
            arguments = json_encoder.encode(use.input if use.input is not None else {})
            calls.append(
                ToolCall(
                    id=use.tool_use_id,
                    type="function",
                    function=FunctionCall(name=use.name, arguments=arguments.decode()),
                )
            )
    return "".join(texts), calls


# -- errors --------------------------------------------------------------------------------


def error_type_of(headers: Mapping[str, str], body_type: str | None) -> str | None:
    """The exception name from ``x-amzn-ErrorType`` ("ThrottlingException:http://...") or
    the body's ``__type`` ("com.amazon...#ThrottlingException"), as botocore reads them."""
    value = headers.get("x-amzn-ErrorType") or headers.get("x-amzn-errortype") or body_type
    if not value:
        return None
    name = value.split(":", 1)[0].rsplit("#", 1)[-1].strip()
    return name[:1].upper() + name[1:] if name else None


def bedrock_error(
    status: int,
    error_type: str | None,
    message: str,
    *,
    provider: str,
    model: str,
    secret: str | None = None,
    retry_after_s: float | None = None,
) -> UpstreamStatusError:
    """An ``UpstreamStatusError`` with the status resillm acts on for this exception."""
    mapped = ERROR_STATUS.get(error_type or "")
    if mapped is None:
        mapped = 502 if status in (200, 424) else status
    message = redact_secrets(message.strip(), secret) or f"HTTP {status}"
    text = f"{error_type}: {message}" if error_type else message
    hint = _HINTS.get(error_type or "")
    if hint:
        text = f"{text} ({hint})"
    code = error_type
    if mapped == 400 and _CONTEXT_LENGTH_RE.search(message):
        code = "context_length_exceeded"
    return UpstreamStatusError(
        mapped,
        text,
        code=code,
        provider=provider,
        model=model,
        retry_after_s=retry_after_s,
    )


def error_message(raw: bytes) -> tuple[str, str | None]:
    """The message and ``__type`` of an error body; the raw text when it is not JSON."""
    try:
        body = error_body_decoder.decode(raw)
    except msgspec.DecodeError:
        return raw[:500].decode("utf-8", "replace"), None
    text = body.text
    if body.original_message and body.original_message not in text:
        text = f"{text} ({body.original_message})" if text else body.original_message
    return text, body.type
