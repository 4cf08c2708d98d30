"""The admin routes on the real gateway: access control, CSRF, headers, secrets, data."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from starlette.applications import Starlette
from starlette.routing import Mount

from resillm.app import create_app
from resillm.mock_upstream import MockUpstream
from tests.conftest import serve_asgi

pytestmark = pytest.mark.anyio

ADMIN_KEY = "admin-key-secret-0004"
CLIENT_KEY = "client-key-secret-0003"
SECRETS = (
    "sk-provider-secret-0001",
    "sk-target-secret-0002",
    CLIENT_KEY,
    ADMIN_KEY,
    "https://hooks.example.com/secret-0005",
    "https://hooks.slack.com/services/secret-0006",
    "smtp-password-secret-0007",
    "header-token-secret-0008",
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'"
)
FRAGMENTS = ("targets", "budget", "charts", "requests", "config", "request?id=x")
JSON_ROUTES = ("targets", "config", "requests", "budget")


def admin_config(upstream: MockUpstream, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    base = upstream.url + "/v1"
    return {
        "providers": {
            "flaky": {
                "type": "openai_compatible",
                "base_url": base,
                "api_key": "sk-provider-secret-0001",
                "headers": {
                    "x-mock-fail-status": "503",
                    "X-Api-Token": "header-token-secret-0008",
                },
            },
            "steady": {"type": "openai_compatible", "base_url": base},
        },
        "models": {
            "chat": {
                "targets": [
                    {"provider": "flaky", "model": "f"},
                    {"provider": "steady", "model": "s", "api_key": "sk-target-secret-0002"},
                ]
            }
        },
        "auth": {"admin_key": ADMIN_KEY, "keys": [{"name": "team", "key": CLIENT_KEY}]},
        "resilience": {"retry": {"max_attempts": 1}, "circuit_breaker": {"failure_threshold": 1}},
        "budget": {
            "hourly_limit": 10.0,
            "snapshot_path": str(tmp_path / "budget.json"),
            "alerts": {
                "webhook_url": "https://hooks.example.com/secret-0005",
                "slack_webhook_url": "https://hooks.slack.com/services/secret-0006",
                "email": {
                    "smtp_host": "127.0.0.1",
                    "from": "gw@example.com",
                    "to": ["ops@example.com"],
                    "password": "smtp-password-secret-0007",
                },
            },
        },
        "logging": {"level": "error"},
        **sections,
    }


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    text: str


@dataclass
class Admin:
    url: str
    path: Path
    session: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
    ) -> Reply:
        async with self.session.request(
            method, self.url + path, headers=headers or {}, data=data, allow_redirects=False
        ) as response:
            text = await response.text()
            return Reply(response.status, CIMultiDict(response.headers), text)

    async def login(self) -> tuple[str, str]:
        """Sign in with the form: (the Cookie header value, the page's CSRF token)."""
        reply = await self.call("POST", "/admin/login", data={"key": ADMIN_KEY})
        assert reply.status == 303, reply
        cookie = reply.headers["Set-Cookie"].split(";")[0]
        page = await self.call("GET", "/admin/", {"Cookie": cookie})
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match, page.text[:500]
        return cookie, match.group(1)

    async def chat(self, content: str = "hello") -> int:
        body = {
            "model": "chat",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": content}],
        }
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with self.session.post(
            self.url + "/v1/chat/completions", json=body, headers=headers
        ) as response:
            await response.read()
            return response.status


@asynccontextmanager
async def admin_gateway(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[Admin]:
    path = tmp_path / "resillm.yaml"
    path.write_text(json.dumps(config))
    async with serve_asgi(create_app(path, watch=False), config) as url:
        async with aiohttp.ClientSession() as session:
            yield Admin(url, path, session)


def flipped(token: str) -> str:
    """The token with its last character changed."""
    return token[:-1] + ("B" if token.endswith("A") else "A")


BEARER = {"Authorization": f"Bearer {ADMIN_KEY}"}
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


async def test_admin_is_404_while_no_admin_key_is_set(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = admin_config(upstream, tmp_path)
    config["auth"] = {"keys": [{"name": "team", "key": CLIENT_KEY}]}
    async with admin_gateway(config, tmp_path) as admin:
        for path in ("/admin", "/admin/", "/admin/login", "/admin/static/htmx.min.js",
                     "/admin/targets", "/admin/fragments/targets"):  # fmt: skip
            assert (await admin.call("GET", path, BEARER)).status == 404, path
        assert (await admin.call("POST", "/admin/login", data={"key": "x"})).status == 404


async def test_without_credentials_the_page_asks_to_sign_in_and_data_is_refused(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        page = await admin.call("GET", "/admin/")
        assert page.status == 200 and 'action="/admin/login"' in page.text
        assert 'type="password"' in page.text
        assert (await admin.call("GET", "/admin")).headers["Location"] == "/admin/"
        for name in JSON_ROUTES:
            assert (await admin.call("GET", f"/admin/{name}")).status == 403
        for name in FRAGMENTS:
            reply = await admin.call("GET", f"/admin/fragments/{name}", {"HX-Request": "true"})
            assert reply.status == 403
            assert reply.headers["HX-Redirect"] == "/admin/login"  # htmx goes to the form
        assert (await admin.call("POST", "/admin/reload", SAME_ORIGIN)).status == 403


async def test_a_wrong_key_is_refused_everywhere(upstream: MockUpstream, tmp_path: Path) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        for wrong in ("Bearer not-the-key", f"Bearer {ADMIN_KEY}-", f"Basic {ADMIN_KEY}"):
            headers = {"Authorization": wrong}
            assert (await admin.call("GET", "/admin/", headers)).status == 403
            assert (await admin.call("GET", "/admin/targets", headers)).status == 403
            assert (await admin.call("POST", "/admin/reload", headers)).status == 403
        login = await admin.call("POST", "/admin/login", data={"key": "not-the-key"})
        assert login.status == 401 and "Set-Cookie" not in login.headers
        assert "not the admin key" in login.text and "not-the-key" not in login.text


async def test_the_bearer_key_reaches_every_route(upstream: MockUpstream, tmp_path: Path) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        page = await admin.call("GET", "/admin/", BEARER)
        assert page.status == 200 and 'id="targets"' in page.text
        assert "Sign out" not in page.text  # nothing to sign out of
        for name in JSON_ROUTES:
            reply = await admin.call("GET", f"/admin/{name}", BEARER)
            assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
        for name in FRAGMENTS:
            assert (await admin.call("GET", f"/admin/fragments/{name}", BEARER)).status == 200
        reload = await admin.call("POST", "/admin/reload", BEARER)  # no CSRF for a bearer
        assert reload.status == 200 and json.loads(reload.text)["applied"] is True


async def test_login_sets_a_strict_httponly_session_cookie_and_logout_ends_it(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        reply = await admin.call("POST", "/admin/login", SAME_ORIGIN, data={"key": ADMIN_KEY})
        assert reply.status == 303 and reply.headers["Location"] == "/admin/"
        set_cookie = reply.headers["Set-Cookie"]
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/admin"):
            assert attribute in set_cookie
        assert ADMIN_KEY not in set_cookie
        cookie, csrf = await admin.login()
        assert (await admin.call("GET", "/admin/login", {"Cookie": cookie})).status == 303
        for name in FRAGMENTS:
            reply = await admin.call("GET", f"/admin/fragments/{name}", {"Cookie": cookie})
            assert reply.status == 200
        assert (await admin.call("GET", "/admin/targets", {"Cookie": cookie})).status == 200

        refused = await admin.call("POST", "/admin/logout", {"Cookie": cookie, **SAME_ORIGIN})
        assert refused.status == 403  # no CSRF token
        out = await admin.call(
            "POST", "/admin/logout", {"Cookie": cookie, **SAME_ORIGIN}, data={"csrf": csrf}
        )
        assert out.status == 303 and out.headers["Location"] == "/admin/login"
        assert "Max-Age=0" in out.headers["Set-Cookie"]
        # The old cookie is revoked, not just forgotten by the browser.
        after = await admin.call("GET", "/admin/", {"Cookie": cookie})
        assert 'type="password"' in after.text
        assert (await admin.call("GET", "/admin/targets", {"Cookie": cookie})).status == 403


async def test_a_tampered_cookie_is_no_session(upstream: MockUpstream, tmp_path: Path) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        cookie, _ = await admin.login()
        name, _, token = cookie.partition("=")
        expires, nonce, mac = token.split(".")
        for forged in (
            f"{int(expires) + 86400}.{nonce}.{mac}",
            f"{expires}.{nonce}x.{mac}",
            f"{expires}.{nonce}.{mac[:-2]}",
            ADMIN_KEY,
        ):
            page = await admin.call("GET", "/admin/", {"Cookie": f"{name}={forged}"})
            assert 'type="password"' in page.text
            reply = await admin.call("GET", "/admin/config", {"Cookie": f"{name}={forged}"})
            assert reply.status == 403


@pytest.mark.parametrize("route", ["/admin/reload", "/admin/fragments/reload"])
async def test_reload_with_the_cookie_needs_the_csrf_token_and_the_same_origin(
    upstream: MockUpstream, tmp_path: Path, route: str
) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        cookie, csrf = await admin.login()
        session = {"Cookie": cookie, "Host": admin.url.removeprefix("http://")}
        cases = [
            ({**session, **SAME_ORIGIN}, "CSRF"),  # missing
            ({**session, **SAME_ORIGIN, "X-CSRF-Token": flipped(csrf)}, "CSRF"),  # wrong
            ({**session, "Origin": "http://evil.example", "X-CSRF-Token": csrf}, "cross-origin"),
            ({**session, "Sec-Fetch-Site": "cross-site", "X-CSRF-Token": csrf}, "cross-origin"),
        ]
        for headers, reason in cases:
            reply = await admin.call("POST", route, headers)
            assert reply.status == 403 and reason in reply.text, (headers, reply.text)
        ok = {**session, "Origin": admin.url, "Sec-Fetch-Site": "same-origin"}
        reply = await admin.call("POST", route, {**ok, "X-CSRF-Token": csrf})
        assert reply.status == 200
        if route.startswith("/admin/fragments"):
            assert "Reloaded" in reply.text and reply.headers["HX-Trigger"] == "reloaded"
            form = await admin.call("POST", route, ok, data={"csrf": csrf})  # the no-JS form
            assert form.status == 200
        else:
            assert json.loads(reply.text)["applied"] is True


async def test_a_login_posted_from_another_origin_is_refused(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            reply = await admin.call("POST", "/admin/login", headers, data={"key": ADMIN_KEY})
            assert reply.status == 403 and "Set-Cookie" not in reply.headers


async def test_every_admin_response_carries_the_security_headers(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        replies = [
            await admin.call("GET", "/admin/"),
            await admin.call("GET", "/admin/", BEARER),
            await admin.call("GET", "/admin/targets"),  # a 403
            await admin.call("GET", "/admin/nothing-here", BEARER),  # a 404
            await admin.call("GET", "/admin/fragments/charts", BEARER),
            await admin.call("GET", "/admin/static/admin.css"),
        ]
        for reply in replies:
            assert reply.headers["Content-Security-Policy"].startswith(CSP)
            assert reply.headers["X-Frame-Options"] == "DENY"
            assert reply.headers["Referrer-Policy"] == "no-referrer"
            assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert replies[1].headers["Cache-Control"] == "no-store"
        assert "immutable" in replies[-1].headers["Cache-Control"]


async def test_the_page_uses_only_its_own_versioned_static_files(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        page = (await admin.call("GET", "/admin/", BEARER)).text
        assert "<style" not in page and " style=" not in page and "onclick" not in page
        scripts = re.findall(r"<script[^>]*>", page)
        assert scripts == [re.search(r'<script src="/admin/static/htmx.min.js\?v=\w+" defer>', page)
                           .group(0)]  # type: ignore[union-attr]  # fmt: skip
        assert '"includeIndicatorStyles":false' in page.replace("&quot;", '"')
        js = await admin.call("GET", "/admin/static/htmx.min.js")
        assert js.status == 200 and js.headers["Content-Type"].startswith("text/javascript")
        assert js.text.startswith("/*! htmx 2.")
        for missing in ("VENDORED.md", "../api.py", "nope.js"):
            assert (await admin.call("GET", f"/admin/static/{missing}")).status == 404


async def test_no_secret_appears_in_any_admin_response(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = admin_config(upstream, tmp_path, admin={"recent_requests": 10})
    config["logging"]["log_responses"] = True
    async with admin_gateway(config, tmp_path) as admin:
        for secret in SECRETS:  # clients paste keys into prompts too
            assert await admin.chat(f"here is {secret} for you") == 200
        cookie, csrf = await admin.login()
        requests = json.loads((await admin.call("GET", "/admin/requests", BEARER)).text)
        ids = [r["request_id"] for r in requests["requests"]]
        paths = ["/admin/", "/admin/login", *(f"/admin/{n}" for n in JSON_ROUTES)]
        paths += [f"/admin/fragments/{n}" for n in FRAGMENTS]
        paths += [f"/admin/fragments/request?id={i}" for i in ids]
        replies = []
        for credentials in (BEARER, {"Cookie": cookie}):
            for path in paths:
                replies.append(await admin.call("GET", path, credentials))
        posting = {"Cookie": cookie, **SAME_ORIGIN, "X-CSRF-Token": csrf}
        replies.append(await admin.call("POST", "/admin/fragments/reload", posting))
        replies.append(await admin.call("POST", "/admin/reload", BEARER))
        assert all(r.status in (200, 303) for r in replies), [r.status for r in replies]
        assert any("request body" in r.text for r in replies)  # the bodies were shown
        for reply in replies:
            everything = reply.text + json.dumps(list(reply.headers.items()))
            for secret in SECRETS:
                assert secret not in everything, (secret, reply.text[:300])


async def test_recent_requests_follow_the_traffic_newest_first(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = admin_config(upstream, tmp_path, admin={"recent_requests": 3})
    config["logging"]["log_requests"] = False  # the admin list does not depend on the log
    async with admin_gateway(config, tmp_path) as admin:
        for i in range(5):
            assert await admin.chat(f"message {i}") == 200
        reply = await admin.call("GET", "/admin/requests", BEARER)
        items = json.loads(reply.text)["requests"]
        assert len(items) == 3
        assert items[0]["ts"] >= items[1]["ts"] >= items[2]["ts"]
        assert {i["model"] for i in items} == {"chat"} and items[0]["key"] == "team"
        assert "request_body" not in items[0]  # bodies only with logging.log_responses
        assert len(json.loads((await admin.call("GET", "/admin/requests?limit=1", BEARER))
                              .text)["requests"]) == 1  # fmt: skip
        # The first request fell back from the failing target: counted in the charts.
        charts = await admin.call("GET", "/admin/fragments/charts", BEARER)
        assert "5 in 15 min" not in charts.text and "1 in 15 min" in charts.text
        # A reload keeps the lists and charts (they belong to the gateway).
        assert (await admin.call("POST", "/admin/reload", BEARER)).status == 200
        after = json.loads((await admin.call("GET", "/admin/requests", BEARER)).text)
        assert [i["request_id"] for i in after["requests"]] == [i["request_id"] for i in items]


async def test_targets_json_and_panel_agree(upstream: MockUpstream, tmp_path: Path) -> None:
    async with admin_gateway(admin_config(upstream, tmp_path), tmp_path) as admin:
        assert await admin.chat() == 200
        targets = json.loads((await admin.call("GET", "/admin/targets", BEARER)).text)["targets"]
        circuits = {t["id"]: t["circuit"] for t in targets}
        assert circuits == {
            "flaky/f": "open",
            next(i for i in circuits if i != "flaky/f"): "closed",
        }
        panel = (await admin.call("GET", "/admin/fragments/targets", BEARER)).text
        for target_id, state in circuits.items():
            assert f'data-target="{target_id}" data-circuit="{state}"' in panel


async def test_the_page_works_mounted_under_a_prefix(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    gateway = create_app(admin_config(upstream, tmp_path))
    host = Starlette(routes=[Mount("/llm", app=gateway)], lifespan=gateway.lifespan)
    async with serve_asgi(host) as url, aiohttp.ClientSession() as session:
        admin = Admin(url, tmp_path, session)
        assert (await admin.call("GET", "/llm/admin")).headers["Location"] == "/llm/admin/"
        login = await admin.call("GET", "/llm/admin/")
        assert 'action="/llm/admin/login"' in login.text
        assert 'href="/llm/admin/static/admin.css?v=' in login.text
        reply = await admin.call("POST", "/llm/admin/login", data={"key": ADMIN_KEY})
        assert reply.headers["Location"] == "/llm/admin/"
        assert "Path=/llm/admin;" in reply.headers["Set-Cookie"]
        cookie = reply.headers["Set-Cookie"].split(";")[0]
        page = await admin.call("GET", "/llm/admin/", {"Cookie": cookie})
        assert 'hx-get="/llm/admin/fragments/targets"' in page.text
        assert 'src="/llm/admin/static/htmx.min.js?v=' in page.text
        fragment = await admin.call("GET", "/llm/admin/fragments/targets", {"Cookie": cookie})
        assert fragment.status == 200 and "flaky/f" in fragment.text
