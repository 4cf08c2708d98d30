"""CORS on the real gateway: closed by default, open to the configured origins."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, run_gateway

pytestmark = pytest.mark.anyio
APP = "https://app.example.com"
KEY = "cors-client-key-0001"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}
BODY = {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def config(upstream: MockUpstream, **cors: Any) -> dict[str, Any]:
    found = openai_compatible(upstream)
    found["auth"] = {"keys": [{"name": "web", "key": KEY}]}
    if cors:
        found["cors"] = cors
    return found


async def test_preflight_and_answers_for_allowed_origins_only(upstream: MockUpstream) -> None:
    url_path = "/v1/chat/completions"
    async with (
        run_gateway(config(upstream, allow_origins=[APP], max_age=60)) as gw,
        aiohttp.ClientSession() as session,
    ):
        # The preflight carries no key: it is answered before authentication.
        async with session.options(gw.url + url_path, headers=PREFLIGHT) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == APP
            assert "authorization" in response.headers["Access-Control-Allow-Headers"]
            assert response.headers["Access-Control-Max-Age"] == "60"
        headers = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
        async with session.post(gw.url + url_path, json=BODY, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == APP
        async with session.post(gw.url + url_path, json=BODY, headers={"Origin": APP}) as response:
            assert response.status == 401  # errors reach the page too, so it can show them
            assert response.headers["Access-Control-Allow-Origin"] == APP
        evil = {**PREFLIGHT, "Origin": "https://evil.example.com"}
        async with session.options(gw.url + url_path, headers=evil) as response:
            assert response.status == 401  # refused like any request without a key
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_closed_by_default(upstream: MockUpstream) -> None:
    async with run_gateway(config(upstream)) as gw, aiohttp.ClientSession() as session:
        async with session.options(gw.url + "/v1/chat/completions", headers=PREFLIGHT) as reply:
            assert reply.status == 401
            assert not [h for h in reply.headers if h.lower().startswith("access-control")]
        headers = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
        async with session.post(
            gw.url + "/v1/chat/completions", json=BODY, headers=headers
        ) as reply:
            assert reply.status == 200
            assert not [h for h in reply.headers if h.lower().startswith("access-control")]
