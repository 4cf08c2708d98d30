"""One structured line per request: who, which model and provider, status, timings, tokens.

Successes are sampled by ``logging.sample_rate``; errors and slow requests (at least
``logging.slow_request_s``) are always logged. The line is written after the response
ended, streams included, so it holds the final figures. This layer sits outside the request
layer so bodies it rejects (400, 413) are logged too; it reads the context that layer put
in the scope once the inner app returns.

With ``log_responses`` the line also holds the request body and the answer: the JSON body
(captured from ``send`` only then), or a stream's text as delivered (the relay keeps it
anyway, for recovery). Every logged body has the configured keys removed, and PII redacted
with ``redact_pii`` (:mod:`resillm.redact`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec

from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, direct
from resillm.config import LoggingConfig
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError
from resillm.log import ACCESS_LOGGER, direct_handler
from resillm.redact import redact_string, redact_value
from resillm.schema import json_decoder


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        config: LoggingConfig,
        secrets: frozenset[str] = frozenset(),
        recent: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.app = direct(app)
        self.config = config
        self.secrets = secrets  # client and upstream keys: never in a logged body
        # Given every request's fields, logged or not (the admin page's recent requests).
        self.recent = recent
        self.logger = logging.getLogger(ACCESS_LOGGER)
        # resillm's own JSON handler, when the line may go straight to it (a LogRecord and
        # its handling cost more than the line itself).
        self.direct = direct_handler(self.logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (not self.config.log_requests and self.recent is None):
            await self.app(scope, receive, send)
            return
        response: list[bytes] | None = None
        downstream = send
        if self.config.log_responses:  # only then is the answer itself recorded

            async def send_recording(message: Message) -> None:
                nonlocal response
                if message["type"] == "http.response.start":
                    if _is_json(message):
                        response = []
                elif response is not None and message["type"] == "http.response.body":
                    response.append(message.get("body", b""))
                await send(message)

            downstream = send_recording
        status, error = 0, None  # the error's, for a request that raised
        try:
            await self.app(scope, receive, downstream)
        except GatewayError as exc:
            status, error = exc.status, exc.message
            raise
        except BaseException as exc:
            status, error = 500, type(exc).__name__
            raise
        finally:
            ctx: RequestContext | None = scope.get(SCOPE_KEY)
            if ctx is not None:
                ctx.status = ctx.status or ctx.response_status or status
                ctx.error = ctx.error or error
                logged = self.log(scope, ctx, response) if self.config.log_requests else None
                if self.recent is not None:
                    self.recent(logged or self.fields(scope, ctx, response))

    def log(
        self, scope: Scope, ctx: RequestContext, response: list[bytes] | None = None
    ) -> dict[str, Any] | None:
        """Log the request (unless sampled out); the fields logged, or None."""
        failed = ctx.status >= 400 or ctx.error is not None
        if not failed and self.config.sample_rate < 1.0 and not self.sampled(ctx):
            return None
        level = logging.WARNING if failed else logging.INFO
        if not self.logger.isEnabledFor(level):
            return None
        direct = self.direct
        # When the line alone is wanted, it goes as a struct: cheaper to make and encode.
        if (
            direct is not None
            and self.recent is None
            and not self.config.log_responses
            and direct.write_fields(level, ACCESS_LOGGER, "request", access_line(scope, ctx))
        ):
            return None
        fields = self.fields(scope, ctx, response)
        if direct is None or not direct.write_fields(level, ACCESS_LOGGER, "request", fields):
            self.logger.log(level, "request", extra={"fields": fields})
        return fields

    def fields(
        self, scope: Scope, ctx: RequestContext, response: list[bytes] | None
    ) -> dict[str, Any]:
        """The access-log fields; the bodies (redacted) too with ``log_responses``."""
        fields = access_fields(scope, ctx)
        if self.config.log_responses:
            fields.update(self.bodies(ctx, response))
        return fields

    def sampled(self, ctx: RequestContext) -> bool:
        """A success is kept at ``sample_rate``, and always when it was slow."""
        sample = self.config.sample_rate
        if sample >= 1.0 or random.random() < sample:
            return True
        return time.monotonic() - ctx.started >= self.config.slow_request_s

    def bodies(self, ctx: RequestContext, response: list[bytes] | None) -> dict[str, Any]:
        pii, secrets = self.config.redact_pii, self.secrets
        out: dict[str, Any] = {}
        if ctx.raw is not None:
            out["request_body"] = redact_value(ctx.raw, pii=pii, secrets=secrets)
        elif ctx.body:
            out["request_body"] = _body_value(ctx.body, pii=pii, secrets=secrets)
        if ctx.streamed is not None:
            text = ctx.streamed.decode()
            out["response_text"] = redact_string(text, pii=pii, secrets=secrets)
        elif response:
            body = response[0] if len(response) == 1 else b"".join(response)
            out["response_body"] = _body_value(body, pii=pii, secrets=secrets)
        return out


def _is_json(start: Message) -> bool:
    for key, value in start.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value).startswith(b"application/json")
    return False


def _body_value(body: bytes, *, pii: bool, secrets: frozenset[str]) -> Any:
    """A JSON body as its (redacted) value; anything else as (redacted) text."""
    try:
        value = json_decoder.decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", errors="replace")
        return redact_string(text, pii=pii, secrets=secrets)
    return redact_value(value, pii=pii, secrets=secrets)


def access_fields(scope: Scope, ctx: RequestContext) -> dict[str, Any]:
    """The line's fields as a dict (for the admin page, bodies, other handlers)."""
    fields = msgspec.structs.asdict(access_line(scope, ctx))
    if fields["trace_id"] is None:
        del fields["trace_id"]  # as the struct encodes: only with tracing on
    return fields


class AccessLine(msgspec.Struct, omit_defaults=True):
    """The access line's fields, in order (``trace_id`` only with tracing on)."""

    request_id: str
    method: str | None
    path: str
    status: int
    key: str | None
    model: str | None
    provider: str | None
    upstream_model: str | None
    stream: bool
    attempts: int
    retries: int
    fallbacks: int
    recoveries: tuple[str, ...] | None
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None
    cache: str | None
    error: str | None
    trace_id: str | None = None


def access_line(scope: Scope, ctx: RequestContext) -> AccessLine:
    usage = ctx.usage
    key = ctx.client_key
    return AccessLine(
        ctx.request_id,
        scope.get("method"),
        ctx.route,
        ctx.status,
        key.name if key is not None else None,
        ctx.alias,
        ctx.provider,
        ctx.upstream_model,
        ctx.stream,
        ctx.attempts,
        ctx.retries,
        ctx.fallbacks,
        ctx.recoveries or None,
        _ms(time.monotonic() - ctx.started),
        _ms(ctx.ttft_s) if ctx.ttft_s is not None else None,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
        ctx.cost,
        ctx.cache,
        ctx.error,
        ctx.tracer.trace_id if ctx.tracer is not None else None,
    )


def _ms(seconds: float) -> float:
    """Milliseconds to two decimals (``round`` with digits costs more than the rest)."""
    return int(seconds * 100_000.0 + 0.5) / 100.0
