"""The gateway carries no state from one client's upstream call to another's: a cookie an
upstream sets (Cloudflare's ``__cf_bm`` in front of api.openai.com, say) is never sent back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web

from tests.conftest import run_gateway
from tests.integration.servers import serve_web

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cookie_setting_upstream() -> AsyncIterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("cookie"))
        response = web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )
        response.set_cookie("session", f"client-{len(seen)}-secret", path="/")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_web(app) as url:
        # A host name: cookies set by a bare IP address are ignored by default anyway.
        yield url.replace("127.0.0.1", "localhost") + "/v1", seen


async def test_an_upstream_cookie_is_never_sent_with_another_request(
    cookie_setting_upstream: tuple[str, list[str | None]],
) -> None:
    base_url, seen = cookie_setting_upstream
    config = {
        "providers": {"up": {"type": "openai_compatible", "base_url": base_url}},
        "models": {"chat": {"targets": [{"provider": "up", "model": "m"}]}},
    }
    async with run_gateway(config) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        for _ in range(3):
            answer = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hello"}]
            )
            assert answer.choices[0].message.content == "hi"
        await client.close()
    assert seen == [None, None, None]
