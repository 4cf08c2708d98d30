"""The admin page's files shipped in the package: templates and static assets.

Read once from the installed package (``importlib.resources``, so a wheel or a zip works),
on the first admin request, never at import. Static URLs carry a hash of their content
(``?v=...``), so they can be cached for a year and still change with an upgrade.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template

from resillm.admin.respond import send_body
from resillm.asgi import Send
from resillm.errors import NotFound

IMMUTABLE = (b"cache-control", b"public, max-age=31536000, immutable")
_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
}
STATIC_FILES = ("htmx.min.js", "admin.css")  # what /admin/static/ serves; nothing else


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: bytes
    version: str


def _package_file(*parts: str) -> bytes:
    return resources.files("resillm.admin").joinpath(*parts).read_bytes()


@cache
def asset(name: str) -> Asset:
    if name not in STATIC_FILES:
        raise NotFound(f"no such admin file: {name}")
    body = _package_file("static", name)
    suffix = name[name.rindex(".") :]
    return Asset(body, _TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])


@cache
def template(name: str) -> Template:
    return Template(_package_file("templates", name).decode())


def asset_url(base: str, name: str) -> str:
    """``base`` is the admin root as the browser sees it (``/admin`` after any root_path)."""
    return f"{base}/static/{name}?v={asset(name).version}"


async def send_asset(send: Send, name: str) -> None:
    found = asset(name)
    await send_body(send, 200, found.body, found.content_type, cache=IMMUTABLE)
