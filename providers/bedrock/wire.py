"""The Bedrock Runtime Converse wire format, as msgspec Structs.

Names and shapes follow botocore's service model for ``bedrock-runtime``
(``ConverseRequest``, ``ConverseResponse``, the ``ConverseStreamOutput`` events). Bedrock
unions (a content block is exactly one of text, image, toolUse, ...) are Structs whose
members all default to ``None``: with ``omit_defaults`` only the member that is set is
encoded. Decoding ignores members resillm does not read (reasoning, citations, the ``p``
padding Bedrock adds to stream events).
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Wire(msgspec.Struct, omit_defaults=True, kw_only=True, rename="camel"):
    pass


# -- request and response messages ---------------------------------------------------------


class ImageSource(_Wire):
    data: str = msgspec.field(name="bytes")  # base64, as botocore encodes a blob in JSON


class ImageBlock(_Wire):
    format: str
    source: ImageSource


class ToolUseBlock(_Wire):
    tool_use_id: str
    name: str
    input: Any


class ToolResultContent(_Wire):
    text: str | None = None
    image: ImageBlock | None = None
    json: Any = None


class ToolResultBlock(_Wire):
    tool_use_id: str
    content: list[ToolResultContent]
    status: str | None = None


class ContentBlock(_Wire):
    text: str | None = None
    image: ImageBlock | None = None
    tool_use: ToolUseBlock | None = None
    tool_result: ToolResultBlock | None = None


class Message(_Wire):
    role: str
    content: list[ContentBlock]


class SystemBlock(_Wire):
    text: str


class InferenceConfig(_Wire):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: list[str] | None = None


class ToolInputSchema(_Wire):
    json: dict[str, Any]


class ToolSpec(_Wire):
    name: str
    input_schema: ToolInputSchema
    description: str | None = None
    strict: bool | None = None


class Tool(_Wire):
    tool_spec: ToolSpec


class SpecificToolChoice(_Wire):
    name: str


class Empty(_Wire):
    pass


class ToolChoice(_Wire):
    auto: Empty | None = None
    any: Empty | None = None
    tool: SpecificToolChoice | None = None


class ToolConfig(_Wire):
    tools: list[Tool]
    tool_choice: ToolChoice | None = None


class JsonSchemaDefinition(_Wire):
    schema: str  # the JSON schema, itself as a JSON string
    name: str | None = None
    description: str | None = None


class OutputFormatStructure(_Wire):
    json_schema: JsonSchemaDefinition


class OutputFormat(_Wire):
    type: str
    structure: OutputFormatStructure


class OutputConfig(_Wire):
    text_format: OutputFormat


class ConverseRequest(_Wire):
    """The body of ``Converse`` and ``ConverseStream`` (the model id goes in the path)."""

    messages: list[Message]
    system: list[SystemBlock] | None = None
    inference_config: InferenceConfig | None = None
    tool_config: ToolConfig | None = None
    output_config: OutputConfig | None = None


class TokenUsage(_Wire):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cache_read_input_tokens: int | None = None
    cache_write_input_tokens: int | None = None


class ConverseOutput(_Wire):
    message: Message | None = None


class ConverseResponse(_Wire):
    output: ConverseOutput
    stop_reason: str | None = None
    usage: TokenUsage | None = None


class ErrorBody(msgspec.Struct):
    """Bedrock's JSON error body; botocore also accepts ``Message`` and ``__type``."""

    message: str | None = None
    Message: str | None = None
    type: str | None = msgspec.field(default=None, name="__type")
    original_message: str | None = msgspec.field(default=None, name="originalMessage")

    @property
    def text(self) -> str:
        return self.message or self.Message or ""


# -- ConverseStream events ------------------------------------------------------------------


class MessageStartEvent(_Wire):
    role: str = "assistant"


class ToolUseBlockStart(_Wire):
    tool_use_id: str
    name: str


class ContentBlockStart(_Wire):
    tool_use: ToolUseBlockStart | None = None


class ContentBlockStartEvent(_Wire):
    start: ContentBlockStart
    content_block_index: int = 0


class ToolUseBlockDelta(_Wire):
    input: str = ""


class ContentBlockDelta(_Wire):
    text: str | None = None
    tool_use: ToolUseBlockDelta | None = None


class ContentBlockDeltaEvent(_Wire):
    delta: ContentBlockDelta
    content_block_index: int = 0


class MessageStopEvent(_Wire):
    stop_reason: str | None = None


class MetadataEvent(_Wire):
    usage: TokenUsage | None = None


converse_response_decoder = msgspec.json.Decoder(ConverseResponse)
error_body_decoder = msgspec.json.Decoder(ErrorBody)
