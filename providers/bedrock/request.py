"""OpenAI chat request -> Bedrock Converse request: a pure translation.

What Converse cannot express is refused with a 400 ``InvalidRequest`` naming the field
(``n > 1``, logprobs, audio and file parts, image URLs, the legacy ``functions`` API,
a temperature above 1, a conversation that does not start with a user turn). Fields that
only tune sampling on OpenAI (penalties, ``logit_bias``, ``seed``, ``user``,
``parallel_tool_calls``) are dropped.

Choices worth knowing:

- system and developer messages, wherever they stand, become ``system`` blocks in order;
- consecutive turns of one role are merged (Converse wants user/assistant alternation),
  and tool results go first in their user turn, as Claude requires;
- an image is sent only as bytes: resillm does not fetch URLs on the gateway;
- ``tool_choice: "none"`` omits ``toolConfig`` — unless the conversation already holds
  tool calls, which Converse accepts only with a ``toolConfig``: then the tools are sent
  without a choice and "none" cannot be enforced;
- a trailing assistant message is a prefill, kept as the last assistant turn with its
  trailing whitespace removed (Claude rejects it); the answer's leading whitespace is then
  dropped too, so text sent before and after reads as one.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from providers.bedrock.wire import (
    ContentBlock,
    ConverseRequest,
    Empty,
    ImageBlock,
    ImageSource,
    InferenceConfig,
    JsonSchemaDefinition,
    Message,
    OutputConfig,
    OutputFormat,
    OutputFormatStructure,
    SpecificToolChoice,
    SystemBlock,
    Tool,
    ToolChoice,
    ToolConfig,
    ToolInputSchema,
    ToolResultBlock,
    ToolResultContent,
    ToolSpec,
    ToolUseBlock,
)
from resillm.errors import InvalidRequest
from resillm.schema import (
    AssistantMessage,
    ChatCompletionRequest,
    ContentPart,
    DeveloperMessage,
    ImagePart,
    NamedToolChoice,
    RefusalPart,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
)
from resillm.schema import Message as OpenAIMessage

MAX_TEMPERATURE = 1.0
IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_DATA_URL_RE = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*?;base64,(?P<data>.*)", re.S
)
_TOOL_ID_BAD_CHARS_RE = re.compile(r"[^a-zA-Z0-9_.:-]")
_TOOL_ID_MAX = 64
_EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


class BedrockRequest(NamedTuple):
    body: ConverseRequest
    # The prefill lost trailing whitespace: drop the answer's leading whitespace.
    strip_leading_whitespace: bool


def to_converse(request: ChatCompletionRequest) -> BedrockRequest:
    _refuse_unsupported(request)
    system, turns = _conversation(request.messages)
    strip = _trim_prefill(turns)
    return BedrockRequest(
        ConverseRequest(
            messages=turns,
            system=system or None,
            inference_config=_inference_config(request),
            tool_config=_tool_config(request, turns),
            output_config=_output_config(request),
        ),
        strip,
    )


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.n is not None and request.n > 1:
        raise InvalidRequest("the bedrock provider returns one choice: n must be 1", param="n")
    if request.logprobs or request.top_logprobs:
        raise InvalidRequest("the bedrock provider does not return logprobs", param="logprobs")
    if request.temperature is not None and request.temperature > MAX_TEMPERATURE:
        raise InvalidRequest(
            "the bedrock provider takes a temperature between 0 and 1", param="temperature"
        )


# -- messages ------------------------------------------------------------------------------


def _conversation(messages: list[OpenAIMessage]) -> tuple[list[SystemBlock], list[Message]]:
    system: list[SystemBlock] = []
    turns: list[Message] = []
    for i, message in enumerate(messages):
        if isinstance(message, (SystemMessage, DeveloperMessage)):
            system.extend(SystemBlock(text=t) for t in _texts(message.content, i) if t)
        elif isinstance(message, UserMessage):
            _append(turns, "user", _user_blocks(message.content, i))
        elif isinstance(message, AssistantMessage):
            _append(turns, "assistant", _assistant_blocks(message, i))
        elif isinstance(message, ToolMessage):
            _append(turns, "user", [_tool_result(message, i)])
        else:
            raise InvalidRequest(
                "the bedrock provider does not take the legacy functions API: use tools",
                param=f"messages[{i}].role",
            )
    if not any(turn.role == "user" for turn in turns):
        raise InvalidRequest(
            "the bedrock provider needs at least one user message", param="messages"
        )
    if turns[0].role != "user":
        raise InvalidRequest(
            "the bedrock provider needs the conversation (after system messages) "
            "to start with a user message",
            param="messages",
        )
    for turn in turns:
        if turn.role == "user":
            # Claude wants the results of the previous turn's tool calls first.
            turn.content.sort(key=lambda block: block.tool_result is None)
    return system, turns


def _append(turns: list[Message], role: str, blocks: list[ContentBlock]) -> None:
    if not blocks:
        return
    if turns and turns[-1].role == role:
        turns[-1].content.extend(blocks)
    else:
        turns.append(Message(role=role, content=blocks))


def _texts(content: str | list[ContentPart], i: int) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        else:
            raise _unsupported_part(part, i, j, "here only text")
    return texts


def _user_blocks(content: str | list[ContentPart], i: int) -> list[ContentBlock]:
    if isinstance(content, str):
        return [ContentBlock(text=content)] if content else []
    blocks = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            if part.text:
                blocks.append(ContentBlock(text=part.text))
        elif isinstance(part, ImagePart):
            blocks.append(ContentBlock(image=_image(part, i, j)))
        else:
            raise _unsupported_part(part, i, j, "text and base64 images")
    return blocks


def _unsupported_part(part: ContentPart, i: int, j: int, takes: str) -> InvalidRequest:
    kind = type(part).__name__.removesuffix("Part").lower()
    return InvalidRequest(
        f"the bedrock provider does not take {kind} content parts ({takes})",
        param=f"messages[{i}].content[{j}]",
    )


def _image(part: ImagePart, i: int, j: int) -> ImageBlock:
    url = part.image_url.url
    param = f"messages[{i}].content[{j}].image_url.url"
    match = _DATA_URL_RE.fullmatch(url.strip())
    if match is None:
        if url.startswith(("http://", "https://")):
            raise InvalidRequest(
                "the bedrock provider does not fetch image URLs: send the image inline as "
                "a base64 data URL (data:image/png;base64,...)",
                param=param,
            )
        raise InvalidRequest("an image must be a base64 data URL", param=param)
    image_format = IMAGE_FORMATS.get(match["mime"].lower())
    if image_format is None:
        raise InvalidRequest(
            f"the bedrock provider takes png, jpeg, gif and webp images, not {match['mime']}",
            param=param,
        )
    return ImageBlock(format=image_format, source=ImageSource(data=match["data"]))


def _assistant_blocks(message: AssistantMessage, i: int) -> list[ContentBlock]:
    if message.function_call is not None:
        raise InvalidRequest(
            "the bedrock provider does not take the legacy functions API: use tools",
            param=f"messages[{i}].function_call",
        )
    blocks: list[ContentBlock] = []
    if message.content:
        blocks.extend(ContentBlock(text=t) for t in _texts(message.content, i) if t)
    for j, call in enumerate(message.tool_calls or ()):
        blocks.append(
            ContentBlock(
                tool_use=ToolUseBlock(
                    tool_use_id=tool_use_id(call.id),
                    name=call.function.name,
                    input=_arguments(call.function.arguments, i, j),
                )
            )
        )
    return blocks


def _arguments(arguments: str, i: int, j: int) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest(
            "tool call arguments must be a JSON object",
            param=f"messages[{i}].tool_calls[{j}].function.arguments",
        )
    return value


def _tool_result(message: ToolMessage, i: int) -> ContentBlock:
    content: list[ToolResultContent] = []
    if isinstance(message.content, str):
        content.append(ToolResultContent(text=message.content))
    else:
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                content.append(ToolResultContent(text=part.text))
            elif isinstance(part, ImagePart):
                content.append(ToolResultContent(image=_image(part, i, j)))
            else:
                raise _unsupported_part(part, i, j, "text and base64 images")
    return ContentBlock(
        tool_result=ToolResultBlock(
            tool_use_id=tool_use_id(message.tool_call_id),
            content=content or [ToolResultContent(text="")],
        )
    )


def tool_use_id(call_id: str) -> str:
    """Converse ids match ``[a-zA-Z0-9_.:-]+`` (64 at most); OpenAI's are looser. The same
    id maps to the same value, so a call and its result still pair up."""
    cleaned = _TOOL_ID_BAD_CHARS_RE.sub("_", call_id)[:_TOOL_ID_MAX]
    return cleaned or "call"


def _trim_prefill(turns: list[Message]) -> bool:
    last = turns[-1]
    if last.role != "assistant" or not last.content or last.content[-1].text is None:
        return False
    text = last.content[-1].text
    trimmed = text.rstrip()
    if trimmed == text:
        return False
    if trimmed:
        last.content[-1] = ContentBlock(text=trimmed)
    else:
        last.content.pop()
        if not last.content:
            turns.pop()
    return True


# -- inference, tools, output ----------------------------------------------------------------


def _inference_config(request: ChatCompletionRequest) -> InferenceConfig | None:
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    config = InferenceConfig(
        max_tokens=request.token_limit,
        temperature=request.temperature,
        top_p=request.top_p,
        stop_sequences=[s for s in stop or () if s] or None,
    )
    return None if config == InferenceConfig() else config


def _tool_config(request: ChatCompletionRequest, turns: list[Message]) -> ToolConfig | None:
    used = _tools_in_history(turns)
    choice = request.tool_choice
    tools = [
        Tool(
            tool_spec=ToolSpec(
                name=tool.function.name,
                description=tool.function.description or None,
                input_schema=ToolInputSchema(json=tool.function.parameters or _EMPTY_OBJECT_SCHEMA),
                strict=True if tool.function.strict else None,
            )
        )
        for tool in request.tools or ()
    ]
    if not tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        raise InvalidRequest(
            "tool_choice asks for a tool but no tools were given", param="tool_choice"
        )
    declared = {tool.tool_spec.name for tool in tools}
    # Converse refuses toolUse/toolResult blocks without a toolConfig naming their tools.
    tools.extend(
        Tool(tool_spec=ToolSpec(name=name, input_schema=ToolInputSchema(json=_EMPTY_OBJECT_SCHEMA)))
        for name in used
        if name not in declared
    )
    if not tools or (choice == "none" and not used):
        return None
    return ToolConfig(tools=tools, tool_choice=_tool_choice(choice))


def _tool_choice(choice: str | NamedToolChoice | None) -> ToolChoice | None:
    if choice == "required":
        return ToolChoice(any=Empty())
    if isinstance(choice, NamedToolChoice):
        return ToolChoice(tool=SpecificToolChoice(name=choice.function.name))
    return None  # auto is every model's default, and some models refuse an explicit choice


def _tools_in_history(turns: list[Message]) -> list[str]:
    names: dict[str, None] = {}  # ordered, unique
    for turn in turns:
        for block in turn.content:
            if block.tool_use is not None:
                names[block.tool_use.name] = None
    return list(names)


def _output_config(request: ChatCompletionRequest) -> OutputConfig | None:
    """``json_schema`` maps to Converse structured output; ``json_object`` has no Converse
    equivalent and is dropped (OpenAI requires the prompt itself to ask for JSON)."""
    response_format = request.response_format
    if response_format is None or response_format.type != "json_schema":
        return None
    spec = response_format.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format",
        )
    name = spec.get("name")
    description = spec.get("description")
    return OutputConfig(
        text_format=OutputFormat(
            type="json_schema",
            structure=OutputFormatStructure(
                json_schema=JsonSchemaDefinition(
                    schema=json.dumps(schema),
                    name=name if isinstance(name, str) and name else None,
                    description=description if isinstance(description, str) else None,
                )
            ),
        )
    )
