"""The aiohttp application: routes, the request flow shared by both APIs, and running it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import msgspec
from aiohttp import web

from resillm.mock_upstream import anthropic_wire, openai_wire
from resillm.mock_upstream.answer import Answer, Prompt, compose_answer
from resillm.mock_upstream.faults import FaultHeaderError, FaultInjector, Faults
from resillm.mock_upstream.options import MockUpstreamOptions, MockUpstreamStats

_STALL_POLL_S = 0.05
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_MOCK_MODEL = "mock-model"
_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # aiohttp's default, 1 MiB, is below what providers take


class StreamEvents(Protocol):
    """One API's server-sent events for one answer, already framed. `usage_event` names the
    part that carries the answer's usage: "finish", "end", or "" (none is sent)."""

    usage_event: str

    def prelude(self) -> bytes: ...
    def piece(self, text: str) -> bytes: ...
    def content_end(self) -> bytes: ...
    def finish(self) -> bytes: ...
    def end(self, *, done: bool = True) -> bytes: ...
    def malformed(self) -> bytes: ...
    def error_event(self) -> bytes: ...


@dataclass(frozen=True)
class _Api:
    """How one route reads its request and writes its answers."""

    authorized: Callable[[web.Request, str], bool]
    parse: Callable[[object, web.Request], Prompt]
    error_body: Callable[[int, str | None, str | None], bytes]
    completion_body: Callable[[Prompt, Answer], bytes]
    stream: Callable[[Prompt, Answer], StreamEvents]


def _bearer_is(request: web.Request, key: str) -> bool:
    return hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {key}")


def _header_is(name: str) -> Callable[[web.Request, str], bool]:
    def check(request: web.Request, key: str) -> bool:
        return hmac.compare_digest(request.headers.get(name, ""), key)

    return check


_OPENAI = _Api(
    authorized=_bearer_is,
    parse=lambda body, _request: openai_wire.parse_request(body),
    error_body=openai_wire.error_body,
    completion_body=openai_wire.completion_body,
    stream=openai_wire.OpenAIStream,
)
_api_key_is = _header_is("api-key")
_x_api_key_is = _header_is("x-api-key")

# Azure OpenAI: the deployment in the path names the model; the key comes as `api-key`.
_AZURE = _Api(
    authorized=lambda request, key: _api_key_is(request, key) or _bearer_is(request, key),
    parse=lambda body, request: openai_wire.parse_request(body, model=request.match_info["name"]),
    error_body=openai_wire.error_body,
    completion_body=openai_wire.completion_body,
    stream=openai_wire.OpenAIStream,
)
# Anthropic takes the key as `x-api-key`; its newer SDKs send `Authorization: Bearer`.
_ANTHROPIC = _Api(
    authorized=lambda request, key: _x_api_key_is(request, key) or _bearer_is(request, key),
    parse=lambda body, _request: anthropic_wire.parse_request(body),
    error_body=anthropic_wire.error_body,
    completion_body=anthropic_wire.completion_body,
    stream=anthropic_wire.AnthropicStream,
)


@dataclass
class _State:
    options: MockUpstreamOptions
    stats: MockUpstreamStats = field(default_factory=MockUpstreamStats)
    faults: FaultInjector = field(init=False)

    def __post_init__(self) -> None:
        self.faults = FaultInjector(self.options)


_STATE = web.AppKey("resillm_mock_upstream", _State)


class _ConnectionCut(Exception):
    """The mock dropped (or reset) the connection on purpose; `response` is handed back.

    Returning it (rather than raising) lets aiohttp find the transport closed when it
    finishes the response and treat it as a premature disconnection, quietly.
    """

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("x-mock-cut-after: connection dropped on purpose")
        self.response = response


def _api_route(api: _Api) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        stats = request.app[_STATE].stats
        stats.requests += 1
        stats.active += 1
        stats.last_headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            response = await _answer(request, api, request.app[_STATE])
        except _ConnectionCut as cut:
            stats.aborted += 1
            return cut.response
        except ConnectionResetError:
            # The client went away and a write (or a stall's poll) found out before aiohttp
            # cancelled the handler. Raised, aiohttp would log it as a handler error with its
            # traceback; returned, it finds the transport closed and ends quietly.
            stats.disconnected += 1
            return web.Response()
        except asyncio.CancelledError:
            stats.disconnected += 1
            raise
        finally:
            stats.active -= 1
        stats.completed += 1
        return response

    return handle


def _error(api: _Api, status: int, message: str | None, code: str | None = None) -> web.Response:
    return web.Response(
        status=status, body=api.error_body(status, message, code), content_type="application/json"
    )


async def _answer(request: web.Request, api: _Api, state: _State) -> web.StreamResponse:
    key = state.options.api_key
    if key is not None and not api.authorized(request, key):
        return _error(api, 401, "invalid api key")
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError as exc:
        state.stats.last_request_json = None
        return _error(api, 400, f"request body is not valid JSON: {exc}")
    state.stats.last_request_json = body
    try:
        prompt = api.parse(body, request)
    except msgspec.ValidationError as exc:
        return _error(api, 400, str(exc))
    by_model = state.stats.by_model
    by_model[prompt.model] = by_model.get(prompt.model, 0) + 1
    try:
        faults = state.faults.for_request(request.headers, prompt.model)
    except FaultHeaderError as exc:
        return _error(api, 400, str(exc))
    if faults.latency:
        await asyncio.sleep(faults.latency)
    if faults.hang:
        await _stall(request)
    if faults.reset:
        _reset(request)
    if faults.fail_status is not None:
        state.stats.failed += 1
        response = _error(api, faults.fail_status, None, faults.fail_code)
        if faults.retry_after is not None:
            response.headers["retry-after"] = f"{faults.retry_after:g}"
        return response
    if faults.reject_prefill and prompt.prefill is not None:
        state.stats.failed += 1
        return _error(
            api,
            400,
            "This model does not support assistant message prefill. "
            "The conversation must end with a user message.",
        )
    answer = compose_answer(prompt, faults.chunks)

    def reported() -> None:
        state.stats.count_usage(prompt.model, answer.prompt_tokens, answer.completion_tokens)

    if prompt.stream:
        return await _stream(request, api.stream(prompt, answer), answer, faults, reported)
    if faults.stall_after is not None:
        await _stall(request)
    if faults.cut_after is not None:
        _cut(request, web.Response())
    if faults.malformed_at is not None:
        return web.Response(body=b"{not json", content_type="application/json")
    reported()
    return web.Response(body=api.completion_body(prompt, answer), content_type="application/json")


async def _stream(
    request: web.Request,
    events: StreamEvents,
    answer: Answer,
    faults: Faults,
    reported: Callable[[], None],
) -> web.StreamResponse:
    """Write the events one by one, each as soon as it is due, with the faults asked for;
    `reported()` once the event carrying the usage has been written."""
    count = len(answer.pieces)

    def at(position: int | None) -> int | None:
        return None if position is None else min(position, count)

    malformed_at, cut_after = at(faults.malformed_at), at(faults.cut_after)
    stall_after, error_after = at(faults.stall_after), at(faults.error_event_after)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    await response.write(events.prelude())
    for index in range(count + 1):
        if index == malformed_at:
            await response.write(events.malformed())
        if index == cut_after:
            _cut(request, response)
        if index == stall_after:
            await _stall(request)
        if index == error_after:
            await response.write(events.error_event())
            await response.write_eof()
            return response
        if index == count:
            break
        if index and faults.chunk_delay:
            await asyncio.sleep(faults.chunk_delay)
        await response.write(events.piece(answer.pieces[index]))
    if content_end := events.content_end():
        await response.write(content_end)
    if not faults.no_finish:
        await response.write(events.finish())
        if events.usage_event == "finish":
            reported()
    if end := events.end(done=not faults.omit_done):
        await response.write(end)
        if events.usage_event == "end":
            reported()
    await response.write_eof()
    return response


def _cut(request: web.Request, response: web.StreamResponse) -> NoReturn:
    """Drop the connection: what was written is flushed, the body is never completed."""
    if request.transport is not None:
        request.transport.close()
    raise _ConnectionCut(response)


def _reset(request: web.Request) -> NoReturn:
    """Reset the connection: with a zero linger, closing it sends a TCP RST, not a FIN."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Where the platform will not, a plain close is the nearest thing.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise _ConnectionCut(web.Response())


async def _stall(request: web.Request) -> None:
    """Send nothing more until the client goes away.

    Polled, because aiohttp tells a handler about a lost client only by cancelling it, and
    only when the runner has `handler_cancellation=True`; this way any runner works.
    """
    while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(_STALL_POLL_S)
    raise ConnectionResetError("client went away during x-mock-stall-after or x-mock-hang")


async def _models(request: web.Request) -> web.Response:
    if "anthropic-version" in request.headers:
        model: dict[str, object] = {
            "type": "model",
            "id": _MOCK_MODEL,
            "display_name": "Mock",
            "created_at": "2025-01-01T00:00:00Z",
        }
        page = {"data": [model], "has_more": False, "first_id": _MOCK_MODEL, "last_id": _MOCK_MODEL}
        return web.Response(body=msgspec.json.encode(page), content_type="application/json")
    model = {"id": _MOCK_MODEL, "object": "model", "created": 0, "owned_by": "resillm-mock"}
    listing = {"object": "list", "data": [model]}
    return web.Response(body=msgspec.json.encode(listing), content_type="application/json")


async def _health(_request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def _stats(request: web.Request) -> web.Response:
    body = msgspec.json.encode(request.app[_STATE].stats)
    return web.Response(body=body, content_type="application/json")


def build_mock_app(options: MockUpstreamOptions) -> web.Application:
    """The mock upstream as an aiohttp application, with its stats at `app_stats(app)`.

    Run it with `handler_cancellation=True` so that a client going away ends its handler
    at once (`start_mock_upstream` and `run_mock_upstream` do).
    """
    app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
    app[_STATE] = _State(options)
    app.router.add_post("/v1/chat/completions", _api_route(_OPENAI))
    app.router.add_post("/openai/deployments/{name}/chat/completions", _api_route(_AZURE))
    app.router.add_post("/v1/messages", _api_route(_ANTHROPIC))
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/_mock/stats", _stats)
    return app


def app_stats(app: web.Application) -> MockUpstreamStats:
    """The live counters of an application made by `build_mock_app`."""
    return app[_STATE].stats
