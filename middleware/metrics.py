"""Count every request into the Prometheus collectors once it has ended.

Sits outside the request layer (like the access log) so rejected requests are counted too;
it reads what the other layers left in the request context. ``resillm_inflight_requests``
is decremented in ``finally``, so a cancelled request (client gone, server shutdown) never
leaves it high.
"""

from __future__ import annotations

import time

from resillm.asgi import ASGIApp, Message, Receive, Scope, Send
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError
from resillm.metrics import NONE, Metrics


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        status = 0

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.monotonic()
        metrics.inflight.inc({})
        try:
            await self.app(scope, receive, send_recording_status)
        except GatewayError as exc:
            status = status or exc.status
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            metrics.inflight.dec({})
            ctx: RequestContext | None = scope.get(SCOPE_KEY)
            if ctx is not None:
                record(metrics, ctx, ctx.status or status, time.monotonic() - started)


def record(metrics: Metrics, ctx: RequestContext, status: int, duration_s: float) -> None:
    model = ctx.alias or NONE
    provider = ctx.provider or NONE
    by_target = {"model": model, "provider": provider}
    metrics.requests.inc({**by_target, "status": str(status)})
    metrics.request_duration.observe(by_target, duration_s)
    if ctx.ttft_s is not None:
        metrics.ttft.observe(by_target, ctx.ttft_s)
    for attempt_provider, attempt_model, outcome, is_retry in ctx.attempt_log:
        labels = {"provider": attempt_provider, "model": attempt_model}
        metrics.upstream_attempts.inc({**labels, "outcome": outcome})
        if is_retry:
            metrics.retries.inc(labels)
    for from_target, to_target in ctx.fallback_log:
        metrics.fallbacks.inc({"model": model, "from_target": from_target, "to_target": to_target})
    usage = ctx.usage
    if usage is not None:
        metrics.tokens.add({**by_target, "kind": "prompt"}, usage.prompt_tokens)
        metrics.tokens.add({**by_target, "kind": "completion"}, usage.completion_tokens)
    if ctx.cost:
        metrics.cost.add(by_target, ctx.cost)
    for outcome in ctx.recoveries:
        metrics.stream_recoveries.inc({"outcome": outcome})
    if ctx.malformed_events:
        metrics.malformed_events.add({"provider": provider}, ctx.malformed_events)
