"""The outermost layer: every error becomes OpenAI-shaped JSON, never a traceback.

A ``GatewayError`` raised before the response started is rendered with its status; anything
unexpected is logged with its traceback and answered with a generic 500. After the response
started nothing can be rendered: the router ends streams with an SSE error event itself.
"""

from __future__ import annotations

import logging

from resillm.asgi import ASGIApp, Headers, Message, Receive, Scope, Send, send_json
from resillm.context import SCOPE_KEY
from resillm.errors import GatewayError

logger = logging.getLogger("resillm.errors")


class ErrorsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except GatewayError as exc:
            if started:
                raise
            await send_json(send, exc.status, exc.body(), self._headers(scope, exc))
        except Exception:
            ctx = scope.get(SCOPE_KEY)  # past the request layer: its id is no longer bound
            logger.exception(
                "unhandled error serving %s",
                scope.get("path"),
                extra={"request_id": ctx.request_id if ctx is not None else None},
            )
            if started:
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
