"""Client keys (``Authorization: Bearer KEY`` or ``x-api-key``) and per-key model allow-lists.

Keys are looked up by their SHA-256, so the lookup time says nothing about how much of a
guessed key was right; with no keys configured the ``/v1`` routes are open.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection

from resillm.asgi import ASGIApp, Receive, Scope, Send, direct, header
from resillm.config import ClientKeyConfig
from resillm.context import RequestContext
from resillm.errors import AuthenticationFailed, PermissionDenied


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class AuthMiddleware:
    def __init__(
        self, app: ASGIApp, *, keys: list[ClientKeyConfig], aliases: Collection[str]
    ) -> None:
        self.app = direct(app)
        self.keys = {_digest(k.key.encode()): k for k in keys}
        self.aliases = aliases

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        client_key = self.authenticate(scope)
        ctx.client_key = client_key
        alias = ctx.alias
        if (
            alias is not None
            and client_key.models is not None
            and alias in self.aliases
            and alias not in client_key.models
        ):
            raise PermissionDenied(f"this key may not use model '{alias}'", param="model")
        await self.app(scope, receive, send)

    def authenticate(self, scope: Scope) -> ClientKeyConfig:
        presented = None
        authorization = header(scope, b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() == b"bearer":
                presented = token.strip()
        if not presented:
            presented = header(scope, b"x-api-key")
        if not presented:
            raise AuthenticationFailed(
                "missing API key: send Authorization: Bearer KEY or an x-api-key header"
            )
        digest = _digest(presented)
        found = self.keys.get(digest)
        if found is None or not hmac.compare_digest(_digest(found.key.encode()), digest):
            raise AuthenticationFailed("invalid API key")
        return found
