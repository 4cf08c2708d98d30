"""The shared HTTP session and the one place transport failures become ``resillm.errors``."""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from types import TracebackType

import aiohttp
import msgspec

from resillm.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)

MAX_ERROR_BODY_BYTES = 64 * 1024
DNS_CACHE_S = 300
KEEPALIVE_S = 60.0
MIN_SECRET_CHARS = 8


def create_session() -> aiohttp.ClientSession:
    """The process's one client session. Per-provider connection caps are enforced by each
    provider's semaphore, so the connector itself is unbounded."""
    connector = aiohttp.TCPConnector(
        limit=0, ttl_dns_cache=DNS_CACHE_S, keepalive_timeout=KEEPALIVE_S
    )
    return aiohttp.ClientSession(
        connector=connector,
        # No cookie jar: a cookie an upstream sets while answering one client must never ride
        # along with another client's request (the gateway is stateless toward upstreams).
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "resillm"},
        json_serialize=lambda obj: msgspec.json.encode(obj).decode(),
    )


def pool_connections(session: aiohttp.ClientSession) -> tuple[int, int]:
    """The session's upstream connections: (active, idle) — in use by a request (or being
    opened for one), and kept alive for reuse. aiohttp has no public count, so this reads
    the connector's own bookkeeping, and says (0, 0) should that ever move."""
    connector = session.connector
    acquired = getattr(connector, "_acquired", None)
    kept = getattr(connector, "_conns", None)
    active = len(acquired) if isinstance(acquired, set) else 0
    idle = sum(len(conns) for conns in kept.values()) if isinstance(kept, dict) else 0
    return active, idle


class upstream_errors:  # lower case: it reads as a statement, `with upstream_errors(...)`
    """Map aiohttp and timeout failures of one upstream attempt to ``UpstreamError``s."""

    __slots__ = ("model", "provider")

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None or isinstance(exc, (UpstreamError, asyncio.CancelledError)):
            return
        # aiohttp keeps some errors (a StreamReader's, raised again on every read) and their
        # traceback holds the reader: a cycle only the garbage collector would free.
        exc.__traceback__ = None
        where = f"{self.provider}/{self.model}"
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            raise UpstreamTimeout(
                f"{where}: timed out", provider=self.provider, model=self.model
            ) from exc
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            detail = _TRANSPORT_WORDS.get(type(exc)) or str(exc) or type(exc).__name__
            raise UpstreamConnectError(
                f"{where}: {detail}", provider=self.provider, model=self.model
            ) from exc


# aiohttp's own messages for these name internals ("TransferEncodingError: 400") that
# would mislead a user reading the error.
_TRANSPORT_WORDS: dict[type[BaseException], str] = {
    aiohttp.ClientPayloadError: "the connection broke before the answer was complete",
    aiohttp.ServerDisconnectedError: "the upstream closed the connection",
}


class _OpenAIErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class _OpenAIErrorBody(msgspec.Struct):
    error: _OpenAIErrorDetail | str | None = None
    message: str | None = None


def parse_retry_after(headers: aiohttp.typedefs.LooseHeaders) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or HTTP date."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    millis = get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Provider keys have recognisable shapes: OpenAI/Anthropic "sk-...", "sk-ant-...",
# "sess-...", AWS access key ids. Plain words such as "api-version" must survive.
_KEY_LIKE_RE = re.compile(r"\b(?:sk|pk|rk|sess)[-_][A-Za-z0-9_*\-.]{8,}|\bAKIA[0-9A-Z]{16}\b")


def redact_secrets(text: str, secret: str | None) -> str:
    """Upstream messages echo keys ("Incorrect API key provided: sk-...") — never pass them on."""
    if secret and len(secret) >= MIN_SECRET_CHARS:  # a short "key" would mangle plain words
        text = text.replace(secret, "***")
    return _KEY_LIKE_RE.sub("***", text)


# Sent headers whose names say they carry a credential (extra ``headers:`` included).
_CREDENTIAL_HEADER_RE = re.compile(r"auth|key|token|secret|password|cookie|signature", re.I)


def _sent_credentials(response: aiohttp.ClientResponse) -> list[str]:
    """The credential values the request carried ("Bearer KEY" gives KEY)."""
    info = getattr(response, "request_info", None)
    sent = info.headers.items() if info is not None else ()
    return [v.rpartition(" ")[2] for k, v in sent if _CREDENTIAL_HEADER_RE.search(k)]


async def status_error(
    response: aiohttp.ClientResponse, provider: str, model: str, secret: str | None = None
) -> UpstreamStatusError:
    """Read an upstream error answer (bounded) into an ``UpstreamStatusError``."""
    raw = await response.content.read(MAX_ERROR_BODY_BYTES)
    message, error_type, code, param = "", None, None, None
    try:
        body = msgspec.json.decode(raw, type=_OpenAIErrorBody)
    except msgspec.DecodeError:
        body = None
    if body is not None and isinstance(body.error, _OpenAIErrorDetail):
        message = body.error.message or ""
        error_type = body.error.type
        code = None if body.error.code is None else str(body.error.code)
        param = body.error.param
    elif body is not None:
        message = (body.error if isinstance(body.error, str) else None) or body.message or ""
    if not message:
        message = raw[:500].decode("utf-8", "replace").strip() or (response.reason or "")
    for sent in _sent_credentials(response):
        message = redact_secrets(message, sent)
    return UpstreamStatusError(
        response.status,
        redact_secrets(message, secret),
        error_type=error_type,
        code=code,
        param=param,
        provider=provider,
        model=model,
        retry_after_s=parse_retry_after(response.headers),
    )
