"""Structured logs: the access line's fields, bodies with redaction, sampling, the request id
on every record, and both formats. The gateway runs in-process with the ``mock`` provider
(no sockets); each test reads the records its loggers emitted."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

import middleware.access_log
from middleware.access_log import access_fields, access_line
from middleware.errors import ErrorsMiddleware
from middleware.request import RequestMiddleware
from resillm.app import Gateway
from resillm.asgi import Message, Receive, Scope, Send
from resillm.config import ClientKeyConfig, LoggingConfig
from resillm.config_loader import config_from_dict
from resillm.context import RequestContext
from resillm.log import (
    ACCESS_LOGGER,
    BATCH_LINES,
    REQUEST_ID,
    BufferedStderrHandler,
    JSONFormatter,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
    direct_handler,
)
from resillm.schema import Usage

pytestmark = pytest.mark.anyio

CLIENT_KEY = "client-key-0123456789"
UPSTREAM_KEY = "upstream-key-9876543210"
SPEC_FIELDS = {
    "request_id",
    "key",
    "model",
    "provider",
    "status",
    "latency_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "attempts",
    "cache",
}


# -- harness ---------------------------------------------------------------------------------


class Capture(logging.Handler):
    """Formats every record it gets, as a configured gateway's handler would."""

    def __init__(self, formatter: logging.Formatter | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter or JSONFormatter())
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def json(self, logger: str | None = None) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.lines]
        return [r for r in records if logger is None or r["logger"] == logger]


@pytest.fixture
def captured() -> Iterator[Capture]:
    """Records of every resillm logger, formatted as JSON lines."""
    handler = Capture()
    logger = logging.getLogger("resillm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def gateway_config(**logging_options: Any) -> dict[str, Any]:
    return {
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY}]},
        "providers": {
            "m": {"type": "mock", "chunks": 4},
            "keyed": {"type": "openai", "api_key": UPSTREAM_KEY},
        },
        "models": {
            "chat": {
                "targets": [{"provider": "m", "model": "mock-1"}],
                "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            },
            "unused": {"targets": [{"provider": "keyed", "model": "gpt-4o"}]},
        },
        "logging": logging_options,
    }


class Response:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(dict(message))

    @property
    def status(self) -> int:
        status: int = self.messages[0]["status"]
        return status

    def header(self, name: bytes) -> bytes | None:
        return dict(self.messages[0]["headers"]).get(name)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


def scope_for(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


def receiver(body: bytes) -> Receive:
    """The body, then nothing until the response ends (the client stays)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def post(
    app: Any,
    payload: dict[str, Any] | bytes,
    *,
    key: str = CLIENT_KEY,
    request_id: bytes | None = None,
    path: str = "/v1/chat/completions",
) -> Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    if request_id is not None:
        headers.append((b"x-request-id", request_id))
    response = Response()
    await app(scope_for(path, headers), receiver(body), response)
    return response


async def run(config: dict[str, Any], *payloads: dict[str, Any] | bytes) -> list[Response]:
    gateway = Gateway(config_from_dict(config))
    try:
        return [await post(gateway, payload) for payload in payloads]
    finally:
        await gateway.stop()


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **extra}


# -- the access line -------------------------------------------------------------------------


async def test_access_line_is_json_with_the_spec_fields(captured: Capture) -> None:
    (response,) = await run(gateway_config(), chat())
    assert response.status == 200
    (line,) = captured.json(ACCESS_LOGGER)
    assert SPEC_FIELDS <= set(line)
    answer = json.loads(response.body)
    assert line["msg"] == "request"
    assert line["level"] == "info"
    assert line["request_id"] == response.header(b"x-request-id").decode()  # type: ignore[union-attr]
    assert line["key"] == "team-a"
    assert line["model"] == "chat"
    assert line["provider"] == "m"
    assert line["status"] == 200
    assert line["attempts"] == 1
    assert line["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == answer["usage"]["completion_tokens"]
    usage = answer["usage"]
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert line["cost"] == pytest.approx(expected)
    assert line["latency_ms"] >= 0
    assert line["ttft_ms"] is None  # not a stream
    assert "request_body" not in line and "response_body" not in line
    assert "trace_id" not in line  # tracing is off


async def test_stream_line_has_time_to_first_token(captured: Capture) -> None:
    (response,) = await run(gateway_config(), chat(stream=True))
    assert response.status == 200
    (line,) = captured.json(ACCESS_LOGGER)
    assert line["stream"] is True
    assert line["ttft_ms"] >= 0
    assert line["completion_tokens"] > 0


async def test_keys_are_never_logged(captured: Capture) -> None:
    text = f"my keys are {CLIENT_KEY} and {UPSTREAM_KEY}"
    config = gateway_config(log_responses=True, redact_pii=False)
    await run(config, chat(text), chat(text, model="nope"))
    assert len(captured.json(ACCESS_LOGGER)) == 2
    everything = "\n".join(captured.lines)
    assert CLIENT_KEY not in everything
    assert UPSTREAM_KEY not in everything
    first = captured.json(ACCESS_LOGGER)[0]
    assert first["request_body"]["messages"][0]["content"] == "my keys are *** and ***"


async def test_bodies_are_logged_redacted_when_asked(captured: Capture) -> None:
    secret = "write to bob@example.com, card 4111 1111 1111 1111, from 10.0.0.7"
    (response,) = await run(gateway_config(log_responses=True), chat(secret))
    (line,) = captured.json(ACCESS_LOGGER)
    content = line["request_body"]["messages"][0]["content"]
    assert content == "write to [EMAIL], card [CARD], from [IP]"
    assert line["request_body"]["model"] == "chat"
    assert line["response_body"] == json.loads(response.body)  # nothing in it to redact
    assert "bob@example.com" not in "\n".join(captured.lines)


async def test_stream_text_is_logged_as_delivered(captured: Capture) -> None:
    (response,) = await run(gateway_config(log_responses=True), chat(stream=True))
    text = ""
    for line in response.body.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice["delta"].get("content") or ""
    (logged,) = captured.json(ACCESS_LOGGER)
    assert text and logged["response_text"] == text
    assert "response_body" not in logged


async def test_invalid_body_is_logged_as_redacted_text(captured: Capture) -> None:
    (response,) = await run(gateway_config(log_responses=True), b"{oops bob@example.com")
    assert response.status == 400
    (line,) = captured.json(ACCESS_LOGGER)
    assert line["request_body"] == "{oops [EMAIL]"
    assert line["level"] == "warning"


# -- sampling ---------------------------------------------------------------------------------


async def test_sampling_drops_successes_and_keeps_every_error(captured: Capture) -> None:
    config = gateway_config(sample_rate=0.0)
    payloads = [chat(), chat(model="nope"), chat(), chat(model="nope"), b"not json"]
    responses = await run(config, *payloads)
    assert [r.status for r in responses] == [200, 404, 200, 404, 400]
    assert [line["status"] for line in captured.json(ACCESS_LOGGER)] == [404, 404, 400]


async def test_sampling_keeps_its_share_of_successes(
    captured: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws = iter([0.1, 0.9, 0.3, 0.7] * 5)
    monkeypatch.setattr(middleware.access_log.random, "random", lambda: next(draws))
    await run(gateway_config(sample_rate=0.5), *[chat() for _ in range(20)])
    assert len(captured.json(ACCESS_LOGGER)) == 10


async def test_slow_requests_are_always_logged(captured: Capture) -> None:
    config = gateway_config(sample_rate=0.0, slow_request_s="20ms")
    config["providers"]["m"]["latency"] = "40ms"
    await run(config, chat())
    (line,) = captured.json(ACCESS_LOGGER)
    assert line["status"] == 200 and line["latency_ms"] >= 20


# -- the request id on every record --------------------------------------------------------------


async def test_request_id_is_on_every_record_logged_during_the_request(captured: Capture) -> None:
    inner_ids: list[str | None] = []

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        inner_ids.append(REQUEST_ID.get())
        logging.getLogger("resillm.relay").warning("something happened upstream")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = RequestMiddleware(endpoint, max_request_bytes=1024)
    await post(app, chat(), request_id=b"trace-42")
    await post(app, chat())
    first, second = captured.json("resillm.relay")
    assert first["request_id"] == "trace-42"
    assert second["request_id"].startswith("req_")
    assert inner_ids == ["trace-42", second["request_id"]]
    assert REQUEST_ID.get() is None  # reset once the request is over
    logging.getLogger("resillm.relay").warning("outside any request")
    assert "request_id" not in captured.json("resillm.relay")[2]


async def test_unexpected_error_is_logged_with_its_request_id(captured: Capture) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    app = ErrorsMiddleware(RequestMiddleware(broken, max_request_bytes=1024))
    response = await post(app, chat(), request_id=b"trace-500")
    assert response.status == 500
    (line,) = captured.json("resillm.errors")
    assert line["request_id"] == "trace-500"
    assert "RuntimeError: boom" in line["exception"]


# -- formats -----------------------------------------------------------------------------------


def access_record(fields: dict[str, Any]) -> logging.LogRecord:
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "request", (), None)
    record.fields = fields
    return record


def test_text_format_is_one_readable_line() -> None:
    record = access_record(
        {
            "request_id": "req_1",
            "status": 200,
            "model": "chat",
            "stream": False,
            "error": None,
            "latency_ms": 12.5,
            "path": "/v1/chat/completions",
            "message": "two words",
            "request_body": {"messages": [{"content": "hi\nthere"}]},
        }
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert " INFO resillm.access request request_id=req_1 status=200 model=chat" in line
    assert "stream=false latency_ms=12.5 path=/v1/chat/completions" in line
    assert 'message="two words"' in line
    assert 'request_body={"messages":[{"content":"hi\\nthere"}]}' in line
    assert "error=" not in line  # empty fields are left out


def test_text_format_adds_the_request_id_of_other_records() -> None:
    record = logging.LogRecord("resillm.relay", logging.WARNING, __file__, 1, "cut", (), None)
    token = REQUEST_ID.set("req_9")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    assert TextFormatter().format(record).endswith("WARNING resillm.relay cut request_id=req_9")


def test_json_format_holds_fields_and_exceptions() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord(
            "resillm.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
        )
    record.fields = {"a": 1}
    line = json.loads(JSONFormatter().format(record))
    assert line["msg"] == "failed here"
    assert line["level"] == "error"
    assert line["a"] == 1
    assert line["ts"].endswith("Z")
    assert "ValueError: bad" in line["exception"]


@pytest.fixture
def restore_resillm_logger() -> Iterator[None]:
    logger = logging.getLogger("resillm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    library = logging.getLogger("opentelemetry")  # configure_logging forwards its warnings
    library_handlers = list(library.handlers)
    try:
        yield
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        library.handlers[:] = library_handlers


@pytest.mark.usefixtures("restore_resillm_logger")
def test_configure_logging_writes_json_lines_with_request_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging(LoggingConfig(level="info", format="json"))
    configure_logging(LoggingConfig(level="info", format="json"))  # idempotent: one handler
    token = REQUEST_ID.set("req_abc")
    try:
        logging.getLogger("resillm.providers").warning("slow upstream")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("resillm.providers").debug("hidden at info")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "slow upstream"
    assert record["request_id"] == "req_abc"
    assert record["logger"] == "resillm.providers"


@pytest.mark.usefixtures("restore_resillm_logger")
async def test_access_lines_go_straight_to_the_json_handler_as_it_would_format_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging(LoggingConfig(level="info", format="json"))
    handler = direct_handler(logging.getLogger(ACCESS_LOGGER))
    assert handler is not None and handler.formatter is not None
    fields = {"request_id": "req_1", "status": 502, "model": "chat", "error": "upstream"}
    assert handler.write_fields(logging.WARNING, ACCESS_LOGGER, "request", fields)
    record = logging.LogRecord(ACCESS_LOGGER, logging.WARNING, "", 0, "request", None, None)
    record.fields = fields
    expected = json.loads(handler.formatter.format(record))
    (line,) = stream.getvalue().splitlines()  # a warning: flushed at once
    written = json.loads(line)
    assert written.pop("ts")[:16] == expected.pop("ts")[:16]  # same format, same minute
    assert list(written.items()) == list(expected.items())  # same keys, order and values
    # Through the gateway: the access line of a request is written the same way.
    (response,) = await run(gateway_config(), chat())
    handler.flush_now()
    access = [json.loads(x) for x in stream.getvalue().splitlines()[1:] if '"resillm.access"' in x]
    assert [a["status"] for a in access] == [200]
    assert access[0]["request_id"] == response.header(b"x-request-id").decode()  # type: ignore[union-attr]


@pytest.mark.parametrize("traced", [False, True])
def test_the_access_line_holds_the_spec_fields_in_order_as_struct_and_as_dict(
    monkeypatch: pytest.MonkeyPatch, traced: bool
) -> None:
    # The direct path writes the struct, the others its dict: both must be this line.
    monkeypatch.setattr(middleware.access_log.time, "monotonic", lambda: 1000.0)
    ctx = RequestContext("req_1", "/v1/chat/completions")
    ctx.started = 999.87654
    ctx.client_key = ClientKeyConfig(name="team-a", key="sk-secret-key-0001")
    ctx.alias, ctx.provider, ctx.upstream_model, ctx.stream = "chat", "up", "m-1", True
    ctx.attempts, ctx.retries, ctx.fallbacks, ctx.recoveries = 2, 1, 1, ("continued",)
    ctx.ttft_s, ctx.status, ctx.cost, ctx.cache = 0.0421, 200, 0.000012, "miss"
    ctx.usage = Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12)
    if traced:
        ctx.tracer = SimpleNamespace(trace_id="0af7651916cd43dd8448eb211c80319c")  # type: ignore[assignment]
    scope = {"type": "http", "method": "POST"}
    expected: dict[str, Any] = {
        "request_id": "req_1", "method": "POST", "path": "/v1/chat/completions",
        "status": 200, "key": "team-a", "model": "chat", "provider": "up",
        "upstream_model": "m-1", "stream": True, "attempts": 2, "retries": 1,
        "fallbacks": 1, "recoveries": ["continued"], "latency_ms": 123.46, "ttft_ms": 42.1,
        "prompt_tokens": 5, "completion_tokens": 7, "cost": 0.000012, "cache": "miss",
        "error": None,
    }  # fmt: skip
    if traced:
        expected["trace_id"] = "0af7651916cd43dd8448eb211c80319c"
    for line in (access_line(scope, ctx), access_fields(scope, ctx)):
        decoded = json.loads(msgspec.json.encode(line))
        assert list(decoded.items()) == list(expected.items())
    bare = RequestContext("req_2", "/v1/models")  # nothing learned: nulls and zeros
    fields = access_fields(scope, bare)
    assert (fields["key"], fields["cost"], fields["prompt_tokens"]) == (None, None, None)
    assert (fields["attempts"], fields["recoveries"], "trace_id" in fields) == (0, None, False)


@pytest.fixture
def real_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, restore_resillm_logger: None
) -> Iterator[tuple[BufferedStderrHandler, Path]]:
    """resillm's JSON handler on a stderr with a file descriptor (it then writes access
    lines as bytes under its text layer), and the file it writes to."""
    path = tmp_path / "stderr"
    with open(path, "w+", encoding="utf-8") as stderr:
        monkeypatch.setattr("sys.stderr", stderr)
        configure_logging(LoggingConfig(level="info", format="json"))
        handler = direct_handler(logging.getLogger(ACCESS_LOGGER))
        assert handler is not None
        yield handler, path


def written(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_lines_written_as_bytes_and_as_records_keep_their_order_on_a_real_stderr(
    real_stderr: tuple[BufferedStderrHandler, Path],
) -> None:
    # Both kinds of line must reach the file whole and in order.
    handler, path = real_stderr
    other = logging.getLogger("resillm.router")
    other.info("first")
    assert handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"status": 200})
    other.info("third ✓")
    assert handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"path": "/v1/é"})
    # Fields that would replace the line's own keys, and no fields: still one JSON line.
    assert handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"msg": "mine"})
    assert handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {})
    handler.flush_now()
    lines = written(path)
    assert [(x["logger"], x.get("msg"), x.get("status"), x.get("path")) for x in lines] == [
        ("resillm.router", "first", None, None),
        (ACCESS_LOGGER, "request", 200, None),
        ("resillm.router", "third ✓", None, None),
        (ACCESS_LOGGER, "request", None, "/v1/é"),
        (ACCESS_LOGGER, "mine", None, None),
        (ACCESS_LOGGER, "request", None, None),
    ]
    assert all(list(x)[:4] == ["ts", "level", "logger", "msg"] for x in lines)


def test_access_lines_are_written_in_batches_and_warnings_at_once(
    real_stderr: tuple[BufferedStderrHandler, Path],
) -> None:
    handler, path = real_stderr
    handler._stop.set()  # no timed flush in between: the batches alone
    binary = handler._binary
    assert binary is not None
    binary.flush()
    for serial in range(BATCH_LINES - 1):
        handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"serial": serial})
    binary.flush()
    assert written(path) == []  # kept, to be encoded together
    handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"serial": BATCH_LINES - 1})
    binary.flush()
    assert [x["serial"] for x in written(path)] == list(range(BATCH_LINES))
    handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"serial": "kept"})
    handler.write_fields(logging.WARNING, ACCESS_LOGGER, "request", {"status": 502})
    lines = written(path)  # a warning is flushed at once, after what came before it
    assert [x.get("serial") for x in lines[-2:]] == ["kept", None]
    assert (lines[-1]["level"], lines[-1]["status"]) == ("warning", 502)


@pytest.mark.usefixtures("restore_resillm_logger")
def test_a_host_handler_or_text_format_gets_access_records_the_usual_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    configure_logging(LoggingConfig(level="info", format="json"))
    access = logging.getLogger(ACCESS_LOGGER)
    host = Capture()
    access.addHandler(host)
    try:
        assert direct_handler(access) is None  # the host's handler must see every record
    finally:
        access.removeHandler(host)
    configure_logging(LoggingConfig(level="info", format="text"))
    handler = direct_handler(access)
    assert handler is not None
    assert not handler.write_fields(logging.INFO, ACCESS_LOGGER, "request", {"status": 200})
