"""One structured line per request: who, which model and provider, status, timings, tokens.

Successes are sampled by ``logging.sample_rate``; errors are always logged. The line is
written after the response ended, streams included, so it holds the final figures. This
layer sits outside the request layer so bodies it rejects (400, 413) are logged too; it
reads the context that layer put in the scope once the inner app returns.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from resillm.asgi import ASGIApp, Message, Receive, Scope, Send
from resillm.config import LoggingConfig
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError
from resillm.log import ACCESS_LOGGER


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, *, config: LoggingConfig) -> None:
        self.app = app
        self.config = config
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.config.log_requests:
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, send_recording_status)
        except GatewayError as exc:
            status, error = status or exc.status, exc.message
            raise
        except BaseException as exc:
            status, error = status or 500, type(exc).__name__
            raise
        finally:
            ctx: RequestContext | None = scope.get(SCOPE_KEY)
            if ctx is not None:
                ctx.status = ctx.status or status
                ctx.error = ctx.error or error
                self.log(scope, ctx)

    def log(self, scope: Scope, ctx: RequestContext) -> None:
        failed = ctx.status >= 400 or ctx.error is not None
        sample = self.config.sample_rate
        if not failed and sample < 1.0 and random.random() >= sample:
            return
        level = logging.WARNING if failed else logging.INFO
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "request", extra={"fields": access_fields(scope, ctx)})


def access_fields(scope: Scope, ctx: RequestContext) -> dict[str, Any]:
    usage = ctx.usage
    key = ctx.client_key
    return {
        "request_id": ctx.request_id,
        "method": scope.get("method"),
        "path": ctx.route,
        "status": ctx.status,
        "key": key.name if key is not None else None,
        "model": ctx.alias,
        "provider": ctx.provider,
        "upstream_model": ctx.upstream_model,
        "stream": ctx.stream,
        "attempts": ctx.attempts,
        "retries": ctx.retries,
        "fallbacks": ctx.fallbacks,
        "recoveries": ctx.recoveries or None,
        "latency_ms": round((time.monotonic() - ctx.started) * 1000.0, 2),
        "ttft_ms": round(ctx.ttft_s * 1000.0, 2) if ctx.ttft_s is not None else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "cache": ctx.cache,
        "error": ctx.error,
    }
