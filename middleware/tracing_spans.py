"""One request's spans: the SERVER span and a CLIENT span per upstream attempt.

Split from :mod:`middleware.tracing` (the layer and the tracer provider); this module is
the bookkeeping the failover loop and the relay drive through ``ctx.tracer``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from resillm.asgi import Scope
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError, UpstreamError, UpstreamStatusError
from resillm.metrics import attempt_outcome
from resillm.tracecontext import (
    RequestTracer,
    TracedTarget,
    reset_trace_headers,
    set_trace_headers,
)

T = TypeVar("T")
TargetT = TypeVar("TargetT", bound=TracedTarget)


PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent, in and out


class RequestSpans:
    """One request's trace: the SERVER span, and a CLIENT span per upstream attempt.

    Implements ``resillm.tracecontext.RequestTracer``; the failover loop and the relay
    call it only when tracing is on.
    """

    __slots__ = ("_open", "_scope", "_server", "_server_context", "_systems", "_tracer")

    def __init__(
        self, tracer: trace.Tracer, server: Span, systems: Mapping[str, str], scope: Scope
    ) -> None:
        self._tracer = tracer
        self._scope = scope  # the request context appears there once the request layer ran
        self._server = server
        self._server_context = trace.set_span_in_context(server)
        self._systems = systems
        self._open: Span | None = None  # a stream's CLIENT span, until the stream ends

    @property
    def trace_id(self) -> str:
        return format(self._server.get_span_context().trace_id, "032x")

    async def attempt(
        self,
        target: TargetT,
        call: Callable[[TargetT, float], Awaitable[T]],
        seconds_left: float,
        *,
        retry: int,
        fallback: bool,
    ) -> T:
        self._end_open(None)
        ctx: RequestContext = self._scope[SCOPE_KEY]
        span = self._tracer.start_span(
            f"chat {target.model}",
            context=self._server_context,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": self._systems.get(target.provider, target.provider),
                "gen_ai.request.model": ctx.alias or "",
                "resillm.provider": target.provider,
                "resillm.target": target.id,
                "resillm.upstream_model": target.model,
                "resillm.attempt": ctx.attempts,
                "resillm.retries": retry,
                "resillm.fallback": fallback,
            },
        )
        span_context = trace.set_span_in_context(span)
        headers: dict[str, str] = {}
        PROPAGATOR.inject(headers, context=span_context)
        header_token = set_trace_headers(headers)
        context_token = otel_context.attach(span_context)
        try:
            result = await call(target, seconds_left)
        except BaseException as exc:
            _record_error(span, exc)
            span.end()
            raise
        finally:
            otel_context.detach(context_token)
            reset_trace_headers(header_token)
        span.set_attribute("http.response.status_code", 200)
        if ctx.stream:  # ends with the stream (its model and usage are in ctx by then)
            self._open = span
            return result
        # A whole completion (providers.base.Completion): its model and usage are known.
        model = getattr(result, "model", None)
        if model:
            span.set_attribute("gen_ai.response.model", model)
        _set_usage(span, getattr(result, "usage", None))
        span.end()
        return result

    def retry(self, target_id: str, retry: int, wait_s: float, error: BaseException) -> None:
        self._server.add_event(
            "resillm.retry",
            {
                "resillm.target": target_id,
                "resillm.retries": retry,
                "resillm.backoff_s": round(wait_s, 6),
                "error.type": _error_type(error),
                "resillm.error": _message(error),
            },
        )

    def fallback(self, from_target: str, to_target: str) -> None:
        self._server.add_event(
            "resillm.fallback",
            {"resillm.from_target": from_target, "resillm.to_target": to_target},
        )

    def circuit_rejected(self, target_id: str, retry_in_s: float) -> None:
        self._server.add_event(
            "resillm.circuit_open",
            {"resillm.target": target_id, "resillm.retry_in_s": round(retry_in_s, 3)},
        )

    def stream_failed(self, error: BaseException) -> None:
        self._server.add_event(
            "resillm.stream_interrupted",
            {"error.type": _error_type(error), "resillm.error": _message(error)},
        )
        self._end_open(error)

    def _end_open(self, error: BaseException | None) -> None:
        span, self._open = self._open, None
        if span is None:
            return
        if error is not None:
            _record_error(span, error)
        span.end()

    def finish(self, ctx: RequestContext | None, status: int, error: BaseException | None) -> None:
        """End the request: the open stream span (with the stream's usage), then SERVER."""
        server = self._server
        if ctx is not None:
            status = ctx.status or status
            self._end_stream(ctx)
            server.set_attributes(_request_attributes(ctx, self._systems))
        server.set_attribute("http.response.status_code", status)
        if error is not None and not isinstance(error, GatewayError):
            if not isinstance(error, asyncio.CancelledError):
                server.record_exception(error)
            server.set_attribute("error.type", _error_type(error))
            server.set_status(Status(StatusCode.ERROR, type(error).__name__))
        elif status >= 500:
            server.set_attribute("error.type", str(status))
            server.set_status(Status(StatusCode.ERROR, _failure(ctx, error)))
        elif status == 200 and ctx is not None and ctx.error is not None:
            # A stream that ended with an error event: the client did not get its answer.
            server.set_attribute("error.type", "stream_error")
            server.set_status(Status(StatusCode.ERROR, ctx.error))
        server.end()

    def _end_stream(self, ctx: RequestContext) -> None:
        span, self._open = self._open, None
        if span is None:
            return
        if not ctx.recoveries:  # a recovered stream's model and usage span several calls
            if ctx.upstream_model:
                span.set_attribute("gen_ai.response.model", ctx.upstream_model)
            _set_usage(span, ctx.usage)
        if ctx.error is not None:
            kind = "client_disconnected" if ctx.status == 499 else "stream_error"
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, ctx.error))
        span.end()


def _failure(ctx: RequestContext | None, error: BaseException | None) -> str | None:
    if ctx is not None and ctx.error:
        return ctx.error
    return _message(error) if error is not None else None


def _request_attributes(ctx: RequestContext, systems: Mapping[str, str]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "resillm.request_id": ctx.request_id,
        "resillm.stream": ctx.stream,
        "resillm.attempts": ctx.attempts,
        "resillm.retries": ctx.retries,
        "resillm.fallbacks": ctx.fallbacks,
    }
    if ctx.alias is not None:
        attributes["gen_ai.operation.name"] = "chat"
        attributes["gen_ai.request.model"] = ctx.alias
    if ctx.provider is not None:
        attributes["resillm.provider"] = ctx.provider
        attributes["gen_ai.system"] = systems.get(ctx.provider, ctx.provider)
    if ctx.upstream_model:
        attributes["gen_ai.response.model"] = ctx.upstream_model
    if ctx.usage is not None:
        attributes["gen_ai.usage.input_tokens"] = ctx.usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = ctx.usage.completion_tokens
    if ctx.cost is not None:
        attributes["resillm.cost_usd"] = ctx.cost
    if ctx.cache is not None:
        attributes["resillm.cache"] = ctx.cache
    if ctx.client_key is not None:
        attributes["resillm.key"] = ctx.client_key.name
    if ctx.recoveries:
        attributes["resillm.recoveries"] = list(ctx.recoveries)
    return attributes


def _set_usage(span: Span, usage: Any) -> None:
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)


def _error_type(error: BaseException) -> str:
    if isinstance(error, UpstreamStatusError):
        return str(error.status)
    if isinstance(error, UpstreamError):
        return attempt_outcome(error)
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return type(error).__qualname__


def _message(error: BaseException) -> str:
    return error.message if isinstance(error, GatewayError) else str(error)


def _record_error(span: Span, error: BaseException) -> None:
    if isinstance(error, UpstreamStatusError):
        span.set_attribute("http.response.status_code", error.status)
    span.set_attribute("error.type", _error_type(error))
    if isinstance(error, asyncio.CancelledError):
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
        return
    span.record_exception(error, escaped=True)
    span.set_status(Status(StatusCode.ERROR, _message(error)))


if TYPE_CHECKING:  # RequestSpans is what ctx.tracer holds

    def _is_a_request_tracer(spans: RequestSpans) -> RequestTracer:
        return spans
