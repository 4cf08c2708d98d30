"""Admin responses: every one with the page's security headers; forms read with limits.

The Content-Security-Policy allows only the gateway's own script (htmx) and stylesheet: no
inline script or style, no framing, forms post only back here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from urllib.parse import parse_qsl

from resillm.asgi import Headers, Receive, Send
from resillm.errors import InvalidRequest, RequestTimeout, RequestTooLarge

CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CSP),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
NO_STORE = (b"cache-control", b"no-store")
HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
MAX_FORM_BYTES = 8 * 1024
# A form is a key or a token: a client trickling one (the login form needs no key) is cut
# off as /v1 bodies are after server.body_timeout.
FORM_TIMEOUT_S = 10.0


async def send_body(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    cache: tuple[bytes, bytes] = NO_STORE,
) -> None:
    response_headers: Headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        cache,
        *SECURITY_HEADERS,
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_html(
    send: Send, status: int, text: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send_body(send, status, text.encode(), HTML, headers)


async def redirect(send: Send, location: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """303: after a form post the browser fetches ``location`` with GET."""
    await send_body(send, 303, b"", HTML, [(b"location", location.encode()), *headers])


async def read_form(
    receive: Receive, limit: int = MAX_FORM_BYTES, within_s: float = FORM_TIMEOUT_S
) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (small: a key or a token)."""
    body = bytearray()
    try:
        async with asyncio.timeout(within_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise InvalidRequest("the client went away")
                body += message.get("body", b"")
                if len(body) > limit:
                    raise RequestTooLarge(f"an admin form is at most {limit} bytes")
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise RequestTimeout(f"the form did not arrive within {within_s:g}s") from None
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise InvalidRequest("the form is not UTF-8") from None
    return dict(parse_qsl(text, keep_blank_values=True))
