"""Shared fixtures: the real gateway under hypercorn on an ephemeral port, fake upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypercorn.asyncio import serve as hypercorn_serve

from resillm.app import Gateway, create_app
from resillm.asgi import ASGIApp
from resillm.config_loader import config_from_dict
from resillm.mock_upstream import MockUpstream, MockUpstreamOptions, start_mock_upstream
from resillm.server import bind_listener, hypercorn_config


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class RunningServer:
    url: str
    app: ASGIApp

    @property
    def gateway(self) -> Gateway:
        assert isinstance(self.app, Gateway)
        return self.app


@asynccontextmanager
async def serve_asgi(app: ASGIApp, config: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """Serve ``app`` with real hypercorn on 127.0.0.1 and an ephemeral port; yield its URL."""
    cfg = config_from_dict(
        config
        or {
            "providers": {"m": {"type": "mock"}},
            "models": {"x": {"targets": [{"provider": "m", "model": "m"}]}},
        }
    )
    bind, port = bind_listener("127.0.0.1", 0)
    hyper = hypercorn_config(cfg, [bind])
    hyper.graceful_timeout = 2.0
    stop = asyncio.Event()
    serving = hypercorn_serve(app, hyper, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
    task = asyncio.create_task(serving)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(url + "/health") as response:
                        await response.read()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def run_gateway(config: dict[str, Any]) -> AsyncIterator[RunningServer]:
    gateway = create_app(config)
    async with serve_asgi(gateway.asgi, config) as url:  # as `resillm serve` serves it
        yield RunningServer(url, gateway)


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    """A fake OpenAI + Anthropic server on loopback."""
    server = await start_mock_upstream(MockUpstreamOptions())
    try:
        yield server
    finally:
        await server.close()


def openai_compatible(upstream: MockUpstream, **provider: Any) -> dict[str, Any]:
    """A gateway config: alias ``chat`` served by ``upstream`` as an OpenAI-compatible server."""
    return {
        "providers": {
            "up": {"type": "openai_compatible", "base_url": upstream.url + "/v1", **provider}
        },
        "models": {"chat": {"targets": [{"provider": "up", "model": "upstream-model"}]}},
        "logging": {"level": "warning"},
    }
