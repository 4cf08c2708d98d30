"""The admin routes: JSON endpoints (SPEC section 3), the page, its fragments and login.

Off (404) without ``auth.admin_key``. Access rules are in :mod:`resillm.admin.auth`: the
key as a bearer token, or the session cookie set by ``/admin/login``; POSTs authenticated
by the cookie need the CSRF token and the page's own origin. Unauthenticated page requests
get the login form; JSON and fragment requests get 403 (fragments asked by htmx also get
``HX-Redirect`` to the login form). Every response carries the page's security headers,
and every configured secret is scrubbed from every body as a last line of defence.

| route | what |
|---|---|
| GET ``/admin/`` | the page · GET/POST ``/admin/login`` · POST ``/admin/logout`` |
| GET ``/admin/targets``, ``/config``, ``/requests``, ``/budget`` | JSON |
| POST ``/admin/reload`` | JSON ``ReloadReport`` (422 when refused) |
| GET ``/admin/fragments/{targets,budget,charts,requests,config,request}`` | HTML |
| POST ``/admin/fragments/reload`` | HTML report; ``HX-Trigger: reloaded`` |
| GET ``/admin/static/{htmx.min.js,admin.css}`` | files, cached for a year |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl

import msgspec

import resillm
from resillm.admin import activity, fragments
from resillm.admin.auth import Access, AdminGuard, same_origin, session_cookie
from resillm.admin.data import (
    BudgetReport,
    budget_report,
    masked_config,
    secret_values,
    targets_report,
)
from resillm.admin.pages import Panels, admin_page, login_page
from resillm.admin.respond import JSON, read_form, redirect, send_body, send_html
from resillm.admin.state import AdminState
from resillm.admin.static import send_asset
from resillm.asgi import Receive, Scope, Send, header, route_path
from resillm.budget import BudgetTracker
from resillm.config import Config
from resillm.config_diff import ReloadReport
from resillm.errors import GatewayError, MethodNotAllowed, NotFound, PermissionDenied
from resillm.redact import scrub_secrets
from resillm.schema import json_encoder
from resillm.targets import Route

JSON_ROUTES = ("targets", "config", "requests", "budget")
FRAGMENTS = ("targets", "budget", "charts", "requests", "config", "request", "reload")


class RequestsReport(msgspec.Struct):
    requests: list[dict[str, object]]


class AdminAPI:
    def __init__(
        self,
        admin_key: str | None,
        routes: Callable[[], Mapping[str, Route]],
        *,
        config: Config | None = None,
        reload: Callable[[], Awaitable[ReloadReport]] | None = None,
        state: AdminState | None = None,
        budget: BudgetTracker | None = None,
        secrets: frozenset[str] = frozenset(),
    ) -> None:
        self.state = state or AdminState()
        self.guard = AdminGuard(admin_key, self.state.sessions) if admin_key else None
        self._routes = routes
        self._config = config
        self._reload = reload
        self._budget = budget
        # Every configured secret, longest first (one that contains another goes whole).
        known = secrets | secret_values(config) if config is not None else secrets
        self._secrets = tuple(sorted(known, key=len, reverse=True))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.guard is None:
            raise NotFound("the admin routes are off: set auth.admin_key to turn them on")
        try:
            await self.dispatch(self.guard, scope, receive, send)
        except GatewayError as exc:
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await send_body(send, exc.status, exc.body(), JSON, extra)

    async def dispatch(self, guard: AdminGuard, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope).removeprefix("/admin")
        method = scope["method"]
        base = scope.get("root_path", "") + "/admin"
        if path == "":
            _only(method, "GET")
            await redirect(send, base + "/")
        elif path.startswith("/static/"):
            _only(method, "GET")
            await send_asset(send, path.removeprefix("/static/"))
        elif path == "/login":
            await self.login(guard, scope, receive, send, base)
        elif path == "/logout":
            _only(method, "POST")
            await self.logout(guard, scope, receive, send, base)
        elif path == "/":
            _only(method, "GET")
            access = guard.identify(scope)
            if access is None:
                await send_html(send, 200, login_page(base))
            else:
                await send_html(send, 200, self.scrub(await self.page(access, base)))
        elif path == "/reload" and self._reload is not None:
            _only(method, "POST")
            guard.check_change(scope, guard.require(scope))
            report = await self._reload()
            await self.json(send, json_encoder.encode(report), 200 if report.applied else 422)
        elif path.startswith("/fragments/") and path[11:] in FRAGMENTS:
            await self.fragment(guard, path[11:], scope, receive, send)
        elif path[1:] in JSON_ROUTES:
            _only(method, "GET")
            guard.require(scope)
            await self.json(send, await self.json_body(path[1:], scope))
        else:
            raise NotFound(f"no such endpoint: {method} {route_path(scope)}")

    # -- session ----------------------------------------------------------------------------

    async def login(
        self, guard: AdminGuard, scope: Scope, receive: Receive, send: Send, base: str
    ) -> None:
        method = scope["method"]
        _only(method, "GET", "POST")
        if method == "GET":
            if guard.identify(scope) is not None:
                await redirect(send, base + "/")
            else:
                await send_html(send, 200, login_page(base))
            return
        if not same_origin(scope):
            raise PermissionDenied("cross-origin request refused")
        form = await read_form(receive)
        if not guard.key_matches(form.get("key", "")):
            await send_html(send, 401, login_page(base, "That is not the admin key."))
            return
        token = guard.sessions.issue(guard.digest)
        await redirect(send, base + "/", [(b"set-cookie", session_cookie(scope, token))])

    async def logout(
        self, guard: AdminGuard, scope: Scope, receive: Receive, send: Send, base: str
    ) -> None:
        access = guard.require(scope)
        form = await read_form(receive)
        guard.check_change(scope, access, form.get("csrf"))
        if access.session is not None:
            guard.sessions.revoke(access.session)
        cleared = session_cookie(scope, "", max_age=0)
        await redirect(send, base + "/login", [(b"set-cookie", cleared)])

    # -- data -------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        if self._config is None:
            raise NotFound("this admin API has no config to show")
        return self._config

    async def json_body(self, name: str, scope: Scope) -> bytes:
        if name == "targets":
            return json_encoder.encode(targets_report(self._routes()))
        if name == "config":
            return json_encoder.encode(masked_config(self.config))
        if name == "budget":
            return json_encoder.encode(await self.budget())
        limit = _query(scope).get("limit")
        items = self.recent(int(limit) if limit and limit.isdigit() else None)
        return json_encoder.encode(RequestsReport(items))

    def recent(self, limit: int | None = None) -> list[dict[str, object]]:
        return self.state.recent.newest(limit, self._secrets)

    async def budget(self) -> BudgetReport:
        if self._budget is None:
            raise NotFound("this admin API has no budget tracker")
        keys = self._config.auth.keys if self._config is not None else []
        return await budget_report(self._budget, keys)

    # -- HTML -------------------------------------------------------------------------------

    async def page(self, access: Access, base: str) -> str:
        panels = Panels(
            targets=await self.render("targets", base, {}),
            budget=await self.render("budget", base, {}),
            charts=await self.render("charts", base, {}),
            requests=await self.render("requests", base, {}),
            config=await self.render("config", base, {}),
        )
        return admin_page(
            base=base,
            csrf=access.csrf,
            session=access.session is not None,
            version=resillm.__version__,
            recent_size=self.state.recent.size,
            panels=panels,
        )

    async def fragment(
        self, guard: AdminGuard, name: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        base = scope.get("root_path", "") + "/admin"
        access = guard.identify(scope)
        if access is None:
            # htmx follows HX-Redirect even on an error status: an expired session lands
            # on the login form instead of a page that silently stops updating.
            hx = (
                [(b"hx-redirect", f"{base}/login".encode())] if header(scope, b"hx-request") else []
            )
            error = PermissionDenied("sign in first: the session is missing or has expired")
            await send_body(send, error.status, error.body(), JSON, hx)
            return
        if name == "reload":
            _only(scope["method"], "POST")
            form = await read_form(receive)
            guard.check_change(scope, access, form.get("csrf"))
            if self._reload is None:
                raise NotFound("this gateway cannot reload")
            report = await self._reload()
            text = fragments.reload_fragment(report)
            await send_html(send, 200, self.scrub(text), [(b"hx-trigger", b"reloaded")])
            return
        _only(scope["method"], "GET")
        text = await self.render(name, base, _query(scope))
        await send_html(send, 200, self.scrub(text))

    async def render(self, name: str, base: str, query: dict[str, str]) -> str:
        if name == "targets":
            return fragments.targets_fragment(targets_report(self._routes()))
        if name == "budget":
            if self._budget is None:
                return '<p class="muted">No budget tracker.</p>'
            return fragments.budget_fragment(await self.budget())
        if name == "charts":
            return activity.charts_fragment(self.state.series)
        if name == "requests":
            return activity.requests_fragment(self.recent(), base)
        if name == "config":
            return fragments.config_fragment(masked_config(self.config))
        wanted = query.get("id", "")
        found = next((r for r in self.recent() if r.get("request_id") == wanted), None)
        return activity.request_detail_fragment(found, self.config.logging.log_responses)

    # -- output -----------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        return scrub_secrets(text, self._secrets) if self._secrets else text

    async def json(self, send: Send, body: bytes, status: int = 200) -> None:
        if self._secrets:
            body = self.scrub(body.decode()).encode()
        await send_body(send, status, body, JSON)


def _only(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise MethodNotAllowed(f"this admin route takes {' or '.join(allowed)}")


def _query(scope: Scope) -> dict[str, str]:
    raw: bytes = scope.get("query_string", b"")
    return dict(parse_qsl(raw.decode("latin-1")))
