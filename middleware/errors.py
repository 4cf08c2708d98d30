"""The outermost layer: every error becomes OpenAI-shaped JSON, never a traceback.

A ``GatewayError`` raised before the response started is rendered with its status; anything
unexpected is logged with its traceback and answered with a generic 500. After the response
started nothing can be rendered: the router ends streams with an SSE error event itself.
Whether it started is the request layer's to note (``RequestContext.response_status``):
every response passes its ``send``, and nothing outside it answers but this layer.
"""

from __future__ import annotations

import logging

from resillm.asgi import ASGIApp, Headers, Receive, Scope, Send, direct, send_json
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import GatewayError

logger = logging.getLogger("resillm.errors")


class ErrorsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = direct(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except GatewayError as exc:
            if scope["type"] != "http" or _started(scope):
                raise
            await send_json(send, exc.status, exc.body(), self._headers(scope, exc))
        except Exception:
            if scope["type"] != "http":
                raise
            ctx = scope.get(SCOPE_KEY)  # past the request layer: its id is no longer bound
            logger.exception(
                "unhandled error serving %s",
                scope.get("path"),
                extra={"request_id": ctx.request_id if ctx is not None else None},
            )
            if _started(scope):
                raise
            error = GatewayError("internal error in the gateway; see its log")
            await send_json(send, error.status, error.body(), self._headers(scope, error))

    @staticmethod
    def _headers(scope: Scope, error: GatewayError) -> Headers:
        headers = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        ctx = scope.get(SCOPE_KEY)
        if ctx is not None:
            headers.append((b"x-request-id", ctx.request_id.encode()))
        return headers


def _started(scope: Scope) -> bool:
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    return ctx is not None and ctx.response_status != 0
