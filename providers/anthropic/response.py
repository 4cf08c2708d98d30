"""Anthropic answers -> OpenAI: messages, finish reasons, usage and errors.

A whole message becomes one ``chat.completion``: its text blocks joined into
``message.content``, its ``tool_use`` blocks into ``tool_calls`` (in order, ``arguments``
the JSON of ``input``). Thinking, redacted thinking and server-tool blocks are not part of
an OpenAI answer and are skipped.
"""

from __future__ import annotations

import re
import time

import msgspec

from providers.anthropic.wire import ErrorView, MessageView, UsageView, message_decoder
from providers.base import Completion
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
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic's error types, for an error that arrives as an event inside a 200 stream.
ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
CONTEXT_LENGTH_CODE = "context_length_exceeded"
# "prompt is too long: 250000 tokens > 200000 maximum", "input length and `max_tokens`
# exceed context limit: 198000 + 4096 > 200000, ..."
_CONTEXT_LENGTH_RE = re.compile(r"prompt is too long|exceeds? (the )?context (limit|window)", re.I)


def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def merged_usage(start: UsageView | None, delta: UsageView | None) -> UsageView:
    """A stream's usage: ``message_delta``'s counts are cumulative and win; what it leaves
    out (input and cache tokens, usually) comes from ``message_start``."""
    start = start or UsageView()
    delta = delta or UsageView()

    def pick(late: int | None, early: int | None) -> int | None:
        return late if late is not None else early

    return UsageView(
        input_tokens=pick(delta.input_tokens, start.input_tokens),
        output_tokens=pick(delta.output_tokens, start.output_tokens),
        cache_creation_input_tokens=pick(
            delta.cache_creation_input_tokens, start.cache_creation_input_tokens
        ),
        cache_read_input_tokens=pick(delta.cache_read_input_tokens, start.cache_read_input_tokens),
    )


def openai_usage(usage: UsageView) -> Usage:
    """Prompt tokens count every input token, cached or not, as OpenAI's do."""
    cache_read = usage.cache_read_input_tokens
    cache_creation = usage.cache_creation_input_tokens
    prompt = (usage.input_tokens or 0) + (cache_read or 0) + (cache_creation or 0)
    completion = usage.output_tokens or 0
    details = None
    if cache_read is not None or cache_creation is not None:
        details = PromptTokensDetails(cached_tokens=cache_read or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


class LeadingTrim:
    """Drops, from the start of the answer's text, the whitespace cut from the prefill
    (``AnthropicRequest.prefill_suffix``): the client already has it."""

    __slots__ = ("suffix",)

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __call__(self, text: str) -> str:
        suffix = self.suffix
        if not suffix or not text:
            return text
        if suffix.startswith(text):
            self.suffix = suffix[len(text) :]
            return ""
        self.suffix = ""
        return text[len(suffix) :] if text.startswith(suffix) else text


def from_anthropic(
    body: bytes, *, provider: str, model: str, prefill_suffix: str = ""
) -> Completion:
    """An Anthropic ``Message`` (JSON) as an OpenAI ``chat.completion``."""
    try:
        message = message_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise UpstreamProtocolError(
            f"{provider}/{model}: answer is not an Anthropic message: {exc}",
            provider=provider,
            model=model,
        ) from exc
    finish = finish_reason(message.stop_reason)
    usage = openai_usage(message.usage or UsageView())
    answer = ChatCompletion(
        id="chatcmpl-" + message.id,
        object="chat.completion",
        created=int(time.time()),
        model=message.model or model,
        choices=[
            Choice(
                index=0,
                message=response_message(message, LeadingTrim(prefill_suffix)),
                finish_reason=finish,
                logprobs=None,
            )
        ],
        usage=usage,
    )
    return Completion(json_encoder.encode(answer), answer.model, usage, finish)


def response_message(message: MessageView, trim: LeadingTrim) -> ResponseMessage:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text" and block.text is not None:
            texts.append(trim(block.text))
        elif block.type == "tool_use" and block.id is not None and block.name is not None:
            arguments = bytes(block.input).decode() if block.input else "{}"
            calls.append(
                ToolCall(
                    id=block.id,
                    type="function",
                    function=FunctionCall(name=block.name, arguments=arguments),
                )
            )
    content = "".join(texts) if texts or not calls else None
    return ResponseMessage(role="assistant", content=content, tool_calls=calls or None)


# -- errors --------------------------------------------------------------------------------


def with_context_code(error: UpstreamStatusError) -> UpstreamStatusError:
    """Mark Anthropic's context-length errors with OpenAI's code, whatever their wording,
    so that failover moves to a target with a larger window."""
    if error.status in (400, 413) and _CONTEXT_LENGTH_RE.search(error.message):
        error.code = CONTEXT_LENGTH_CODE
    return error


def stream_error(error: ErrorView | None, *, provider: str, model: str) -> UpstreamStatusError:
    """An ``event: error`` inside a 200 stream, with the status its type stands for
    (``overloaded_error`` -> 529, retryable)."""
    error = error or ErrorView()
    status = ERROR_STATUSES.get(error.type, 500)
    return with_context_code(
        UpstreamStatusError(
            status,
            error.message or f"{provider}/{model}: error event in the stream",
            error_type=error.type or None,
            provider=provider,
            model=model,
        )
    )
