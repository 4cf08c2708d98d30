"""CORS for the ``/v1`` routes (``cors:``): closed unless ``allow_origins`` names origins.

The layer is only in the stack when ``allow_origins`` is not empty. A request whose
``Origin`` is allowed gets ``Access-Control-Allow-Origin`` (the origin itself, with
``Vary: Origin``) on its answer; a preflight (``OPTIONS`` with
``Access-Control-Request-Method``) from an allowed origin is answered here, before
authentication, with the allowed methods, headers and ``max_age``. Anything else passes
through untouched, so a browser on another origin gets no CORS header and is refused.
It is the outermost layer, so the error answers the errors layer writes carry the headers too.
"""

from __future__ import annotations

from resillm.asgi import ASGIApp, Headers, Message, Receive, Scope, Send, direct, header
from resillm.config import CorsConfig

ALLOW_METHODS = b"GET, POST, OPTIONS"


class CorsMiddleware:
    def __init__(self, app: ASGIApp, *, config: CorsConfig) -> None:
        self.app = direct(app)
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(o.encode("latin-1") for o in config.allow_origins)
        self.preflight_headers: Headers = [
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ", ".join(config.allow_headers).encode("latin-1")),
            (b"access-control-max-age", str(config.max_age).encode()),
        ]
        self.response_headers: Headers = []
        if config.expose_headers:
            exposed = ", ".join(config.expose_headers).encode("latin-1")
            self.response_headers.append((b"access-control-expose-headers", exposed))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or not (self.any_origin or origin in self.origins):
            await self.app(scope, receive, send)
            return
        allowed: Headers = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [*allowed, *self.preflight_headers],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), *allowed, *self.response_headers]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)
