"""OpenAI Chat Completions wire format, as the official `openai` package reads it."""

from __future__ import annotations

import time
import uuid

import msgspec

from resillm.mock_upstream.answer import Answer, Prompt

_ENCODE = msgspec.json.encode
_FINGERPRINT = "fp_mock"
_DONE = b"data: [DONE]\n\n"

# Real OpenAI wording for the failures a gateway has to tell apart.
_CODE_MESSAGES = {
    "context_length_exceeded": "This model's maximum context length is 128000 tokens. "
    "However, your messages resulted in 250000 tokens. Please reduce the length of the messages.",
    "content_policy_violation": "Your request was rejected as a result of our safety system.",
    "invalid_api_key": "Incorrect API key provided.",
    "model_not_found": "The model does not exist or you do not have access to it.",
}


class _Part(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _Function(msgspec.Struct):
    name: str


class _Tool(msgspec.Struct):
    function: _Function


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    """The fields the mock reads; any others are accepted and ignored."""

    model: str
    messages: list[_Message]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[_Tool] | None = None


def _text(content: str | list[_Part] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content or ())


def parse_request(body: object, *, model: str | None = None) -> Prompt:
    """The prompt of a chat completion request body; `model` overrides the body's (Azure)."""
    if model is not None and isinstance(body, dict):
        body = {**body, "model": model}
    request = msgspec.convert(body, ChatCompletionRequest)
    if not request.messages:
        raise msgspec.ValidationError("`messages` must not be empty - at `$.messages`")
    last = request.messages[-1]
    users = [m for m in request.messages if m.role == "user"]
    return Prompt(
        model=request.model,
        text_chars=sum(len(_text(m.content)) for m in request.messages),
        last_user_text=_text(users[-1].content) if users else "",
        last_is_user=last.role == "user",
        prefill=_text(last.content) if last.role == "assistant" else None,
        first_tool=request.tools[0].function.name if request.tools else None,
        max_tokens=request.max_completion_tokens or request.max_tokens,
        stream=request.stream,
        include_usage=request.stream_options is not None and request.stream_options.include_usage,
    )


_DEFAULT_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_type(status: int) -> str:
    if status == 429:
        return "requests"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str | None = None, code: str | None = None) -> bytes:
    code = code or _DEFAULT_CODES.get(status)
    text = message or _CODE_MESSAGES.get(code or "", f"mock upstream failure ({status})")
    error = {"message": text, "type": error_type(status), "param": None, "code": code}
    return _ENCODE({"error": error})


def _usage(answer: Answer) -> dict[str, int]:
    total = answer.prompt_tokens + answer.completion_tokens
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": total,
    }


def _tool_call_id(answer: Answer) -> str:
    assert answer.tool_call is not None
    return "call_" + answer.tool_call.id_suffix


def completion_body(prompt: Prompt, answer: Answer) -> bytes:
    message: dict[str, object] = {"role": "assistant", "content": answer.text}
    if answer.tool_call is not None:
        function = {"name": answer.tool_call.name, "arguments": answer.tool_call.arguments}
        tool_call = {"id": _tool_call_id(answer), "type": "function", "function": function}
        message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    message.update(refusal=None, annotations=[])
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": answer.finish_reason,
    }
    return _ENCODE(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": prompt.model,
            "choices": [choice],
            "usage": _usage(answer),
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
    )


class OpenAIStream:
    """The server-sent events of one streamed chat completion."""

    def __init__(self, prompt: Prompt, answer: Answer) -> None:
        self._answer = answer
        self._include_usage = prompt.include_usage
        self.usage_event = "end" if prompt.include_usage else ""  # the usage chunk
        self._head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": prompt.model,
            "system_fingerprint": _FINGERPRINT,
        }

    def _chunk(self, delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, object] = {**self._head, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return b"data: " + _ENCODE(chunk) + b"\n\n"

    def prelude(self) -> bytes:
        if self._answer.tool_call is None:
            return self._chunk({"role": "assistant", "content": "", "refusal": None})
        function = {"name": self._answer.tool_call.name, "arguments": ""}
        call = {"index": 0, "id": _tool_call_id(self._answer), "type": "function"}
        return self._chunk(
            {"role": "assistant", "content": None, "tool_calls": [{**call, "function": function}]}
        )

    def piece(self, text: str) -> bytes:
        if self._answer.tool_call is None:
            return self._chunk({"content": text})
        return self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})

    def content_end(self) -> bytes:
        return b""

    def finish(self) -> bytes:
        return self._chunk({}, self._answer.finish_reason)

    def end(self, *, done: bool = True) -> bytes:
        """The usage chunk when asked for, then `[DONE]` unless `done` is false."""
        tail = _DONE if done else b""
        if not self._include_usage:
            return tail
        usage_chunk = {**self._head, "choices": [], "usage": _usage(self._answer)}
        return b"data: " + _ENCODE(usage_chunk) + b"\n\n" + tail

    def malformed(self) -> bytes:
        return b"data: {not json\n\n"

    def error_event(self) -> bytes:
        return (
            b"data: " + error_body(500, "mock upstream error in the middle of the stream") + b"\n\n"
        )
