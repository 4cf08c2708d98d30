"""Per-request state shared by the middleware and the router, at ``scope["resillm"]``."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resillm.config import ClientKeyConfig
    from resillm.schema import ChatCompletionRequest, Usage
    from resillm.tracecontext import RequestTracer

SCOPE_KEY = "resillm"


class RequestContext:
    """What one request learned on its way through the layers; read by logs and metrics."""

    __slots__ = (
        "alias",
        "answer_body",
        "attempt_log",
        "attempts",
        "body",
        "cache",
        "client_key",
        "cost",
        "error",
        "fallback_log",
        "fallbacks",
        "headers_out",
        "malformed_events",
        "provider",
        "raw",
        "recoveries",
        "request",
        "request_id",
        "response_status",
        "retries",
        "route",
        "started",
        "status",
        "stream",
        "streamed",
        "tracer",
        "ttft_s",
        "upstream_model",
        "usage",
    )

    def __init__(self, request_id: str, route: str) -> None:
        self.request_id = request_id
        self.route = route
        self.started = time.monotonic()
        self.body = b""
        self.raw: dict[str, Any] | None = None
        self.request: ChatCompletionRequest | None = None
        self.alias: str | None = None
        self.stream = False
        self.client_key: ClientKeyConfig | None = None
        self.provider: str | None = None
        self.upstream_model: str | None = None
        self.attempts = 0
        self.retries = 0
        self.fallbacks = 0
        # Tuples, grown by concatenation: most requests log one attempt and nothing else, and
        # a request held for minutes (a stream) should not hold empty lists all along.
        self.recoveries: tuple[str, ...] = ()  # stream recoveries: continued, restarted, failed
        # For metrics and traces: (provider, model, outcome, is_retry) per upstream attempt,
        # (from target, to target) per move along the chain.
        self.attempt_log: tuple[tuple[str, str, str, bool], ...] = ()
        self.fallback_log: tuple[tuple[str, str], ...] = ()
        self.malformed_events = 0
        self.cost: float | None = None
        self.usage: Usage | None = None
        self.ttft_s: float | None = None
        self.status = 0  # the final status, where it is not the response's (499, 408)
        self.response_status = 0  # the status the response started with; 0 until then
        self.error: str | None = None
        self.cache: str | None = None
        # Headers the layers inside add to the response (the request layer's ``send`` adds
        # them to the response's start), e.g. the cache layer's ``x-resillm-cache``.
        self.headers_out: tuple[tuple[bytes, bytes], ...] = ()
        # The JSON body of a non-streamed answer the router sent with status 200, as sent
        # (the cache layer stores it).
        self.answer_body: bytes | None = None
        # Set by the tracing layer when tracing is on; the failover loop checks it per attempt.
        self.tracer: RequestTracer | None = None
        # The text of choice 0 a stream delivered, as UTF-8 (the relay's own buffer, for the
        # access log).
        self.streamed: bytearray | None = None

    @staticmethod
    def of(scope: MutableMapping[str, Any]) -> RequestContext:
        ctx: RequestContext = scope[SCOPE_KEY]
        return ctx
