"""The gateway as a library: mounted in a Starlette app at /llm, served by hypercorn."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from resillm import create_app
from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, serve_asgi

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hello"}]


async def home(_request: object) -> PlainTextResponse:
    return PlainTextResponse("host app")


@pytest.mark.parametrize("with_lifespan", [True, False], ids=["lifespan", "lazy-start"])
async def test_mounted_under_llm(upstream: MockUpstream, with_lifespan: bool) -> None:
    gateway = create_app(openai_compatible(upstream))
    host = Starlette(
        routes=[Route("/", home), Mount("/llm", app=gateway)],
        lifespan=gateway.lifespan if with_lifespan else None,
    )
    async with serve_asgi(host) as url:
        if with_lifespan:
            assert gateway.runtime is not None  # started by the host's lifespan
        async with openai.AsyncOpenAI(base_url=url + "/llm/v1", api_key="x", max_retries=0) as sdk:
            answer = await sdk.chat.completions.create(model="chat", messages=HELLO)  # type: ignore[arg-type]
            stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)  # type: ignore[arg-type]
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            models = [m.id for m in (await sdk.models.list()).data]
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/llm/health") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}
            async with session.get(url + "/") as response:
                assert await response.text() == "host app"
    if with_lifespan:
        assert gateway.runtime is None  # the host's shutdown stopped it
    else:
        assert gateway.runtime is not None  # started by its first request
        await gateway.stop()  # no lifespan: nothing else will close its session
    assert answer.choices[0].message.content == text
    assert models == ["chat"]


async def test_top_level_app_handles_lifespan(upstream: MockUpstream) -> None:
    gateway = create_app(openai_compatible(upstream))
    async with serve_asgi(gateway) as url:
        assert gateway.runtime is not None  # hypercorn's lifespan.startup started it
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
            answer = await sdk.chat.completions.create(model="chat", messages=HELLO)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert gateway.runtime is None
