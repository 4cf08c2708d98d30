"""OpenAI Chat Completions request -> Anthropic Messages request.

Translated: system and developer messages (joined in order, a blank line apart, into
``system``); user, assistant and tool turns, with consecutive turns of one role merged into
one and tool results leading their user turn; text, image (URL or data URL) and PDF (``file_data``)
parts; assistant ``tool_calls`` -> ``tool_use`` blocks; tools, ``tool_choice`` and
``parallel_tool_calls``; ``stop``, ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``user``; ``response_format`` ``json_schema`` ->
``output_config.format``. A trailing assistant message is sent last: Anthropic continues it.

Rejected with a 400, because the client would silently get something else: ``n`` > 1,
``logprobs`` / ``top_logprobs``, audio (input parts, ``modalities``, ``audio``),
``response_format`` ``json_object`` (Anthropic has no schema-less JSON mode), a non-empty
``logit_bias``, ``web_search_options``, legacy ``functions`` / ``function_call`` and
``function`` messages, ``file_id`` references, images Anthropic cannot read, ``temperature``
above 1 (Anthropic's range is 0..1; clamping would change the answer), invalid tool-call
arguments. Ignored as hints without a contract: ``seed``, ``presence_penalty``,
``frequency_penalty``, ``prediction``, ``reasoning_effort``, ``service_tier``, ``store``,
``metadata``, an image's ``detail``, a message's ``name``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from providers.anthropic.wire import (
    Base64Source,
    ContentBlock,
    DocumentBlock,
    ImageBlock,
    JSONOutputFormat,
    MessageParam,
    MessagesRequest,
    Metadata,
    OutputConfig,
    TextBlock,
    ToolChoice,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    ToolResultBlock,
    ToolUseBlock,
    URLSource,
)
from resillm.config import AnthropicProviderConfig
from resillm.errors import InvalidRequest
from resillm.schema import (
    AssistantMessage,
    AudioPart,
    ChatCompletionRequest,
    ContentPart,
    DeveloperMessage,
    FilePart,
    FunctionMessage,
    ImagePart,
    RefusalPart,
    ResponseFormat,
    SystemMessage,
    TextPart,
    Tool,
    ToolMessage,
    UserMessage,
)

Role = Literal["user", "assistant"]
MAX_TEMPERATURE = 1.0
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
# Fields outside ChatCompletionRequest that ask for something Anthropic cannot give.
_UNSUPPORTED_RAW = {
    "audio": "audio output",
    "functions": "legacy `functions` (use `tools`)",
    "function_call": "legacy `function_call` (use `tool_choice`)",
    "web_search_options": "OpenAI web search",
}


class AnthropicRequest(msgspec.Struct, frozen=True):
    """A translated request. ``prefill_suffix``: trailing whitespace cut from a final
    assistant message (Anthropic refuses it); the answer's start drops it again."""

    body: MessagesRequest
    prefill_suffix: str = ""


def unsupported(what: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{what} cannot be expressed for an Anthropic model", param=param)


def to_anthropic(
    request: ChatCompletionRequest,
    raw: Mapping[str, Any],
    *,
    model: str,
    config: AnthropicProviderConfig,
    stream: bool,
) -> AnthropicRequest:
    """Translate ``request``; raise ``InvalidRequest`` for what cannot be expressed."""
    check_expressible(request, raw)
    system, turns = conversation(request)
    suffix = trim_prefill(turns)
    body = MessagesRequest(
        model=model,
        max_tokens=request.token_limit or config.default_max_tokens,
        messages=turns,
        system="\n\n".join(system) if system else None,
        stop_sequences=[request.stop] if isinstance(request.stop, str) else request.stop or None,
        temperature=checked_temperature(request.temperature),
        top_p=request.top_p,
        metadata=Metadata(user_id=request.user) if request.user else None,
        tools=[tool_param(tool) for tool in request.tools] if request.tools else None,
        tool_choice=tool_choice(request),
        output_config=output_config(request.response_format),
        stream=True if stream else None,
    )
    return AnthropicRequest(body, suffix)


def check_expressible(request: ChatCompletionRequest, raw: Mapping[str, Any]) -> None:
    if request.n is not None and request.n > 1:
        raise unsupported("n > 1 (several choices)", "n")
    if request.logprobs:
        raise unsupported("logprobs", "logprobs")
    if request.top_logprobs:
        raise unsupported("top_logprobs", "top_logprobs")
    if request.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    modalities = raw.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise unsupported("audio output", "modalities")
    for field, what in _UNSUPPORTED_RAW.items():
        if raw.get(field) is not None:
            raise unsupported(what, field)


def checked_temperature(temperature: float | None) -> float | None:
    if temperature is not None and temperature > MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature {temperature:g} is out of range for an Anthropic model, "
            f"which accepts 0 to {MAX_TEMPERATURE:g}",
            param="temperature",
        )
    return temperature


# -- messages ------------------------------------------------------------------------------


def conversation(request: ChatCompletionRequest) -> tuple[list[str], list[MessageParam]]:
    """The system texts and the user/assistant turns, same-role turns merged."""
    system: list[str] = []
    turns: list[MessageParam] = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if isinstance(message, (SystemMessage, DeveloperMessage)):
            text = plain_text(message.content, where)
            if text:
                system.append(text)
        elif isinstance(message, UserMessage):
            append_turn(turns, "user", user_blocks(message.content, where))
        elif isinstance(message, AssistantMessage):
            append_turn(turns, "assistant", assistant_blocks(message, where))
        elif isinstance(message, ToolMessage):
            append_turn(turns, "user", [tool_result(message, where)])
        elif isinstance(message, FunctionMessage):
            raise unsupported("a legacy `function` message (use `tool`)", f"{where}.role")
    for turn in turns:
        if turn.role == "user":
            # Anthropic wants a turn's tool results before anything else in it.
            results = [b for b in turn.content if isinstance(b, ToolResultBlock)]
            turn.content = results + [b for b in turn.content if not isinstance(b, ToolResultBlock)]
    if not turns:
        raise InvalidRequest("messages: at least one user or assistant message with content")
    return system, turns


def append_turn(turns: list[MessageParam], role: Role, blocks: list[ContentBlock]) -> None:
    if not blocks:
        return  # Anthropic refuses empty turns; an empty message says nothing
    if turns and turns[-1].role == role:
        turns[-1].content.extend(blocks)
    else:
        turns.append(MessageParam(role=role, content=blocks))


def plain_text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise unsupported(f"a `{type_of(part)}` part here", f"{where}.content[{j}]")
        texts.append(part.text)
    return "".join(texts)


def user_blocks(content: str | list[ContentPart], where: str) -> list[ContentBlock]:
    if isinstance(content, str):
        return [TextBlock(text=content)] if content else []
    blocks: list[ContentBlock] = []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        if isinstance(part, TextPart):
            if part.text:
                blocks.append(TextBlock(text=part.text))
        elif isinstance(part, ImagePart):
            blocks.append(image_block(part.image_url.url, f"{param}.image_url.url"))
        elif isinstance(part, FilePart):
            blocks.append(document_block(part.file, f"{param}.file"))
        elif isinstance(part, AudioPart):
            raise unsupported("audio input", param)
        else:
            raise unsupported(f"a `{type_of(part)}` part in a user message", param)
    return blocks


def assistant_blocks(message: AssistantMessage, where: str) -> list[ContentBlock]:
    if message.audio is not None:
        raise unsupported("an assistant audio reference", f"{where}.audio")
    if message.function_call is not None:
        raise unsupported("a legacy `function_call` (use `tool_calls`)", f"{where}.function_call")
    blocks: list[ContentBlock] = []
    content = message.content
    if isinstance(content, str):
        texts: Iterable[str] = [content]
    elif content is None:
        texts = [message.refusal] if message.refusal else []
    else:
        texts = (assistant_text(part, f"{where}.content[{j}]") for j, part in enumerate(content))
    blocks.extend(TextBlock(text=text) for text in texts if text)
    for j, call in enumerate(message.tool_calls or ()):
        param = f"{where}.tool_calls[{j}].function.arguments"
        arguments = tool_arguments(call.function.arguments, param)
        blocks.append(ToolUseBlock(id=call.id, name=call.function.name, input=arguments))
    return blocks


def assistant_text(part: ContentPart, param: str) -> str:
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, RefusalPart):
        return part.refusal
    raise unsupported(f"a `{type_of(part)}` part in an assistant message", param)


def tool_arguments(arguments: str, param: str) -> dict[str, Any]:
    """A tool call's arguments string as the JSON object Anthropic's ``input`` takes."""
    if not arguments.strip():
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON object", param=param)
    return value


def tool_result(message: ToolMessage, where: str) -> ToolResultBlock:
    content = message.content
    if isinstance(content, str):
        result: str | list[TextBlock | ImageBlock] | None = content or None
    else:
        text = plain_text(content, where)
        result = [TextBlock(text=text)] if text else None
    return ToolResultBlock(tool_use_id=message.tool_call_id, content=result)


def trim_prefill(turns: list[MessageParam]) -> str:
    """Cut trailing whitespace from a final assistant text (Anthropic refuses it)."""
    last = turns[-1]
    if last.role != "assistant" or not isinstance(last.content[-1], TextBlock):
        return ""
    text = last.content[-1].text
    kept = text.rstrip()
    if kept == text:
        return ""
    if kept:
        last.content[-1] = TextBlock(text=kept)
    else:
        last.content.pop()
        if not last.content:
            turns.pop()
    return text[len(kept) :]


def type_of(part: ContentPart) -> str:
    return str(type(part).__struct_config__.tag)


# -- images and documents ------------------------------------------------------------------


def parse_data_url(url: str, param: str) -> tuple[str, str]:
    """``data:MEDIA;base64,DATA`` -> (media type, base64 data)."""
    header, comma, data = url.partition(",")
    media_type, _, encoding = header[len("data:") :].partition(";")
    if not comma or encoding.lower() != "base64" or not data:
        raise InvalidRequest(f"{param}: expected a base64 data URL", param=param)
    return media_type.lower(), data


def image_block(url: str, param: str) -> ImageBlock:
    if url.startswith(("http://", "https://")):
        return ImageBlock(source=URLSource(url=url))
    if not url.startswith("data:"):
        raise InvalidRequest(f"{param}: expected an http(s) URL or a data URL", param=param)
    media_type, data = parse_data_url(url, param)
    media_type = "image/jpeg" if media_type == "image/jpg" else media_type
    if media_type not in IMAGE_MEDIA_TYPES:
        raise InvalidRequest(
            f"{param}: image type {media_type or '(none)'} is not supported; Anthropic reads "
            + ", ".join(sorted(IMAGE_MEDIA_TYPES)),
            param=param,
        )
    return ImageBlock(source=Base64Source(media_type=media_type, data=data))


def document_block(file: dict[str, Any], param: str) -> DocumentBlock:
    data_url = file.get("file_data")
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise unsupported("a file without `file_data` (an OpenAI `file_id`)", param)
    media_type, data = parse_data_url(data_url, f"{param}.file_data")
    if media_type != "application/pdf":
        raise unsupported(f"a {media_type or 'untyped'} file (only PDF is)", f"{param}.file_data")
    title = file.get("filename")
    return DocumentBlock(
        source=Base64Source(media_type=media_type, data=data),
        title=title if isinstance(title, str) else None,
    )


# -- tools and output format ---------------------------------------------------------------


def tool_param(tool: Tool) -> ToolParam:
    function = tool.function
    return ToolParam(
        name=function.name,
        description=function.description,
        input_schema=function.parameters if function.parameters is not None else EMPTY_SCHEMA,
        strict=function.strict,
    )


def tool_choice(request: ChatCompletionRequest) -> ToolChoice | None:
    choice = request.tool_choice
    disable = True if request.parallel_tool_calls is False else None
    if not request.tools:
        if choice == "required" or not isinstance(choice, (str, type(None))):
            raise InvalidRequest(
                "tool_choice asks for a tool but no tools are given", param="tool_choice"
            )
        return None
    if choice == "none":
        return ToolChoiceNone()
    if choice == "required":
        return ToolChoiceAny(disable_parallel_tool_use=disable)
    if choice is None or choice == "auto":
        if choice is None and disable is None:
            return None  # Anthropic's default is auto
        return ToolChoiceAuto(disable_parallel_tool_use=disable)
    name = choice.function.name
    if name not in {tool.function.name for tool in request.tools}:
        raise InvalidRequest(
            f"tool_choice names '{name}', which is not in tools", param="tool_choice"
        )
    return ToolChoiceTool(name=name, disable_parallel_tool_use=disable)


def output_config(response_format: ResponseFormat | None) -> OutputConfig | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        raise unsupported(
            "response_format json_object (send json_schema with a schema instead)",
            "response_format",
        )
    schema = (response_format.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema: a JSON schema object is required",
            param="response_format",
        )
    return OutputConfig(format=JSONOutputFormat(schema=schema))
