"""OpenAI Chat Completions wire types, as msgspec Structs, and their shared codecs.

Requests are validated against :class:`ChatCompletionRequest`; fields it does not name are
tolerated (kept in the raw body and forwarded to OpenAI-compatible upstreams). Responses
and chunks are the canonical format every provider translates to.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec


class _Wire(msgspec.Struct, omit_defaults=True, kw_only=True):
    pass


# -- request -------------------------------------------------------------------------------


class ImageURL(_Wire, kw_only=True):
    url: str
    detail: str | None = None


class TextPart(_Wire, tag_field="type", tag="text", kw_only=True):
    text: str


class ImagePart(_Wire, tag_field="type", tag="image_url", kw_only=True):
    image_url: ImageURL


class InputAudio(_Wire, kw_only=True):
    data: str
    format: str


class AudioPart(_Wire, tag_field="type", tag="input_audio", kw_only=True):
    input_audio: InputAudio


class FilePart(_Wire, tag_field="type", tag="file", kw_only=True):
    file: dict[str, Any]


class RefusalPart(_Wire, tag_field="type", tag="refusal", kw_only=True):
    refusal: str


ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart


class FunctionCall(_Wire, kw_only=True):
    name: str
    arguments: str


class ToolCall(_Wire, omit_defaults=False, kw_only=True):
    """``type`` is always encoded: strict clients need ``"type": "function"``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Wire, tag_field="role", tag="system", kw_only=True):
    content: str | list[ContentPart]
    name: str | None = None


class DeveloperMessage(_Wire, tag_field="role", tag="developer", kw_only=True):
    content: str | list[ContentPart]
    name: str | None = None


class UserMessage(_Wire, tag_field="role", tag="user", kw_only=True):
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Wire, tag_field="role", tag="assistant", kw_only=True):
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    function_call: FunctionCall | None = None
    audio: dict[str, Any] | None = None


class ToolMessage(_Wire, tag_field="role", tag="tool", kw_only=True):
    content: str | list[ContentPart]
    tool_call_id: str


class FunctionMessage(_Wire, tag_field="role", tag="function", kw_only=True):
    content: str | None
    name: str


Message = (
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage
)


class FunctionDefinition(_Wire, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Wire, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Wire, kw_only=True):
    name: str


class NamedToolChoice(_Wire, kw_only=True):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Wire, kw_only=True):
    include_usage: bool | None = None


class ResponseFormat(_Wire, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Wire, kw_only=True):
    """The fields resillm reads or validates; anything else rides along in the raw body."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    seed: int | None = None
    user: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- response ------------------------------------------------------------------------------
# Fields OpenAI always sends have no default, so they are always encoded.


class PromptTokensDetails(_Wire, kw_only=True):
    cached_tokens: int | None = None


class Usage(_Wire, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseMessage(_Wire, kw_only=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class Choice(_Wire, kw_only=True):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: Any


class ChatCompletion(_Wire, kw_only=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ToolCallDeltaFunction(_Wire, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Wire, kw_only=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallDeltaFunction | None = None


class Delta(_Wire, kw_only=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    refusal: str | None = None


class ChunkChoice(_Wire, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletionChunk(_Wire, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- light views: what the gateway reads from an upstream answer it forwards as-is ------------


class DeltaView(msgspec.Struct):
    content: str | None = None
    tool_calls: Any = None


class ChoiceView(msgspec.Struct):
    index: int = 0
    finish_reason: str | None = None
    delta: DeltaView | None = None


class CompletionView(msgspec.Struct):
    """The few fields of an OpenAI answer or chunk the gateway needs; the rest is skipped."""

    model: str = ""
    choices: list[ChoiceView] = []
    usage: Usage | None = None
    error: Any = None


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "resillm"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


json_encoder = msgspec.json.Encoder()
json_decoder = msgspec.json.Decoder()
view_decoder = msgspec.json.Decoder(CompletionView)
