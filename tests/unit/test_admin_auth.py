"""Admin access: session tokens, the bearer check, CSRF and same-origin rules (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from resillm.admin.auth import (
    SESSION_TTL_S,
    AdminGuard,
    AdminSessions,
    key_digest,
    same_origin,
    session_cookie,
)
from resillm.admin.state import SESSION_SECRET_ENV, AdminState
from resillm.errors import PermissionDenied

KEY = "admin-key-0123456789"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def scope(headers: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "method": "POST", "headers": raw, "root_path": "", **extra}


def test_a_session_token_verifies_and_never_contains_the_key() -> None:
    sessions = AdminSessions(clock=FakeClock())
    token = sessions.issue(key_digest(KEY))
    assert KEY not in token and key_digest(KEY).hex() not in token
    session = sessions.verify(token, key_digest(KEY))
    assert session is not None and session.csrf == sessions.csrf(session.nonce)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_tampered_token_is_refused(part: int) -> None:
    sessions = AdminSessions(clock=FakeClock())
    pieces = sessions.issue(key_digest(KEY)).split(".")
    if part == 0:
        pieces[0] = str(int(pieces[0]) + 3600)  # a later expiry
    else:
        pieces[part] = pieces[part][:-1] + ("A" if pieces[part][-1] != "A" else "B")
    assert sessions.verify(".".join(pieces), key_digest(KEY)) is None


@pytest.mark.parametrize("token", ["", "x", "1.2", "abc.def.ghi", "...", "-1.n.m"])
def test_garbage_tokens_are_refused(token: str) -> None:
    assert AdminSessions().verify(token, key_digest(KEY)) is None


def test_a_token_from_another_gateway_or_for_another_key_is_refused() -> None:
    token = AdminSessions().issue(key_digest(KEY))
    assert AdminSessions().verify(token, key_digest(KEY)) is None  # another secret
    sessions = AdminSessions()
    token = sessions.issue(key_digest(KEY))
    assert sessions.verify(token, key_digest("a-new-admin-key")) is None  # key rotated


def test_sessions_expire_and_can_be_revoked() -> None:
    clock = FakeClock()
    sessions = AdminSessions(clock=clock)
    token = sessions.issue(key_digest(KEY))
    other = sessions.issue(key_digest(KEY))
    session = sessions.verify(token, key_digest(KEY))
    assert session is not None
    sessions.revoke(session)
    assert sessions.verify(token, key_digest(KEY)) is None
    assert sessions.verify(other, key_digest(KEY)) is not None
    clock.now += SESSION_TTL_S
    assert sessions.verify(other, key_digest(KEY)) is None


def guard() -> tuple[AdminGuard, str]:
    g = AdminGuard(KEY, AdminSessions())
    return g, g.sessions.issue(g.digest)


def test_bearer_right_wrong_and_missing() -> None:
    g, _ = guard()
    access = g.identify(scope({"Authorization": f"Bearer {KEY}"}))
    assert access is not None and access.session is None and access.csrf == ""
    for wrong in (f"Bearer {KEY}x", f"Basic {KEY}", "Bearer", KEY):
        with pytest.raises(PermissionDenied):
            g.identify(scope({"Authorization": wrong}))
    assert g.identify(scope()) is None
    with pytest.raises(PermissionDenied):
        g.require(scope())


def test_a_wrong_bearer_is_not_rescued_by_a_good_cookie() -> None:
    g, token = guard()
    with pytest.raises(PermissionDenied):
        g.identify(scope({"Authorization": "Bearer nope", "Cookie": f"resillm_admin={token}"}))


def test_the_cookie_is_found_among_others() -> None:
    g, token = guard()
    access = g.identify(scope({"Cookie": f"a=1; resillm_admin={token}; b=2"}))
    assert access is not None and access.session is not None
    assert g.identify(scope({"Cookie": "resillm_admin=forged.token.value"})) is None


def post_with_session(g: AdminGuard, token: str, headers: dict[str, str]) -> dict[str, Any]:
    return scope({"Cookie": f"resillm_admin={token}", "Host": "gw.local:8080", **headers})


def test_csrf_is_needed_with_the_cookie_from_header_or_form() -> None:
    g, token = guard()
    same = {"Origin": "http://gw.local:8080", "Sec-Fetch-Site": "same-origin"}
    access = g.require(post_with_session(g, token, same))
    csrf = access.csrf
    g.check_change(post_with_session(g, token, {**same, "X-CSRF-Token": csrf}), access)
    g.check_change(post_with_session(g, token, same), access, form_token=csrf)
    for bad in (None, "", csrf[:-1], csrf + "x", "0" * len(csrf)):
        with pytest.raises(PermissionDenied, match="CSRF"):
            g.check_change(post_with_session(g, token, same), access, form_token=bad)


def test_a_cross_origin_post_is_refused_even_with_the_token() -> None:
    g, token = guard()
    access = g.require(post_with_session(g, token, {}))
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "https://gw.local:8080.evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://gw.local:8080"},
        {"Origin": "null"},  # without Sec-Fetch-Site: a sandboxed frame, say
    ):
        request = post_with_session(g, token, {**headers, "X-CSRF-Token": access.csrf})
        with pytest.raises(PermissionDenied, match="cross-origin"):
            g.check_change(request, access)


def test_bearer_posts_need_no_csrf() -> None:
    g, _ = guard()
    request = scope({"Authorization": f"Bearer {KEY}", "Origin": "http://elsewhere"})
    g.check_change(request, g.require(request))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, True),  # not a browser
        ({"Origin": "http://gw.local:8080"}, True),
        ({"Origin": "HTTP://GW.LOCAL:8080"}, True),
        ({"Origin": "http://gw.local:8081"}, False),
        ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, True),  # no-referrer pages
        ({"Origin": "null"}, False),
        ({"Sec-Fetch-Site": "same-origin"}, True),
        ({"Sec-Fetch-Site": "none"}, False),
        ({"Origin": "http://proxy.example", "X-Forwarded-Host": "proxy.example"}, True),
        ({"Origin": "file://"}, False),
    ],
)
def test_same_origin(headers: dict[str, str], expected: bool) -> None:
    assert same_origin(scope({"Host": "gw.local:8080", **headers})) is expected


def test_the_session_cookie_is_httponly_strict_and_scoped() -> None:
    cookie = session_cookie(scope(root_path="/llm"), "tok").decode()
    assert cookie.startswith("resillm_admin=tok; ")
    for attribute in ("Path=/llm/admin", "HttpOnly", "SameSite=Strict", f"Max-Age={SESSION_TTL_S}"):
        assert attribute in cookie
    assert "Secure" not in cookie
    assert "Secure" in session_cookie(scope(scheme="https"), "t").decode()
    assert "Secure" in session_cookie(scope({"X-Forwarded-Proto": "https"}), "t").decode()
    assert "Max-Age=0" in session_cookie(scope(), "", max_age=0).decode()


def test_workers_share_sessions_through_the_secret_their_parent_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SESSION_SECRET_ENV, "f" * 64)
    one, two = AdminState(), AdminState()  # two worker processes
    token = one.sessions.issue(key_digest(KEY))
    assert two.sessions.verify(token, key_digest(KEY)) is not None
    monkeypatch.setenv(SESSION_SECRET_ENV, "short")  # too weak: ignored
    assert AdminState().sessions.verify(token, key_digest(KEY)) is None
    monkeypatch.delenv(SESSION_SECRET_ENV)
    assert AdminState().sessions.verify(token, key_digest(KEY)) is None
