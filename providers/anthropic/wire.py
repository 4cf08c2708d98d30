"""The Anthropic Messages API wire format, as msgspec Structs.

Requests are built from tagged Structs (``type`` is the tag, so it is always sent) with
``omit_defaults``: a field resillm did not set is not sent. Answers and stream events are
read through tolerant *views* — one Struct per shape, unknown fields and unknown block or
event types skipped — because Anthropic adds block and event types over time and a gateway
must not fail on one it does not translate. Field names follow the official ``anthropic``
SDK's types (``message_create_params``, ``message``, ``raw_message_stream_event``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class _Wire(msgspec.Struct, omit_defaults=True, kw_only=True):
    pass


# -- request -------------------------------------------------------------------------------


class URLSource(_Wire, tag_field="type", tag="url", kw_only=True):
    url: str


class Base64Source(_Wire, tag_field="type", tag="base64", kw_only=True):
    media_type: str
    data: str


class TextBlock(_Wire, tag_field="type", tag="text", kw_only=True):
    text: str


class ImageBlock(_Wire, tag_field="type", tag="image", kw_only=True):
    source: URLSource | Base64Source


class DocumentBlock(_Wire, tag_field="type", tag="document", kw_only=True):
    source: URLSource | Base64Source
    title: str | None = None


class ToolUseBlock(_Wire, tag_field="type", tag="tool_use", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Wire, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None


ContentBlock = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock


class MessageParam(_Wire, kw_only=True):
    role: Literal["user", "assistant"]
    content: list[ContentBlock]


class ToolParam(_Wire, kw_only=True):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class ToolChoiceAuto(_Wire, tag_field="type", tag="auto", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Wire, tag_field="type", tag="any", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Wire, tag_field="type", tag="tool", kw_only=True):
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Wire, tag_field="type", tag="none", kw_only=True):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(_Wire, kw_only=True):
    user_id: str


class JSONOutputFormat(_Wire, tag_field="type", tag="json_schema", kw_only=True):
    schema: dict[str, Any]


class OutputConfig(_Wire, kw_only=True):
    format: JSONOutputFormat


class MessagesRequest(_Wire, kw_only=True):
    """``POST /v1/messages``: the fields resillm can fill from an OpenAI request."""

    model: str
    max_tokens: int
    messages: list[MessageParam]
    system: str | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: Metadata | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    stream: bool | None = None


# -- answers and stream events (tolerant views) --------------------------------------------


class UsageView(msgspec.Struct):
    """``Usage`` of a message, or the cumulative ``MessageDeltaUsage`` of a stream."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class BlockView(msgspec.Struct):
    """Any content block: ``text`` and ``tool_use`` are translated, the rest skipped."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: msgspec.Raw = msgspec.Raw()  # kept as sent: it becomes `arguments` as is


class MessageView(msgspec.Struct):
    """A ``Message``: the whole answer, or the empty one ``message_start`` carries."""

    id: str
    model: str = ""
    content: list[BlockView] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: UsageView | None = None


class DeltaView(msgspec.Struct):
    """A content block delta (``text_delta``, ``input_json_delta``, ...) or a message delta
    (``stop_reason``); which one depends on the event."""

    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None


class ErrorView(msgspec.Struct):
    type: str = ""
    message: str = ""


class EventView(msgspec.Struct):
    """Any stream event, by its ``type``: ``message_start``, ``content_block_start``,
    ``content_block_delta``, ``content_block_stop``, ``message_delta``, ``message_stop``,
    ``ping``, ``error``; new types are ignored."""

    type: str
    index: int | None = None
    message: MessageView | None = None
    content_block: BlockView | None = None
    delta: DeltaView | None = None
    usage: UsageView | None = None
    error: ErrorView | None = None


class ErrorResponse(msgspec.Struct):
    """``{"type": "error", "error": {"type": ..., "message": ...}}``."""

    error: ErrorView | None = None


request_encoder = msgspec.json.Encoder()
message_decoder = msgspec.json.Decoder(MessageView)
event_decoder = msgspec.json.Decoder(EventView)
error_decoder = msgspec.json.Decoder(ErrorResponse)
