"""Count every request into the Prometheus collectors once it has ended.

Sits outside the request layer (like the access log) so rejected requests are counted too;
it reads what the other layers left in the request context. ``resillm_inflight_requests``
is decremented in ``finally``, so a cancelled request (client gone, server shutdown) never
leaves it high.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from resillm.asgi import ASGIApp, Receive, Scope, Send, direct
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError
from resillm.metrics import NONE, Metrics

# Told of each finished request: (status, duration in seconds, fallbacks). The admin page's
# charts; it must stay as cheap as the counters here.
Observer = Callable[[int, float, int], None]


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, observe: Observer | None = None) -> None:
        self.app = direct(app)
        self.metrics = metrics
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        status = 0  # the error's, for a request that raised before its response started
        started = time.monotonic()
        metrics.inflight_now += 1
        try:
            await self.app(scope, receive, send)
        except GatewayError as exc:
            status = exc.status
            raise
        except BaseException:
            status = 500
            raise
        finally:
            metrics.inflight_now -= 1
            ctx: RequestContext | None = scope.get(SCOPE_KEY)
            if ctx is not None:
                duration_s = time.monotonic() - started
                status = ctx.status or ctx.response_status or status
                record(metrics, ctx, status, duration_s)
                if self.observe is not None:
                    self.observe(status, duration_s, ctx.fallbacks)


def record(metrics: Metrics, ctx: RequestContext, status: int, duration_s: float) -> None:
    # Counters and histograms go through ``metrics`` (flushed at scrape time).
    model = ctx.alias or NONE
    provider = ctx.provider or NONE
    by_target = (("model", model), ("provider", provider))
    count = metrics.count
    count(metrics.requests, (*by_target, ("status", str(status))))
    metrics.observe(metrics.request_duration, by_target, duration_s)
    if ctx.ttft_s is not None:
        metrics.observe(metrics.ttft, by_target, ctx.ttft_s)
    for attempt_provider, attempt_model, outcome, is_retry in ctx.attempt_log:
        attempt = (("model", attempt_model), ("provider", attempt_provider))
        count(metrics.upstream_attempts, (*attempt, ("outcome", outcome)))
        if is_retry:
            count(metrics.retries, attempt)
    for from_target, to_target in ctx.fallback_log:
        fallback = (("from_target", from_target), ("model", model), ("to_target", to_target))
        count(metrics.fallbacks, fallback)
    usage = ctx.usage
    if usage is not None:
        count(metrics.tokens, (("kind", "prompt"), *by_target), usage.prompt_tokens)
        count(metrics.tokens, (("kind", "completion"), *by_target), usage.completion_tokens)
    if ctx.cost:
        count(metrics.cost, by_target, ctx.cost)
    for outcome in ctx.recoveries:
        count(metrics.stream_recoveries, (("outcome", outcome),))
    if ctx.malformed_events:
        count(metrics.malformed_events, (("provider", provider),), ctx.malformed_events)
