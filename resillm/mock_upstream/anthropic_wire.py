"""Anthropic Messages wire format, as the official `anthropic` package reads it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import msgspec

from resillm.mock_upstream.answer import Answer, Prompt

_ENCODE = msgspec.json.encode
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_CODE_MESSAGES = {"context_length_exceeded": "prompt is too long: 250000 tokens > 200000 maximum"}


class _Block(msgspec.Struct):
    type: str
    text: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Block]


class _Tool(msgspec.Struct):
    name: str


class MessagesRequest(msgspec.Struct):
    """The fields the mock reads; any others are accepted and ignored."""

    model: str
    messages: list[_Message]
    max_tokens: int
    system: str | list[_Block] | None = None
    stream: bool = False
    tools: list[_Tool] | None = None


def _text(content: str | list[_Block] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.text or "" for block in content or ())


def parse_request(body: object) -> Prompt:
    """The prompt of a Messages request body."""
    request = msgspec.convert(body, MessagesRequest)
    if not request.messages:
        raise msgspec.ValidationError("messages: at least one message is required")
    last = request.messages[-1]
    users = [m for m in request.messages if m.role == "user"]
    return Prompt(
        model=request.model,
        text_chars=len(_text(request.system))
        + sum(len(_text(m.content)) for m in request.messages),
        last_user_text=_text(users[-1].content) if users else "",
        last_is_user=last.role == "user",
        prefill=_text(last.content) if last.role == "assistant" else None,
        first_tool=request.tools[0].name if request.tools else None,
        max_tokens=request.max_tokens,
        stream=request.stream,
        include_usage=True,
    )


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str | None = None, code: str | None = None) -> bytes:
    text = message or _CODE_MESSAGES.get(code or "", f"mock upstream failure ({status})")
    error = {"type": error_type(status), "message": text}
    return _ENCODE({"type": "error", "error": error, "request_id": f"req_{uuid.uuid4().hex}"})


def _blocks(answer: Answer) -> list[dict[str, object]]:
    if answer.tool_call is None:
        return [{"type": "text", "text": answer.text}]
    call = answer.tool_call
    arguments = msgspec.json.decode(call.arguments)
    return [
        {"type": "tool_use", "id": f"toolu_{call.id_suffix}", "name": call.name, "input": arguments}
    ]


def _message(prompt: Prompt, answer: Answer, *, started: bool) -> dict[str, object]:
    """The message object; `started` gives the empty form that opens a stream."""
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": prompt.model,
        "content": [] if started else _blocks(answer),
        "stop_reason": None if started else _STOP_REASONS[answer.finish_reason],
        "stop_sequence": None,
        "usage": {
            "input_tokens": answer.prompt_tokens,
            "output_tokens": 1 if started else answer.completion_tokens,
        },
    }


def completion_body(prompt: Prompt, answer: Answer) -> bytes:
    return _ENCODE(_message(prompt, answer, started=False))


def _event(name: str, data: Mapping[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _ENCODE(data) + b"\n\n"


class AnthropicStream:
    """The server-sent events of one streamed message."""

    usage_event = "finish"  # message_delta: the output tokens, after message_start's input

    def __init__(self, prompt: Prompt, answer: Answer) -> None:
        self._prompt = prompt
        self._answer = answer

    def prelude(self) -> bytes:
        block: dict[str, object] = {"type": "text", "text": ""}
        if self._answer.tool_call is not None:
            block = {**_blocks(self._answer)[0], "input": {}}
        start = {
            "type": "message_start",
            "message": _message(self._prompt, self._answer, started=True),
        }
        return (
            _event("message_start", start)
            + _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            + _event("ping", {"type": "ping"})
        )

    def piece(self, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        if self._answer.tool_call is not None:
            delta = {"type": "input_json_delta", "partial_json": text}
        return _event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )

    def content_end(self) -> bytes:
        return _event("content_block_stop", {"type": "content_block_stop", "index": 0})

    def finish(self) -> bytes:
        delta = {"stop_reason": _STOP_REASONS[self._answer.finish_reason], "stop_sequence": None}
        usage = {"output_tokens": self._answer.completion_tokens}
        return _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})

    def end(self, *, done: bool = True) -> bytes:
        """`message_stop`, Anthropic's `[DONE]`, unless `done` is false."""
        return _event("message_stop", {"type": "message_stop"}) if done else b""

    def malformed(self) -> bytes:
        return b"event: content_block_delta\ndata: {not json\n\n"

    def error_event(self) -> bytes:
        error = {"type": "overloaded_error", "message": "Overloaded"}
        return _event("error", {"type": "error", "error": error})
