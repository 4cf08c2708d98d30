"""Request id, the body read once under ``max_request_bytes``, and the request parsed once.

Sets up the :class:`RequestContext` every later layer reads. Only POST bodies are read;
chat completion bodies are decoded and validated here, so no other layer parses JSON.
The whole body must arrive within ``body_timeout`` (one timer per request, not per read):
a client trickling it, or never sending it, gets 408 and its connection closed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from typing import Any

import msgspec

from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, direct, header, route_path
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import InvalidRequest, RequestTimeout, RequestTooLarge
from resillm.log import REQUEST_ID
from resillm.schema import ChatCompletionRequest, json_decoder
from resillm.tracecontext import TRACER_SCOPE_KEY

CHAT_COMPLETIONS = "/v1/chat/completions"
_CLIENT_ID_RE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_AT_RE = re.compile(r"^(.*) - at `\$\.?(.*)`$", re.S)


class _RequestIds:
    """Unique across processes (a random prefix per process, renewed in a forked child) and
    cheap (a counter): no uuid, and no ``getpid`` system call, per request."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = f"req_{os.urandom(6).hex()}"
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):010x}"


new_request_id = _RequestIds().new


class ClientDisconnected(Exception):
    """The client left while its request body was still arriving."""


class RequestMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_request_bytes: int, body_timeout: float | None = None
    ) -> None:
        self.app = direct(app)
        self.max_request_bytes = max_request_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_path(scope)
        given = header(scope, b"x-request-id")
        request_id = (
            given.decode() if given and _CLIENT_ID_RE.fullmatch(given) else new_request_id()
        )
        ctx = RequestContext(request_id, route)
        ctx.tracer = scope.get(TRACER_SCOPE_KEY)  # the tracing layer's, when tracing is on
        scope[SCOPE_KEY] = ctx
        token = REQUEST_ID.set(request_id)  # every log record of this request carries it
        try:
            if scope["method"] == "POST":
                try:
                    async with asyncio.timeout(self.body_timeout):
                        ctx.body = await self.read_body(scope, receive)
                except ClientDisconnected:
                    ctx.status = 499
                    return
                except TimeoutError:
                    seconds = f"{self.body_timeout:g}s"
                    raise RequestTimeout(
                        f"the request body did not arrive within {seconds}"
                    ) from None
                if ctx.route == CHAT_COMPLETIONS:
                    parse_chat_request(ctx)
            await self.app(scope, receive, responding(ctx, send))
        finally:
            REQUEST_ID.reset(token)

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_request_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"request body is over the {limit}-byte limit")
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(f"request body is over the {limit}-byte limit")
                parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)


def responding(ctx: RequestContext, send: Send) -> Send:
    """``send`` that adds ``x-request-id`` and the inner layers' ``ctx.headers_out`` to the
    response and notes its status in the context: the one wrapper every response passes, so
    the layers outside (errors, metrics, access log) read whether and how the response
    started there, and those inside add their headers there, instead of each wrapping
    ``send`` again (a closure per layer per request, and a call per layer per chunk)."""

    async def send_with_request_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            ctx.response_status = message["status"]
            id_header = (b"x-request-id", ctx.request_id.encode())
            message["headers"] = [*message.get("headers", ()), *ctx.headers_out, id_header]
        await send(message)

    return send_with_request_id


def parse_chat_request(ctx: RequestContext) -> None:
    """Decode and validate a chat completion body into the context; 400 on any mistake."""
    if not ctx.body:
        raise InvalidRequest("request body is empty; send a JSON chat completion request")
    try:
        raw: Any = json_decoder.decode(ctx.body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec's guard against stack exhaustion on deep nesting
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        request = msgspec.convert(raw, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        message, param = _split_validation_error(str(exc))
        raise InvalidRequest(message, param=param) from None
    ctx.raw = raw
    ctx.body = b""  # decoded: a stream held for minutes need not hold its prompt twice
    ctx.request = request
    ctx.alias = request.model
    ctx.stream = bool(request.stream)


def _split_validation_error(text: str) -> tuple[str, str | None]:
    match = _AT_RE.match(text)
    if match is None:
        missing = re.match(r"Object missing required field `(.*)`", text)
        if missing:
            return f"missing required parameter '{missing.group(1)}'", missing.group(1)
        return text, None
    message, param = match.group(1), match.group(2)
    missing = re.match(r"Object missing required field `(.*)`", message)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return f"missing required parameter '{param}'", param
    return f"invalid '{param}': {message}", param
