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

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from middleware.tracing_export import GuardedExporter, shutdown_within
from middleware.tracing_spans import PROPAGATOR, RequestSpans
from resillm import __version__
from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, direct, route_path
from resillm.config import ProviderConfig, TracingConfig
from resillm.context import SCOPE_KEY
from resillm.errors import GatewayError
from resillm.tracecontext import (
    TRACER_SCOPE_KEY,
)

OTLP_DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
ZIPKIN_DEFAULT_ENDPOINT = "http://127.0.0.1:9411"
EXPORT_TIMEOUT_S = 10
KNOWN_ROUTES = frozenset({"/v1/chat/completions", "/v1/models"})
# gen_ai.system values of the OpenTelemetry GenAI conventions; other types go as they are.
GEN_AI_SYSTEMS = {"azure": "az.ai.openai", "bedrock": "aws.bedrock"}


def signal_url(endpoint: str, path: str) -> str:
    """``http://host:4318`` means the collector's standard path; a URL with a path is kept."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + path
    return endpoint


def export_url(config: TracingConfig) -> str | None:
    """Where the configured exporter sends spans (``None`` for the console)."""
    if config.exporter == "zipkin":
        return signal_url(config.endpoint or ZIPKIN_DEFAULT_ENDPOINT, "/api/v2/spans")
    if config.exporter == "otlp":
        return signal_url(config.endpoint or OTLP_DEFAULT_ENDPOINT, "/v1/traces")
    return None


def build_exporter(config: TracingConfig) -> SpanExporter:
    url = export_url(config)
    if url is None:
        return ConsoleSpanExporter()
    if config.exporter == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        return ZipkinExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

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
        # Guarded: a collector that is down or hangs is logged once, never holds the stop.
        self.exporter = GuardedExporter(
            exporter or build_exporter(config), None if exporter else export_url(config)
        )
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("resillm", __version__)

    def middleware(
        self, app: ASGIApp, *, providers: Mapping[str, ProviderConfig]
    ) -> TracingMiddleware:
        return TracingMiddleware(app, tracer=self.tracer, providers=providers)

    def force_flush(self) -> bool:
        return self.provider.force_flush()

    async def shutdown(self) -> None:
        """Export what is buffered, then stop: off the event loop, and for at most
        ``tracing_export.SHUTDOWN_TIMEOUT_S`` (the rest is dropped, and logged)."""
        await shutdown_within(self.provider, self.exporter)


class TracingMiddleware:
    """Opens the SERVER span and hands the request a :class:`RequestSpans` (through the
    scope; the request layer puts it on the context as ``ctx.tracer``)."""

    def __init__(
        self, app: ASGIApp, *, tracer: trace.Tracer, providers: Mapping[str, ProviderConfig]
    ) -> None:
        self.app = direct(app)
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
        parent = PROPAGATOR.extract(carrier)
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
