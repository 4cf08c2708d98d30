"""The raw-ASGI layers, each against a tiny ASGI app and a ``send`` that records every message."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import pytest

from middleware.access_log import AccessLogMiddleware
from middleware.auth import AuthMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.request import RequestMiddleware
from resillm.asgi import ASGIApp, Message, Receive, Scope, Send
from resillm.config import ClientKeyConfig, LoggingConfig
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import AuthenticationFailed, GatewayError, ModelNotFound, UpstreamTimeout

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
HELLO_BYTES = json.dumps(HELLO).encode()
ERROR_KEYS = {"message", "type", "code", "param"}


# -- a tiny ASGI harness -----------------------------------------------------------------------


def make_scope(
    method: str = "POST",
    path: str = CHAT,
    headers: Iterable[tuple[bytes, bytes]] = (),
    root_path: str = "",
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


class Receiver:
    """``receive`` fed from a list; ``http.disconnect`` once the list is used up."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = list(messages)
        self.calls = 0

    async def __call__(self) -> Message:
        self.calls += 1
        if self.messages:
            return self.messages.pop(0)
        return {"type": "http.disconnect"}


def body_messages(*chunks: bytes) -> list[Message]:
    if not chunks:
        return [{"type": "http.request", "body": b"", "more_body": False}]
    return [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]


class Recorder:
    """A ``send`` that keeps every message, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(dict(message))

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return starts[0]

    @property
    def status(self) -> int:
        status: int = self.start["status"]
        return status

    def headers(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.start["headers"] if key == name]

    def header(self, name: bytes) -> bytes | None:
        values = self.headers(name)
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        body = self.json()
        assert set(body) == {"error"}
        assert ERROR_KEYS <= set(body["error"])
        error: dict[str, Any] = body["error"]
        return error


class Endpoint:
    """The innermost app: records the scope it saw and answers (or raises) as told."""

    def __init__(
        self,
        chunks: Iterable[bytes] = (b'{"ok":true}',),
        raises: BaseException | None = None,
        status: int = 200,
    ) -> None:
        self.chunks = list(chunks)
        self.raises = raises
        self.status = status
        self.scopes: list[Scope] = []

    @property
    def called(self) -> bool:
        return bool(self.scopes)

    @property
    def ctx(self) -> RequestContext:
        return RequestContext.of(self.scopes[-1])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if self.raises is not None:
            raise self.raises
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        for i, chunk in enumerate(self.chunks):
            more = i < len(self.chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})


async def call(
    app: ASGIApp, scope: Scope | None = None, messages: list[Message] | None = None
) -> Recorder:
    recorder = Recorder()
    await app(
        scope if scope is not None else make_scope(),
        Receiver(body_messages(HELLO_BYTES) if messages is None else messages),
        recorder,
    )
    return recorder


def request_stack(endpoint: ASGIApp, max_request_bytes: int = 1 << 20) -> ASGIApp:
    return ErrorsMiddleware(RequestMiddleware(endpoint, max_request_bytes=max_request_bytes))


# -- ErrorsMiddleware ------------------------------------------------------------------------


async def test_gateway_error_is_rendered_as_openai_json_with_its_status() -> None:
    endpoint = Endpoint(raises=ModelNotFound("model 'gtp-4o' does not exist", param="model"))
    recorder = await call(ErrorsMiddleware(endpoint))
    assert recorder.status == 404
    assert recorder.header(b"content-type") == b"application/json"
    assert recorder.header(b"content-length") == str(len(recorder.body)).encode()
    assert recorder.error() == {
        "message": "model 'gtp-4o' does not exist",
        "type": "invalid_request_error",
        "code": "model_not_found",
        "param": "model",
    }
    assert recorder.messages[-1].get("more_body", False) is False


async def test_gateway_error_gets_request_id_from_context() -> None:
    scope = make_scope()
    scope[SCOPE_KEY] = RequestContext("req_abc", CHAT)
    recorder = await call(ErrorsMiddleware(Endpoint(raises=AuthenticationFailed("no key"))), scope)
    assert recorder.status == 401
    assert recorder.header(b"x-request-id") == b"req_abc"


async def test_no_request_id_header_without_context() -> None:
    recorder = await call(ErrorsMiddleware(Endpoint(raises=AuthenticationFailed("no key"))))
    assert recorder.header(b"x-request-id") is None


async def test_error_headers_are_sent() -> None:
    error = GatewayError("circuit open", headers={"Retry-After": "12"})
    recorder = await call(ErrorsMiddleware(Endpoint(raises=error)))
    assert recorder.status == 500
    assert recorder.header(b"retry-after") == b"12"


async def test_upstream_timeout_is_504() -> None:
    recorder = await call(ErrorsMiddleware(Endpoint(raises=UpstreamTimeout("openai: timed out"))))
    assert recorder.status == 504
    assert recorder.error()["code"] == "upstream_timeout"


async def test_unexpected_exception_is_generic_500_without_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_text = "KeyError: db-password=hunter2 at /srv/app.py line 3"
    recorder = await call(ErrorsMiddleware(Endpoint(raises=RuntimeError(secret_text))))
    assert recorder.status == 500
    error = recorder.error()
    assert error["type"] == "server_error"
    assert "hunter2" not in recorder.body.decode()
    assert "RuntimeError" not in recorder.body.decode()
    assert "Traceback" not in recorder.body.decode()
    logged = [r for r in caplog.records if r.name == "resillm.errors"]
    assert logged and logged[0].exc_info is not None  # the traceback goes to the log


async def test_error_after_response_started_is_not_rendered_twice() -> None:
    async def starts_then_fails(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise UpstreamTimeout("stalled")

    # As deployed: the request layer, inside, notes that the response started.
    app = ErrorsMiddleware(RequestMiddleware(starts_then_fails, max_request_bytes=1000))
    recorder = Recorder()
    with pytest.raises(UpstreamTimeout):
        await app(make_scope("GET", "/v1/models"), Receiver([]), recorder)
    assert [m["type"] for m in recorder.messages] == ["http.response.start", "http.response.body"]
    assert recorder.status == 200


async def test_successful_response_passes_through_unchanged() -> None:
    endpoint = Endpoint(chunks=[b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"])
    recorder = await call(ErrorsMiddleware(endpoint))
    assert [m["type"] for m in recorder.messages] == [
        "http.response.start",
        "http.response.body",
        "http.response.body",
        "http.response.body",
    ]
    assert [m.get("more_body") for m in recorder.messages[1:]] == [True, True, False]


async def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        raise ModelNotFound("not rendered for lifespan")

    with pytest.raises(ModelNotFound):
        await ErrorsMiddleware(app)({"type": "lifespan"}, Receiver([]), Recorder())
    assert seen == ["lifespan"]


# -- RequestMiddleware -----------------------------------------------------------------------


async def test_body_is_assembled_from_several_messages() -> None:
    endpoint = Endpoint()
    third = len(HELLO_BYTES) // 3
    pieces = (HELLO_BYTES[:third], b"", HELLO_BYTES[third : 2 * third], HELLO_BYTES[2 * third :])
    recorder = await call(request_stack(endpoint), messages=body_messages(*pieces))
    assert recorder.status == 200
    ctx = endpoint.ctx
    assert ctx.raw == HELLO  # decoded from the whole body
    assert ctx.body == b""  # and not kept twice: the decoded request is what is held
    assert ctx.request is not None and ctx.request.model == "gpt-4o"
    assert ctx.alias == "gpt-4o"
    assert ctx.stream is False
    assert ctx.route == CHAT


async def test_stream_flag_is_read() -> None:
    endpoint = Endpoint()
    body = json.dumps({**HELLO, "stream": True}).encode()
    await call(request_stack(endpoint), messages=body_messages(body))
    assert endpoint.ctx.stream is True


async def test_request_id_is_added_to_the_response_start() -> None:
    endpoint = Endpoint()
    recorder = await call(request_stack(endpoint))
    request_id = recorder.header(b"x-request-id")
    assert request_id is not None
    assert request_id.decode() == endpoint.ctx.request_id
    assert recorder.header(b"content-type") == b"application/json"  # app's headers kept


async def test_streamed_response_is_forwarded_message_by_message() -> None:
    chunks = [b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]
    recorder = await call(request_stack(Endpoint(chunks=chunks)))
    bodies = [m["body"] for m in recorder.messages if m["type"] == "http.response.body"]
    assert bodies == chunks


async def test_sane_client_request_id_is_kept() -> None:
    endpoint = Endpoint()
    scope = make_scope(headers=[(b"x-request-id", b"client-42.a:b_c")])
    recorder = await call(request_stack(endpoint), scope)
    assert endpoint.ctx.request_id == "client-42.a:b_c"
    assert recorder.header(b"x-request-id") == b"client-42.a:b_c"


@pytest.mark.parametrize(
    "given",
    [b"has spaces in it", b"a" * 500, b"", b"<script>", "caf\u00e9".encode()],
    ids=["spaces", "500-chars", "empty", "markup", "non-ascii"],
)
async def test_insane_client_request_id_is_replaced(given: bytes) -> None:
    endpoint = Endpoint()
    recorder = await call(request_stack(endpoint), make_scope(headers=[(b"x-request-id", given)]))
    request_id = endpoint.ctx.request_id
    assert request_id.encode() != given
    assert request_id.startswith("req_")
    assert len(request_id) <= 128
    assert recorder.header(b"x-request-id") == request_id.encode()


async def test_request_id_with_trailing_newline_is_replaced() -> None:
    endpoint = Endpoint()
    await call(request_stack(endpoint), make_scope(headers=[(b"x-request-id", b"abc\n")]))
    assert "\n" not in endpoint.ctx.request_id


async def test_generated_request_ids_are_unique() -> None:
    endpoint = Endpoint()
    for _ in range(3):
        await call(request_stack(endpoint))
    ids = {RequestContext.of(scope).request_id for scope in endpoint.scopes}
    assert len(ids) == 3


async def test_declared_content_length_over_limit_is_413_without_reading() -> None:
    endpoint = Endpoint()
    receiver = Receiver(body_messages(HELLO_BYTES))
    recorder = Recorder()
    scope = make_scope(headers=[(b"content-length", b"5000")])
    await request_stack(endpoint, max_request_bytes=1000)(scope, receiver, recorder)
    assert recorder.status == 413
    error = recorder.error()
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert receiver.calls == 0
    assert not endpoint.called
    assert recorder.header(b"x-request-id") is not None


async def test_streamed_body_over_limit_is_413() -> None:
    endpoint = Endpoint()
    chunks = [b"x" * 400] * 5  # no content-length: chunked upload
    recorder = await call(
        request_stack(endpoint, max_request_bytes=1000), messages=body_messages(*chunks)
    )
    assert recorder.status == 413
    assert recorder.error()["code"] == "request_too_large"
    assert not endpoint.called


async def test_body_exactly_at_limit_is_accepted() -> None:
    endpoint = Endpoint()
    padded = json.dumps({**HELLO, "user": ""}).encode()
    padded = json.dumps({**HELLO, "user": "u" * (1000 - len(padded))}).encode()
    assert len(padded) == 1000
    scope = make_scope(headers=[(b"content-length", b"1000")])
    recorder = await call(request_stack(endpoint, 1000), scope, body_messages(padded))
    assert recorder.status == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"this is not json", None),
        (b"", None),
        (b"[1, 2, 3]", None),
        (b'"a string"', None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "gpt-4o"}', "messages"),
        (b'{"model": "gpt-4o", "messages": []}', "messages"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "gpt-4o", "messages": [{"content": "hi"}]}', "messages[0].role"),
    ],
)
async def test_bad_chat_bodies_are_400(body: bytes, param: str | None) -> None:
    endpoint = Endpoint()
    recorder = await call(request_stack(endpoint), messages=body_messages(body))
    assert recorder.status == 400
    error = recorder.error()
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert not endpoint.called
    assert recorder.header(b"x-request-id") is not None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            b'{"model": "gpt-4o", "messages": [{"role": "wizard", "content": "hi"}]}',
            "messages[0].role",
        ),
        (
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": 7}]}',
            "messages[0].content",
        ),
        (
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": 1}',
            "stream",
        ),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    ],
)
async def test_invalid_field_names_its_param(body: bytes, param: str) -> None:
    recorder = await call(request_stack(Endpoint()), messages=body_messages(body))
    assert recorder.status == 400
    error = recorder.error()
    assert error["param"] == param
    assert param in error["message"]


async def test_get_request_body_is_not_read() -> None:
    endpoint = Endpoint()
    receiver = Receiver([])
    recorder = Recorder()
    await request_stack(endpoint)(make_scope("GET", "/v1/models"), receiver, recorder)
    assert recorder.status == 200
    assert receiver.calls == 0
    assert endpoint.ctx.route == "/v1/models"
    assert endpoint.ctx.request is None


async def test_post_to_other_path_is_read_but_not_parsed_as_chat() -> None:
    endpoint = Endpoint()
    await call(request_stack(endpoint), make_scope(path="/v1/embeddings"), body_messages(b"[1]"))
    assert endpoint.ctx.body == b"[1]"
    assert endpoint.ctx.request is None


async def test_root_path_is_stripped_for_routing() -> None:
    endpoint = Endpoint()
    scope = make_scope(path="/llm" + CHAT, root_path="/llm")
    recorder = await call(request_stack(endpoint), scope)
    assert recorder.status == 200
    assert endpoint.ctx.route == CHAT
    assert endpoint.ctx.alias == "gpt-4o"


async def test_client_gone_while_sending_body_ends_quietly() -> None:
    endpoint = Endpoint()
    messages: list[Message] = [
        {"type": "http.request", "body": HELLO_BYTES[:10], "more_body": True}
    ]
    scope = make_scope()
    recorder = await call(request_stack(endpoint), scope, messages)
    assert recorder.messages == []
    assert not endpoint.called
    assert RequestContext.of(scope).status == 499


# -- AuthMiddleware --------------------------------------------------------------------------

TEAM_A = ClientKeyConfig(name="team-a", key="key-team-a-0123456789", models=["gpt-4o"])
TEAM_B = ClientKeyConfig(name="team-b", key="key-team-b-9876543210")
ALIASES = ("gpt-4o", "claude")


def auth_stack(
    endpoint: ASGIApp, keys: list[ClientKeyConfig] | None = None, aliases: Iterable[str] = ALIASES
) -> ASGIApp:
    auth = AuthMiddleware(
        endpoint, keys=[TEAM_A, TEAM_B] if keys is None else keys, aliases=tuple(aliases)
    )
    return request_stack(auth)


def chat(model: str = "gpt-4o", headers: Iterable[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    body = json.dumps({**HELLO, "model": model}).encode()
    return {"scope": make_scope(headers=headers), "messages": body_messages(body)}


async def test_open_when_no_keys_configured() -> None:
    endpoint = Endpoint()
    recorder = await call(auth_stack(endpoint, keys=[]), **chat())
    assert recorder.status == 200
    assert endpoint.ctx.client_key is None


async def test_missing_key_is_401() -> None:
    endpoint = Endpoint()
    recorder = await call(auth_stack(endpoint), **chat())
    assert recorder.status == 401
    error = recorder.error()
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert not endpoint.called


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer key-wrong-0123456789")],
        [(b"x-api-key", b"key-wrong-0123456789")],
        [(b"authorization", b"Bearer key-team-a-012345678")],  # a prefix of a real key
        [(b"authorization", b"Bearer ")],
        [(b"authorization", b"Basic a2V5LXRlYW0tYS0wMTIzNDU2Nzg5")],
    ],
)
async def test_wrong_key_is_401_and_never_echoed(headers: list[tuple[bytes, bytes]]) -> None:
    endpoint = Endpoint()
    recorder = await call(auth_stack(endpoint), **chat(headers=headers))
    assert recorder.status == 401
    assert recorder.error()["type"] == "authentication_error"
    assert b"key-wrong" not in recorder.body
    assert b"key-team-a" not in recorder.body
    assert not endpoint.called


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer key-team-a-0123456789")],
        [(b"authorization", b"bearer key-team-a-0123456789")],
        [(b"x-api-key", b"key-team-a-0123456789")],
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key"],
)
async def test_valid_key_is_accepted(headers: list[tuple[bytes, bytes]]) -> None:
    endpoint = Endpoint()
    recorder = await call(auth_stack(endpoint), **chat(headers=headers))
    assert recorder.status == 200
    assert endpoint.ctx.client_key == TEAM_A


async def test_key_without_allow_list_may_use_every_alias() -> None:
    endpoint = Endpoint()
    headers = [(b"authorization", b"Bearer key-team-b-9876543210")]
    recorder = await call(auth_stack(endpoint), **chat("claude", headers))
    assert recorder.status == 200
    assert endpoint.ctx.client_key == TEAM_B


async def test_key_not_allowed_this_model_is_403() -> None:
    endpoint = Endpoint()
    headers = [(b"authorization", b"Bearer key-team-a-0123456789")]
    recorder = await call(auth_stack(endpoint), **chat("claude", headers))
    assert recorder.status == 403
    error = recorder.error()
    assert error["type"] == "permission_error"
    assert "claude" in error["message"]
    assert not endpoint.called


async def test_unknown_alias_passes_through_for_the_router_to_404() -> None:
    endpoint = Endpoint()
    headers = [(b"authorization", b"Bearer key-team-a-0123456789")]
    recorder = await call(auth_stack(endpoint), **chat("no-such-model", headers))
    assert recorder.status == 200
    assert endpoint.ctx.alias == "no-such-model"


async def test_restricted_key_may_list_models() -> None:
    endpoint = Endpoint()
    scope = make_scope("GET", "/v1/models", [(b"x-api-key", b"key-team-a-0123456789")])
    recorder = await call(auth_stack(endpoint), scope, [])
    assert recorder.status == 200
    assert endpoint.ctx.client_key == TEAM_A


async def test_auth_errors_carry_the_request_id() -> None:
    scope = make_scope(headers=[(b"x-request-id", b"trace-7")])
    recorder = await call(auth_stack(Endpoint()), scope)
    assert recorder.status == 401
    assert recorder.header(b"x-request-id") == b"trace-7"


# -- AccessLogMiddleware ---------------------------------------------------------------------


def gateway_stack(
    endpoint: ASGIApp,
    *,
    logging_config: LoggingConfig | None = None,
    keys: list[ClientKeyConfig] | None = None,
) -> ASGIApp:
    """The same order as ``resillm.app``: errors, access log, request, auth."""
    inner: ASGIApp = AuthMiddleware(endpoint, keys=[] if keys is None else keys, aliases=ALIASES)
    inner = RequestMiddleware(inner, max_request_bytes=1 << 20)
    inner = AccessLogMiddleware(inner, config=logging_config or LoggingConfig())
    return ErrorsMiddleware(inner)


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fields: list[dict[str, Any]] = []
    for record in caplog.records:
        if record.name == "resillm.access":
            value = getattr(record, "fields", None)
            assert isinstance(value, dict)
            fields.append(value)
    return fields


@pytest.fixture
def access_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="resillm.access")
    return caplog


async def test_one_access_record_per_request(access_caplog: pytest.LogCaptureFixture) -> None:
    def set_route(scope: Scope) -> None:
        ctx = RequestContext.of(scope)
        ctx.provider, ctx.upstream_model, ctx.attempts = "openai", "gpt-4o-2024-08-06", 2

    class RoutedEndpoint(Endpoint):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            set_route(scope)
            await super().__call__(scope, receive, send)

    scope = make_scope(headers=[(b"x-request-id", b"trace-1")])
    recorder = await call(gateway_stack(RoutedEndpoint()), scope)
    assert recorder.status == 200
    records = access_records(access_caplog)
    assert len(records) == 1
    fields = records[0]
    assert fields["request_id"] == "trace-1"
    assert fields["status"] == 200
    assert fields["model"] == "gpt-4o"
    assert fields["provider"] == "openai"
    assert fields["upstream_model"] == "gpt-4o-2024-08-06"
    assert fields["attempts"] == 2
    assert fields["method"] == "POST"
    assert fields["path"] == CHAT
    assert fields["error"] is None
    assert fields["latency_ms"] >= 0


async def test_access_record_names_key_but_never_holds_it(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    scope = make_scope(headers=[(b"authorization", b"Bearer key-team-a-0123456789")])
    await call(gateway_stack(Endpoint(), keys=[TEAM_A]), scope)
    (fields,) = access_records(access_caplog)
    assert fields["key"] == "team-a"
    assert "key-team-a-0123456789" not in json.dumps(fields)


async def test_streamed_request_is_logged_once_after_it_ended(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    logged_while_sending: list[int] = []

    class CountingRecorder(Recorder):
        async def __call__(self, message: Message) -> None:
            logged_while_sending.append(len(access_records(access_caplog)))
            await super().__call__(message)

    recorder = CountingRecorder()
    body = json.dumps({**HELLO, "stream": True}).encode()
    endpoint = Endpoint(chunks=[b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"])
    await gateway_stack(endpoint)(make_scope(), Receiver(body_messages(body)), recorder)
    assert logged_while_sending == [0, 0, 0, 0]
    (fields,) = access_records(access_caplog)
    assert fields["stream"] is True
    assert fields["status"] == 200


@pytest.mark.parametrize(
    ("endpoint", "headers", "body", "status"),
    [
        (Endpoint(raises=ModelNotFound("no such model")), [], HELLO_BYTES, 404),
        (Endpoint(), [], b"not json", 400),
        (Endpoint(), [(b"content-length", b"99999999")], HELLO_BYTES, 413),
        (Endpoint(status=503), [], HELLO_BYTES, 503),
    ],
    ids=["gateway-error", "bad-json", "too-large", "error-status"],
)
async def test_errors_are_logged_even_at_sample_rate_zero(
    access_caplog: pytest.LogCaptureFixture,
    endpoint: Endpoint,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    status: int,
) -> None:
    stack = gateway_stack(endpoint, logging_config=LoggingConfig(sample_rate=0.0))
    recorder = await call(stack, make_scope(headers=headers), body_messages(body))
    assert recorder.status == status
    records = access_records(access_caplog)
    assert len(records) == 1
    assert records[0]["status"] == status
    assert records[0]["request_id"] == recorder.header(b"x-request-id").decode()  # type: ignore[union-attr]


async def test_auth_failure_is_logged(access_caplog: pytest.LogCaptureFixture) -> None:
    stack = gateway_stack(Endpoint(), keys=[TEAM_A], logging_config=LoggingConfig(sample_rate=0))
    recorder = await call(stack)
    assert recorder.status == 401
    (fields,) = access_records(access_caplog)
    assert fields["status"] == 401
    assert fields["error"]


async def test_unexpected_exception_is_logged_as_500(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = await call(gateway_stack(Endpoint(raises=RuntimeError("boom"))))
    assert recorder.status == 500
    (fields,) = access_records(access_caplog)
    assert fields["status"] == 500
    assert fields["error"] == "RuntimeError"


async def test_successes_dropped_at_sample_rate_zero(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    stack = gateway_stack(Endpoint(), logging_config=LoggingConfig(sample_rate=0.0))
    for _ in range(5):
        assert (await call(stack)).status == 200
    assert access_records(access_caplog) == []


async def test_nothing_logged_when_log_requests_is_off(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    stack = gateway_stack(
        Endpoint(raises=ModelNotFound("x")), logging_config=LoggingConfig(log_requests=False)
    )
    assert (await call(stack)).status == 404
    assert access_records(access_caplog) == []


async def test_errors_are_logged_when_level_is_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resillm.access")
    recorder = await call(gateway_stack(Endpoint(raises=ModelNotFound("no such model"))))
    assert recorder.status == 404
    assert [fields["status"] for fields in access_records(caplog)] == [404]


def test_request_ids_are_unique_and_a_forked_worker_gets_its_own_prefix() -> None:
    from middleware.request import new_request_id

    first, second = new_request_id(), new_request_id()
    assert first != second and first[:16] == second[:16]  # one process: one prefix
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # a worker forked after ids were made here
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    forked = os.read(read_end, 100).decode()
    os.close(read_end)
    assert forked.startswith("req_") and forked[:16] != first[:16]
