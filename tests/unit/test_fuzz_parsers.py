"""Hostile input against every parser and translator: a clean error or a valid answer.

Each property feeds random and adversarial input (arbitrary bytes, deep nesting, huge
strings, invalid UTF-8, NaN and Infinity, a wrong type at every field) and accepts only the
documented outcomes: a parsed value or the module's own clean error. Anything else (a
``KeyError``, a ``RecursionError``, a ``UnicodeDecodeError``) is a bug the gateway would
turn into a 500 or a torn stream.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from middleware.request import CHAT_COMPLETIONS, parse_chat_request
from providers.anthropic.request import to_anthropic
from providers.anthropic.response import from_anthropic
from providers.anthropic.stream import StreamTranslator as AnthropicTranslator
from providers.anthropic.wire import request_encoder
from providers.base import Chunk, UpstreamCall
from providers.bedrock.request import to_converse
from providers.bedrock.response import completion_from_converse
from providers.bedrock.stream import BedrockChunkStream
from providers.bedrock.stream import StreamTranslator as BedrockTranslator
from providers.sse import SSEDecoder, SSEEvent
from resillm.config import AnthropicProviderConfig, Config
from resillm.config_loader import ConfigError, config_from_dict, load_config
from resillm.context import RequestContext
from resillm.errors import InvalidRequest, UpstreamError
from resillm.schema import ChatCompletionRequest
from tests.fakes.bedrock_server import encode_frame, event_frame, exception_frame

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- JSON values -----------------------------------------------------------------------------

_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_SCALARS = st.none() | st.booleans() | st.integers() | _FLOATS | st.text(max_size=30)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
"""Any JSON-ish value; floats include NaN and Infinity (``json.dumps`` writes them bare)."""


def deep(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def deep_bytes(depth: int, kind: str) -> bytes:
    """Nesting too deep to build as Python data and dump: written as text."""
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


VALID_REQUEST: dict[str, Any] = {
    "model": "chat",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ],
    "temperature": 0.5,
    "max_tokens": 10,
    "stop": ["x"],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "stream": False,
    "stream_options": {"include_usage": True},
    "response_format": {"type": "json_object"},
}


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path inside ``value`` (dict keys and list indexes)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from paths_of(item, (*prefix, index))


REQUEST_PATHS = list(paths_of(VALID_REQUEST))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# -- the chat request parser -----------------------------------------------------------------


def parse(body: bytes) -> ChatCompletionRequest | None:
    """The parsed request, or ``None`` after a clean 400; any other exception fails."""
    ctx = RequestContext("req_fuzz", CHAT_COMPLETIONS)
    ctx.body = body
    try:
        parse_chat_request(ctx)
    except InvalidRequest as exc:
        assert exc.status == 400
        json.loads(exc.body())  # the error body itself is valid JSON
        return None
    assert ctx.request is not None and isinstance(ctx.raw, dict)
    return ctx.request


@FUZZ
@given(st.binary(max_size=400))
def test_parser_takes_arbitrary_bytes(body: bytes) -> None:
    parse(body)


@FUZZ
@given(JSON_VALUES)
def test_parser_takes_arbitrary_json_with_nan_and_infinity(value: Any) -> None:
    parse(dumps(value))


@FUZZ
@given(st.sampled_from(REQUEST_PATHS), JSON_VALUES)
def test_parser_takes_a_wrong_type_at_every_field(path: tuple[Any, ...], value: Any) -> None:
    parse(dumps(replaced(VALID_REQUEST, path, value)))


@FUZZ
@given(st.sampled_from(REQUEST_PATHS), st.sampled_from(["nan", "inf", "-inf", "1e999", "-0"]))
def test_parser_takes_special_numbers_at_every_field(path: tuple[Any, ...], number: str) -> None:
    marker = "\ue000MARK\ue000"
    body = dumps(replaced(VALID_REQUEST, path, marker)).replace(
        json.dumps(marker).encode(),
        {"nan": b"NaN", "inf": b"Infinity"}.get(number, number.encode()),
    )
    body = body.replace(b"-Infinity", b"-Infinity")
    if number == "-inf":
        body = body.replace(b"-inf", b"-Infinity")
    parse(body)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200_000), st.sampled_from(["list", "dict"]), st.booleans())
def test_parser_takes_any_nesting_depth(depth: int, kind: str, inside: bool) -> None:
    nested = deep_bytes(depth, kind)
    # ``inside``: deep in an otherwise valid request, where unknown fields ride along.
    body = dumps(VALID_REQUEST)[:-1] + b', "extra": ' + nested + b"}" if inside else nested
    parse(body)


def test_parser_rejects_nesting_beyond_the_decoder_limit() -> None:
    assert parse(deep_bytes(100_000, "list")) is None


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(REQUEST_PATHS),
    st.integers(0, 2_000_000),
    st.sampled_from('x\u00e9\U0001f600\\"'),
)
def test_parser_takes_huge_strings_at_every_field(
    path: tuple[Any, ...], size: int, char: str
) -> None:
    parse(dumps(replaced(VALID_REQUEST, path, char * size)))


@FUZZ
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_parser_takes_invalid_utf8_anywhere(position: int, junk: bytes) -> None:
    body = dumps(VALID_REQUEST)
    position %= len(body)
    parse(body[:position] + junk + body[position:])


@FUZZ
@given(st.binary(min_size=1, max_size=6).filter(lambda b: not _is_utf8(b)))
def test_parser_rejects_invalid_utf8_inside_a_string(junk: bytes) -> None:
    body = dumps(VALID_REQUEST).replace(b'"be brief"', b'"be ' + junk + b'"')
    assert parse(body) is None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- the config loader -----------------------------------------------------------------------

MINIMAL_CONFIG: dict[str, Any] = {
    "providers": {"m": {"type": "mock"}},
    "models": {"chat": {"targets": [{"provider": "m", "model": "mock-1"}]}},
}
SECTIONS = ["providers", "models", "server", "auth", "resilience", "budget", "cache", "logging"]
SECTIONS += ["tracing", "admin"]
# Keys the real sections use, so random dicts reach past the first "unknown key" check.
CONFIG_KEYS = st.sampled_from(
    [
        *SECTIONS,
        "type",
        "targets",
        "provider",
        "model",
        "fallbacks",
        "keys",
        "key",
        "name",
        "models",
        "port",
        "host",
        "timeout",
        "retries",
        "limits",
        "window",
        "usd",
        "ttl",
        "enabled",
        "backend",
        "level",
        "api_key",
        "base_url",
        "endpoint",
        "exporter",
        "max_request_bytes",
        "action",
        "weight",
        "strategy",
    ]
) | st.text(max_size=6)
CONFIG_VALUES = st.recursive(
    _SCALARS | st.sampled_from(["mock", "1s", "10ms", "-1s", "${HOME}", "${NOPE_UNSET}", "$${X}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(CONFIG_KEYS, inner, max_size=4),
    max_leaves=25,
)


def load(data: Any) -> None:
    try:
        config = config_from_dict(data)
    except ConfigError as exc:
        assert exc.issues and str(exc)
        return
    assert isinstance(config, Config)


@FUZZ
@given(st.dictionaries(CONFIG_KEYS, CONFIG_VALUES, max_size=6))
def test_config_from_dict_takes_arbitrary_dicts(data: dict[str, Any]) -> None:
    load(data)


@FUZZ
@given(st.sampled_from(list(paths_of(MINIMAL_CONFIG))), CONFIG_VALUES)
def test_config_from_dict_takes_a_wrong_type_at_every_field(
    path: tuple[Any, ...], value: Any
) -> None:
    load(replaced(MINIMAL_CONFIG, path, value))


@FUZZ
@given(st.sampled_from(SECTIONS), CONFIG_VALUES)
def test_config_from_dict_takes_arbitrary_sections(section: str, value: Any) -> None:
    load({**MINIMAL_CONFIG, section: value})


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "resillm.yaml"


def load_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert exc.issues and str(exc)
        return
    assert isinstance(config, Config)


# ruamel warns (a reused anchor): under pytest's -W error that would be raised, in a server
# it is a line on stderr and the load goes on.
YAML_WARNINGS_ARE_NOT_ERRORS = pytest.mark.filterwarnings("ignore::ruamel.yaml.error.YAMLWarning")
YAML_PIECES = st.sampled_from(
    [
        "providers:\n",
        "models:\n",
        "  m: {type: mock}\n",
        "  chat:\n    targets:\n      - {provider: m, model: x}\n",
        "server: {port: ${PORT:-8080}}\n",
        "auth:\n  keys:\n    - {name: a, key: k}\n",
        "- ",
        ": ",
        "{",
        "}",
        "[",
        "]",
        "&a ",
        "*a ",
        "!!python/object:os.system ",
        "!!binary ",
        "? ",
        "|\n",
        ">-\n",
        "\t",
        "'",
        '"',
        "\\",
        "${",
        "$${A}",
        "%YAML 1.2\n---\n",
        "---\n",
        "...\n",
        "\ue000",
        "\ue0010\ue000",
        ".nan",
        ".inf",
        "1e999",
        "0x1F",
        "~",
        "<<: *a\n",
        "\n",
        "    ",
        "cache: {ttl: 0s}\n",
        "budget: {limits: []}\n",
    ]
)


@YAML_WARNINGS_ARE_NOT_ERRORS
@FUZZ
@given(st.text(max_size=300))
def test_load_config_takes_arbitrary_text(config_file: Path, text: str) -> None:
    load_file(config_file, text.encode("utf-8", "surrogatepass"))


@YAML_WARNINGS_ARE_NOT_ERRORS
@FUZZ
@given(st.lists(YAML_PIECES | st.text(max_size=5), max_size=25))
def test_load_config_takes_yaml_like_text(config_file: Path, pieces: list[str]) -> None:
    load_file(config_file, "".join(pieces).encode("utf-8", "surrogatepass"))


@YAML_WARNINGS_ARE_NOT_ERRORS
@FUZZ
@given(st.binary(max_size=200))
def test_load_config_takes_arbitrary_bytes(config_file: Path, data: bytes) -> None:
    load_file(config_file, data)


@FUZZ
@given(st.sampled_from(list(paths_of(MINIMAL_CONFIG))), CONFIG_VALUES)
def test_load_config_takes_a_wrong_type_at_every_field(
    config_file: Path, path: tuple[Any, ...], value: Any
) -> None:
    # JSON is YAML (NaN aside, which YAML spells .nan and JSON parsers let through).
    load_file(config_file, dumps(replaced(MINIMAL_CONFIG, path, value)))


@settings(max_examples=4, deadline=None)
@given(st.sampled_from([1, 50, 400, 3_000]), st.sampled_from(["list", "dict"]))
def test_load_config_takes_any_nesting_depth(config_file: Path, depth: int, kind: str) -> None:
    nested = deep_bytes(depth, kind).decode()
    load_file(config_file, f"providers: {nested}\n".encode())


# -- the SSE decoder -------------------------------------------------------------------------

_SSE_PIECES = [b"data: ", b"data:", b"event: ", b"event:x", b": keep", b"\n", b"\r", b"\r\n"]
_SSE_PIECES += [b"\n\n", b"id: 1", b"retry: 5", b"{}", b"[DONE]", b"\xff\xfe", b"\xc3", b" ", b":"]
SSE_BYTES = st.lists(st.sampled_from(_SSE_PIECES) | st.binary(max_size=6), max_size=40).map(
    b"".join
)


def decode_whole(data: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return decoder.feed(data) + decoder.flush()


def decode_pieces(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        events += decoder.feed(data[start:cut])
        start = cut
    events += decoder.feed(data[start:])
    return events + decoder.flush()


@FUZZ
@given(st.binary(max_size=300) | SSE_BYTES, st.lists(st.integers(0, 400), max_size=12))
def test_sse_decoder_gives_the_same_events_however_bytes_are_split(
    data: bytes, cuts: list[int]
) -> None:
    whole = decode_whole(data)
    assert decode_pieces(data, cuts) == whole
    assert decode_pieces(data, list(range(len(data) + 1))) == whole  # one byte a feed
    for event in whole:
        assert isinstance(event.event, str) and isinstance(event.data, bytes)


# -- provider translators: requests ----------------------------------------------------------

_TEXT = st.text(max_size=20)
_DATA_URL = (
    st.sampled_from(
        [
            "data:image/png;base64,iVBORw0KGgo=",
            "data:image/jpeg;base64,!!!",
            "data:;base64,",
            "data:image/png,raw",
            "https://example.com/a.png",
            "",
            "data:application/pdf;base64,JVBERi0=",
        ]
    )
    | _TEXT
)
_PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _DATA_URL})}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("input_audio"),
            "input_audio": st.fixed_dictionaries({"data": _TEXT, "format": _TEXT}),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("file"),
            "file": st.dictionaries(
                st.sampled_from(["file_data", "filename", "file_id"]), _DATA_URL | JSON_VALUES
            ),
        }
    ),
    st.fixed_dictionaries({"type": st.just("refusal"), "refusal": _TEXT}),
)
_CONTENT = _TEXT | st.lists(_PARTS, max_size=3)
_ARGUMENTS = st.sampled_from(["{}", '{"a": 1}', "[]", "null", "", "{", '"s"', "NaN"]) | _TEXT
_TOOL_CALL = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["c1", "c2", "", "x" * 100, "a b/c"]) | _TEXT,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": _TEXT, "arguments": _ARGUMENTS}),
    }
)
_MESSAGES = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user"]), "content": _CONTENT}
    ),
    st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={
            "content": st.none() | _CONTENT,
            "tool_calls": st.lists(_TOOL_CALL, max_size=2),
            "refusal": _TEXT,
            "function_call": st.fixed_dictionaries({"name": _TEXT, "arguments": _ARGUMENTS}),
        },
    ),
    st.fixed_dictionaries(
        {
            "role": st.just("tool"),
            "tool_call_id": st.sampled_from(["c1", "c2", ""]) | _TEXT,
            "content": _CONTENT,
        }
    ),
    st.fixed_dictionaries(
        {"role": st.just("function"), "name": _TEXT, "content": st.none() | _TEXT}
    ),
)
_SCHEMA = st.none() | st.dictionaries(
    st.sampled_from(["type", "properties", "required"]), JSON_VALUES
)
_TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["f", "g", ""]) | _TEXT},
            optional={"description": _TEXT, "parameters": _SCHEMA, "strict": st.booleans()},
        ),
    }
)
_NUMBER = st.integers(-5, 5) | st.floats(-3, 3) | st.floats(allow_nan=True, allow_infinity=True)
REQUESTS = st.fixed_dictionaries(
    {"model": st.just("chat"), "messages": st.lists(_MESSAGES, min_size=1, max_size=5)},
    optional={
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "max_tokens": st.integers(-1, 2**70),
        "max_completion_tokens": st.integers(-1, 2**40),
        "temperature": _NUMBER,
        "top_p": _NUMBER,
        "n": st.integers(0, 3),
        "stop": _TEXT | st.lists(_TEXT, max_size=5),
        "presence_penalty": _NUMBER,
        "frequency_penalty": _NUMBER,
        "logit_bias": st.dictionaries(_TEXT, _NUMBER, max_size=2),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 30),
        "seed": st.integers(),
        "user": _TEXT,
        "tools": st.lists(_TOOL, max_size=3),
        "tool_choice": st.sampled_from(["none", "auto", "required"])
        | st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": _TEXT})}
        ),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema"])},
            optional={
                "json_schema": st.dictionaries(
                    st.sampled_from(["name", "schema", "strict", "description"]), JSON_VALUES
                )
            },
        ),
        "audio": JSON_VALUES,
        "modalities": JSON_VALUES,
    },
)


def valid_request(raw: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return msgspec.convert(raw, ChatCompletionRequest)
    except msgspec.ValidationError:
        assume(False)
        raise  # unreachable: assume(False) stops the example


def encodes(body: Any, encoder: msgspec.json.Encoder = request_encoder) -> dict[str, Any]:
    encoded = json.loads(encoder.encode(body))
    assert isinstance(encoded, dict)
    return encoded


@FUZZ
@given(REQUESTS, st.booleans(), st.integers(1, 100_000))
def test_to_anthropic_translates_or_refuses(
    raw: dict[str, Any], stream: bool, default_max_tokens: int
) -> None:
    request = valid_request(raw)
    config = AnthropicProviderConfig(default_max_tokens=default_max_tokens)
    try:
        translated = to_anthropic(request, raw, model="claude", config=config, stream=stream)
    except InvalidRequest as exc:
        assert exc.status == 400
        return
    body = encodes(translated.body)
    assert body["model"] == "claude" and body["max_tokens"] >= 1
    assert body["messages"], "Anthropic needs at least one message"


@FUZZ
@given(REQUESTS)
def test_to_converse_translates_or_refuses(raw: dict[str, Any]) -> None:
    request = valid_request(raw)
    try:
        translated = to_converse(request)
    except InvalidRequest as exc:
        assert exc.status == 400
        return
    body = encodes(translated.body, msgspec.json.Encoder())
    assert "messages" in body


# -- provider translators: answers -----------------------------------------------------------

_ANTHROPIC_BLOCKS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
    st.fixed_dictionaries(
        {"type": st.just("tool_use")},
        optional={"id": _TEXT, "name": _TEXT, "input": JSON_VALUES},
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["thinking", "redacted_thinking", ""])}),
    JSON_VALUES,
)
_USAGE = st.dictionaries(
    st.sampled_from(
        [
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "inputTokens",
            "outputTokens",
            "totalTokens",
            "cacheReadInputTokens",
            "cacheWriteInputTokens",
        ]
    ),
    st.integers(-(2**64), 2**64) | JSON_VALUES,
)
_STOP_REASONS = (
    st.sampled_from(["end_turn", "max_tokens", "tool_use", "refusal", "x"]) | JSON_VALUES
)
ANTHROPIC_MESSAGES = st.fixed_dictionaries(
    {},
    optional={
        "id": _TEXT | JSON_VALUES,
        "type": st.just("message"),
        "model": _TEXT,
        "content": st.lists(_ANTHROPIC_BLOCKS, max_size=4) | JSON_VALUES,
        "stop_reason": _STOP_REASONS,
        "usage": _USAGE | JSON_VALUES,
    },
)


@FUZZ
@given(ANTHROPIC_MESSAGES | JSON_VALUES, st.sampled_from(["", " ", "\n "]))
def test_from_anthropic_translates_or_fails_cleanly(body: Any, suffix: str) -> None:
    try:
        completion = from_anthropic(
            dumps(body), provider="claude", model="m", prefill_suffix=suffix
        )
    except UpstreamError:
        return
    assert json.loads(completion.body)["object"] == "chat.completion"


@FUZZ
@given(st.binary(max_size=200))
def test_from_anthropic_takes_arbitrary_bytes(body: bytes) -> None:
    with contextlib.suppress(UpstreamError):
        from_anthropic(body, provider="claude", model="m")


ANTHROPIC_EVENTS = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("message_start")},
        optional={"message": ANTHROPIC_MESSAGES | JSON_VALUES},
    ),
    st.fixed_dictionaries(
        {"type": st.just("content_block_start")},
        optional={"index": st.integers(-2, 3) | JSON_VALUES, "content_block": _ANTHROPIC_BLOCKS},
    ),
    st.fixed_dictionaries(
        {"type": st.just("content_block_delta")},
        optional={
            "index": st.integers(-2, 3),
            "delta": st.fixed_dictionaries(
                {
                    "type": st.sampled_from(
                        ["text_delta", "input_json_delta", "thinking_delta", "x"]
                    )
                },
                optional={"text": _TEXT, "partial_json": _TEXT},
            )
            | JSON_VALUES,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("message_delta")},
        optional={
            "delta": st.fixed_dictionaries({}, optional={"stop_reason": _STOP_REASONS}),
            "usage": _USAGE,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message_stop", "content_block_stop", "ping", "error", "new"])},
        optional={"error": JSON_VALUES, "index": st.integers(0, 3)},
    ),
    JSON_VALUES,
)
ANTHROPIC_SSE = st.tuples(
    st.sampled_from(["", "message_start", "content_block_delta", "error", "ping", "x"]),
    ANTHROPIC_EVENTS.map(dumps) | st.binary(max_size=30),
)


@FUZZ
@given(st.lists(ANTHROPIC_SSE, max_size=12), st.sampled_from(["", " ", "\n"]), st.booleans())
def test_anthropic_stream_translator_gives_chunks_or_upstream_error(
    events: list[tuple[str, bytes]], suffix: str, include_usage: bool
) -> None:
    translator = AnthropicTranslator(
        provider="claude", model="m", include_usage=include_usage, prefill_suffix=suffix
    )
    chunks: list[Chunk] = []
    try:
        for name, data in events:
            chunks += translator.feed(SSEEvent(name or "message", data))
        translator.check_complete()
    except UpstreamError:
        pass
    for chunk in chunks:
        assert json.loads(chunk.data)["object"] == "chat.completion.chunk"


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "output": st.fixed_dictionaries(
                {},
                optional={
                    "message": st.fixed_dictionaries(
                        {},
                        optional={
                            "role": _TEXT,
                            "content": st.lists(
                                st.dictionaries(
                                    st.sampled_from(["text", "toolUse", "reasoningContent"]),
                                    JSON_VALUES
                                    | st.fixed_dictionaries(
                                        {"toolUseId": _TEXT, "name": _TEXT, "input": JSON_VALUES}
                                    ),
                                ),
                                max_size=3,
                            ),
                        },
                    )
                },
            )
            | JSON_VALUES,
            "stopReason": _STOP_REASONS,
            "usage": _USAGE,
        },
    )
    | JSON_VALUES,
    st.booleans(),
)
def test_converse_answer_translates_or_fails_cleanly(body: Any, strip: bool) -> None:
    try:
        completion = completion_from_converse(
            dumps(body),
            provider="bedrock",
            model="m",
            request_id="r",
            strip_leading_whitespace=strip,
        )
    except UpstreamError:
        return
    assert json.loads(completion.body)["object"] == "chat.completion"


# -- Bedrock event streams -------------------------------------------------------------------


class ScriptedContent:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    async def readany(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


class ScriptedResponse:
    def __init__(self, pieces: list[bytes]) -> None:
        self.content = ScriptedContent(pieces)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def frame_with_raw_headers(headers: bytes, payload: bytes) -> bytes:
    """A frame with valid CRCs around any header bytes (types, lengths, UTF-8 unchecked)."""
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(headers))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + headers + payload
    return message + struct.pack("!I", binascii.crc32(message) & 0xFFFFFFFF)


def raw_header(name: bytes, kind: int, value: bytes) -> bytes:
    return struct.pack("!B", len(name) % 256) + name + struct.pack("!B", kind) + value


BEDROCK_EVENT_BODIES = st.one_of(
    st.fixed_dictionaries(
        {
            "start": st.fixed_dictionaries(
                {},
                optional={
                    "toolUse": JSON_VALUES
                    | st.fixed_dictionaries({"toolUseId": _TEXT, "name": _TEXT})
                },
            )
        },
        optional={"contentBlockIndex": st.integers(-3, 3) | JSON_VALUES},
    ),
    st.fixed_dictionaries(
        {
            "delta": st.fixed_dictionaries(
                {},
                optional={
                    "text": _TEXT | JSON_VALUES,
                    "toolUse": st.fixed_dictionaries({"input": _TEXT}),
                },
            )
        },
        optional={"contentBlockIndex": st.integers(-3, 3)},
    ),
    st.fixed_dictionaries({}, optional={"stopReason": _STOP_REASONS}),
    st.fixed_dictionaries({}, optional={"usage": _USAGE | JSON_VALUES}),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
)
_EVENT_TYPES = ["messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop"]
BEDROCK_EVENT_TYPES = st.sampled_from([*_EVENT_TYPES, "messageStop", "metadata", "unknown", ""])
_VALID_FRAMES = st.builds(event_frame, BEDROCK_EVENT_TYPES, BEDROCK_EVENT_BODIES)
_EXCEPTION_FRAMES = st.builds(
    exception_frame,
    st.sampled_from(["throttlingException", "modelStreamErrorException", "", "x:y#z"]) | _TEXT,
    _TEXT,
)
_ODD_FRAMES = st.one_of(
    st.builds(
        encode_frame,
        st.dictionaries(
            st.sampled_from(
                [":message-type", ":event-type", ":exception-type", ":error-code", ":error-message"]
            ),
            st.sampled_from(["event", "exception", "error", "metadata", ""]) | _TEXT,
            max_size=4,
        ),
        st.binary(max_size=40) | JSON_VALUES.map(dumps),
    ),
    st.builds(
        frame_with_raw_headers,
        st.lists(
            st.builds(
                raw_header,
                st.sampled_from([b":message-type", b":event-type", b"\xff\xfe", b""])
                | st.binary(max_size=4),
                st.integers(0, 255),
                st.binary(max_size=20),
            ),
            max_size=3,
        ).map(b"".join)
        | st.binary(max_size=30),
        st.binary(max_size=30),
    ),
)


@st.composite
def corrupted(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> bytes:
    """A frame with one byte flipped, or cut short."""
    frame = draw(frames)
    position = draw(st.integers(0, len(frame) - 1))
    if draw(st.booleans()):
        return frame[:position]
    return (
        frame[:position]
        + bytes([frame[position] ^ draw(st.integers(1, 255))])
        + frame[position + 1 :]
    )


BEDROCK_FRAMES = st.one_of(
    _VALID_FRAMES,
    _EXCEPTION_FRAMES,
    _ODD_FRAMES,
    corrupted(_VALID_FRAMES),
    st.binary(min_size=1, max_size=40),
)


def run_bedrock_stream(pieces: list[bytes]) -> tuple[list[Chunk], BaseException | None]:
    raw = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    request = msgspec.convert(raw, ChatCompletionRequest)
    call = UpstreamCall(request, raw, request_id="r", stream=True, stream_idle_s=5.0)
    stream = BedrockChunkStream(
        provider="bedrock",
        model="m",
        response=ScriptedResponse(pieces),  # type: ignore[arg-type]
        call=call,
        translator=BedrockTranslator("m", include_usage=True),
        release=lambda: None,
        secret="sekrit",
    )

    async def collect() -> tuple[list[Chunk], BaseException | None]:
        chunks: list[Chunk] = []
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except UpstreamError as exc:
            return chunks, exc
        return chunks, None

    return asyncio.run(collect())


@FUZZ
@given(st.lists(BEDROCK_FRAMES, max_size=8), st.lists(st.integers(0, 2000), max_size=6))
def test_bedrock_event_stream_gives_chunks_or_upstream_error(
    frames: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(frames)
    pieces: list[bytes] = []
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        if cut > start:
            pieces.append(data[start:cut])
            start = cut
    pieces.append(data[start:])
    chunks, error = run_bedrock_stream([p for p in pieces if p])
    for chunk in chunks:
        body = json.loads(chunk.data)
        assert body["object"] == "chat.completion.chunk"
    if error is not None:
        assert "sekrit" not in str(error)


@FUZZ
@given(
    st.lists(
        st.tuples(BEDROCK_EVENT_TYPES, st.binary(max_size=40) | BEDROCK_EVENT_BODIES.map(dumps)),
        max_size=10,
    )
)
def test_bedrock_translator_gives_chunks_or_a_decode_error(events: list[tuple[str, bytes]]) -> None:
    translator = BedrockTranslator("m", include_usage=True, strip_leading_whitespace=True)
    for event_type, payload in events:
        try:
            chunk = translator.on_event(event_type, payload)
        except msgspec.DecodeError:  # the stream counts it as malformed and goes on
            continue
        if chunk is not None:
            assert json.loads(chunk.data)["object"] == "chat.completion.chunk"
