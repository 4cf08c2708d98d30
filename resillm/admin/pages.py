"""The two whole pages: the admin page (panels rendered inline for the first paint, then
polled by htmx) and the login form. Templates ship in the package (``templates/``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from html import escape

from resillm.admin.static import asset_url, template

# htmx settings, read from <meta name="htmx-config">: nothing that the page's
# Content-Security-Policy would block (no inline <style>, no eval), and no copies of the
# page (with its request data) in localStorage.
HTMX_CONFIG = json.dumps(
    {
        "includeIndicatorStyles": False,
        "allowEval": False,
        "allowScriptTags": False,
        "historyEnabled": False,
        "historyCacheSize": 0,
        "selfRequestsOnly": True,
        "defaultSwapStyle": "innerHTML",
    },
    separators=(",", ":"),
)


@dataclass(frozen=True)
class Panels:
    """The fragments the page starts with (HTML, already escaped)."""

    targets: str
    budget: str
    charts: str
    requests: str
    config: str


def admin_page(
    *, base: str, csrf: str, session: bool, version: str, recent_size: int, panels: Panels
) -> str:
    """``csrf`` goes into every htmx request (``hx-headers``) and the forms; ``session``:
    signed in with the form (a logout button), not with a bearer token."""
    logout = (
        f'<form class="inline" method="post" action="{escape(base)}/logout">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        '<button type="submit" class="quiet">Sign out</button></form>'
        if session
        else ""
    )
    return template("page.html").substitute(
        htmx_config=escape(HTMX_CONFIG),
        css_url=escape(asset_url(base, "admin.css")),
        htmx_url=escape(asset_url(base, "htmx.min.js")),
        hx_headers=escape(json.dumps({"X-CSRF-Token": csrf} if csrf else {})),
        base=escape(base),
        csrf=escape(csrf),
        logout=logout,
        version=escape(version),
        pid=os.getpid(),
        recent_size=recent_size,
        targets=panels.targets,
        budget=panels.budget,
        charts=panels.charts,
        requests=panels.requests,
        config=panels.config,
    )


def login_page(base: str, message: str | None = None) -> str:
    note = f'<p class="form-error" role="alert">{escape(message)}</p>' if message else ""
    return template("login.html").substitute(
        css_url=escape(asset_url(base, "admin.css")),
        base=escape(base),
        message=note,
    )
