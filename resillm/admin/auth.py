"""Who may use the admin routes: the admin key as a bearer token, or a signed session cookie.

- **Bearer** (scripts): ``Authorization: Bearer ADMIN_KEY``, compared as SHA-256 digests
  with :func:`hmac.compare_digest`. A request that sends ``Authorization`` is judged by it
  alone, whatever cookie it also carries.
- **Session cookie** (the page): the login form checks the key the same way and sets
  ``resillm_admin=EXPIRES.NONCE.MAC`` (HttpOnly, SameSite=Strict, Path=<root>/admin).
  The MAC is an HMAC-SHA256 under a random secret made per gateway (a restart logs every
  session out) over the expiry, the nonce and the admin key's digest (a reload that
  changes the key logs every session out). The cookie never holds the key itself.
  Logout revokes the nonce until its expiry.
- **CSRF**: a state-changing request (POST) that is authenticated by the cookie must carry
  the session's CSRF token (``X-CSRF-Token`` header, as htmx sends it from ``hx-headers``,
  or the ``csrf`` form field), an HMAC of the session nonce, and must come from the page's
  own origin (``Sec-Fetch-Site`` and ``Origin``, see :func:`same_origin`). Bearer requests
  carry no ambient credential and need neither.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from resillm.asgi import Scope, header
from resillm.errors import PermissionDenied

Clock = Callable[[], float]
SESSION_COOKIE = "resillm_admin"
SESSION_TTL_S = 12 * 3600
CSRF_HEADER = b"x-csrf-token"
CSRF_FIELD = "csrf"


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    csrf: str


@dataclass(frozen=True)
class Access:
    """How a request proved it holds the admin key; ``session`` is set for the cookie."""

    session: Session | None

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session is not None else ""


class AdminSessions:
    """Issues and checks session tokens. One per gateway: it outlives reloads."""

    def __init__(self, clock: Clock = time.time, secret: bytes | None = None) -> None:
        self._clock = clock
        self._secret = secret or secrets.token_bytes(32)
        self._revoked: dict[str, int] = {}  # nonce -> expiry

    def issue(self, digest: bytes) -> str:
        expires = int(self._clock()) + SESSION_TTL_S
        nonce = secrets.token_urlsafe(18)
        return f"{expires}.{nonce}.{self._mac(expires, nonce, digest)}"

    def verify(self, token: str, digest: bytes) -> Session | None:
        expires_text, _, rest = token.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (expires_text.isdigit() and nonce and mac):
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(mac, self._mac(expires, nonce, digest)):
            return None
        if expires <= self._clock() or nonce in self._revoked:
            return None
        return Session(nonce, expires, self.csrf(nonce))

    def csrf(self, nonce: str) -> str:
        return _b64(hmac.new(self._secret, b"csrf\0" + nonce.encode(), hashlib.sha256).digest())

    def revoke(self, session: Session) -> None:
        now = self._clock()
        self._revoked = {n: e for n, e in self._revoked.items() if e > now}
        self._revoked[session.nonce] = session.expires

    def _mac(self, expires: int, nonce: str, digest: bytes) -> str:
        message = b"session\0%d\0%s\0%s" % (expires, nonce.encode(), digest)
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())


class AdminGuard:
    """The checks for one admin key (rebuilt with each config; the sessions are kept)."""

    def __init__(self, admin_key: str, sessions: AdminSessions) -> None:
        self.digest = key_digest(admin_key)
        self.sessions = sessions

    def key_matches(self, given: str | bytes) -> bool:
        return hmac.compare_digest(key_digest(given), self.digest)

    def identify(self, scope: Scope) -> Access | None:
        """The request's credential, or None when it has none; a wrong bearer raises."""
        given = header(scope, b"authorization")
        if given is not None:
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not self.key_matches(token.strip()):
                raise PermissionDenied("the admin routes need Authorization: Bearer ADMIN_KEY")
            return Access(session=None)
        found = cookie(scope, SESSION_COOKIE)
        if found is None:
            return None
        session = self.sessions.verify(found, self.digest)
        return Access(session) if session is not None else None

    def require(self, scope: Scope) -> Access:
        access = self.identify(scope)
        if access is None:
            raise PermissionDenied(
                "the admin routes need Authorization: Bearer ADMIN_KEY or a login session"
            )
        return access

    def check_change(self, scope: Scope, access: Access, form_token: str | None = None) -> None:
        """A state-changing request: with the cookie, same origin and the CSRF token."""
        session = access.session
        if session is None:
            return  # bearer: nothing ambient to forge
        if not same_origin(scope):
            raise PermissionDenied("cross-origin request refused")
        sent = header(scope, CSRF_HEADER)
        token = sent.decode("latin-1") if sent is not None else form_token or ""
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise PermissionDenied("missing or wrong CSRF token")


def cookie(scope: Scope, name: str) -> str | None:
    """A cookie's value from the request's ``Cookie`` header(s)."""
    for key, value in scope.get("headers", ()):
        if key != b"cookie":
            continue
        for part in bytes(value).decode("latin-1").split(";"):
            found, _, content = part.strip().partition("=")
            if found == name:
                return content
    return None


def same_origin(scope: Scope) -> bool:
    """Whether a browser says this request comes from the gateway's own pages.

    ``Sec-Fetch-Site``, when sent (every current browser), must be ``same-origin``.
    ``Origin``, when it names an origin, must name this host (``Host``, or
    ``X-Forwarded-Host`` behind a proxy; a page cannot set either on a cross-site post).
    ``Origin: null`` passes only with ``Sec-Fetch-Site: same-origin``: the page's own
    ``Referrer-Policy: no-referrer`` makes browsers send ``null`` on its same-origin POSTs.
    A client that sends neither header is not a browser, so has no ambient cookie to abuse.
    """
    site = header(scope, b"sec-fetch-site")
    if site is not None and site != b"same-origin":
        return False
    origin = header(scope, b"origin")
    if origin is None:
        return True
    if origin == b"null":
        return site == b"same-origin"
    parts = urlsplit(origin.decode("latin-1"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    hosts = {h.decode("latin-1").lower() for h in _hosts(scope)}
    return parts.netloc.lower() in hosts


def _hosts(scope: Scope) -> list[bytes]:
    host = header(scope, b"host")
    found = [host] if host is not None else []
    forwarded = header(scope, b"x-forwarded-host")
    if forwarded is not None:
        found.extend(h.strip() for h in forwarded.split(b","))
    return found


def session_cookie(scope: Scope, token: str, *, max_age: int = SESSION_TTL_S) -> bytes:
    """The ``Set-Cookie`` value: scoped to this gateway's admin routes, never to scripts."""
    path = scope.get("root_path", "") + "/admin"
    value = f"{SESSION_COOKIE}={token}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    forwarded = header(scope, b"x-forwarded-proto")
    if scope.get("scheme") == "https" or forwarded == b"https":
        value += "; Secure"
    return value.encode("latin-1")
