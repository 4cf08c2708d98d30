"""OpenTelemetry traces (the ``otel`` extra): a SERVER span per request, a CLIENT span per
upstream attempt, W3C ``traceparent`` continued from the client and passed to upstreams.

The gateway imports this module only when ``tracing.enabled`` (the config loader has
already checked that the extra is installed). :class:`Tracing` is the gateway's own
``TracerProvider`` — never the global one, so two gateways in a process (and the tests)
do not share spans — built at start and flushed and shut down at stop.

Span tree of one request::

    POST /v1/chat/completions   SERVER   http.*, gen_ai.*, resillm.* ; events: resillm.retry,
    |                                    resillm.fallback, resillm.circuit_open,
    |                                    resillm.stream_interrupted
    +- chat gpt-4o              CLIENT   attempt 1 (error: 503)
    +- chat gpt-4o              CLIENT   attempt 2 (retry)
    +- chat claude-sonnet-4-5   CLIENT   attempt 3 (fallback), gen_ai.usage.*

A stream's CLIENT span lasts until the stream ends (its usage comes last); one that dies
mid-way ends in error when the relay says so, and the recovery's attempt gets its own span.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from resillm import __version__
from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, route_path
from resillm.config import ProviderConfig, TracingConfig
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError, UpstreamError, UpstreamStatusError
from resillm.metrics import attempt_outcome
from resillm.tracecontext import (
    TRACER_SCOPE_KEY,
    RequestTracer,
    TracedTarget,
    reset_trace_headers,
    set_trace_headers,
)

T = TypeVar("T")
TargetT = TypeVar("TargetT", bound=TracedTarget)

OTLP_DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
ZIPKIN_DEFAULT_ENDPOINT = "http://127.0.0.1:9411"
EXPORT_TIMEOUT_S = 10
KNOWN_ROUTES = frozenset({"/v1/chat/completions", "/v1/models"})
# gen_ai.system values of the OpenTelemetry GenAI conventions; other types go as they are.
GEN_AI_SYSTEMS = {"azure": "az.ai.openai", "bedrock": "aws.bedrock"}
_propagator = TraceContextTextMapPropagator()


def signal_url(endpoint: str, path: str) -> str:
    """``http://host:4318`` means the collector's standard path; a URL with a path is kept."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + path
    return endpoint


def build_exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.exporter == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        url = signal_url(config.endpoint or ZIPKIN_DEFAULT_ENDPOINT, "/api/v2/spans")
        return ZipkinExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = signal_url(config.endpoint or OTLP_DEFAULT_ENDPOINT, "/v1/traces")
    return OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)


class Tracing:
    """The gateway's tracer provider, exporting in batches. ``exporter`` replaces the one
    ``config.exporter`` names (tests pass an in-memory one)."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        self.config = config
        resource = Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
        )
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_rate)),
            resource=resource,
            shutdown_on_exit=False,  # the gateway's stop shuts it down
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter or build_exporter(config)))
        self.tracer = self.provider.get_tracer("resillm", __version__)

    def middleware(
        self, app: ASGIApp, *, providers: Mapping[str, ProviderConfig]
    ) -> TracingMiddleware:
        return TracingMiddleware(app, tracer=self.tracer, providers=providers)

    def force_flush(self) -> bool:
        return self.provider.force_flush()

    async def shutdown(self) -> None:
        """Export what is buffered, then stop (blocking I/O: off the event loop)."""
        await asyncio.to_thread(self.provider.shutdown)


class TracingMiddleware:
    """Opens the SERVER span and hands the request a :class:`RequestSpans` (through the
    scope; the request layer puts it on the context as ``ctx.tracer``)."""

    def __init__(
        self, app: ASGIApp, *, tracer: trace.Tracer, providers: Mapping[str, ProviderConfig]
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.systems = {name: _system(config) for name, config in providers.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        path = route_path(scope)
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope.get("headers", ())
            if key in (b"traceparent", b"tracestate")
        }
        parent = _propagator.extract(carrier)
        span = self.tracer.start_span(
            f"{method} {path}" if path in KNOWN_ROUTES else method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_server_attributes(scope, method, path),
        )
        spans = RequestSpans(self.tracer, span, self.systems, scope)
        scope[TRACER_SCOPE_KEY] = spans
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 0

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_recording_status)
        except GatewayError as exc:
            status, error = status or exc.status, exc
            raise
        except BaseException as exc:
            status, error = status or 500, exc
            raise
        finally:
            otel_context.detach(token)
            spans.finish(scope.get(SCOPE_KEY), status, error)


def _system(config: ProviderConfig) -> str:
    kind = str(config.__struct_config__.tag)
    return GEN_AI_SYSTEMS.get(kind, kind)


def _server_attributes(scope: Scope, method: str, path: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": scope.get("scheme", "http"),
    }
    if path in KNOWN_ROUTES:
        attributes["http.route"] = path
    server = scope.get("server")
    if server:
        attributes["server.address"] = str(server[0])
        if server[1] is not None:
            attributes["server.port"] = int(server[1])
    client = scope.get("client")
    if client:
        attributes["client.address"] = str(client[0])
    for key, value in scope.get("headers", ()):
        if key == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    return attributes


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
        _propagator.inject(headers, context=span_context)
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
