"""ASGI type aliases and the few response helpers every layer shares."""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


def direct(app: ASGIApp) -> ASGIApp:
    """``app`` as the cheapest thing to call: a layer instance's bound ``__call__``.

    Calling an instance goes through Python's generic call path (an argument tuple, a
    method lookup) on every request; its bound method is called like a function. Layers
    keep ``self.app = direct(app)``."""
    if isinstance(type(app).__dict__.get("__call__"), types.FunctionType):
        bound: ASGIApp = app.__call__  # type: ignore[operator]
        return bound
    return app


def route_path(scope: Scope) -> str:
    """The path inside the app: ``root_path`` removed when the host left it in ``path``."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (``name`` in lower case)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def send_json(send: Send, status: int, body: bytes, headers: Headers | None = None) -> None:
    """A whole JSON response in two messages."""
    response_headers: Headers = [
        JSON_CONTENT_TYPE,
        (b"content-length", str(len(body)).encode()),
    ]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
