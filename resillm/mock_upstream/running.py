"""Running the mock: on the current event loop (tests) or as a process (the CLI)."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from resillm.mock_upstream.options import MockUpstreamOptions
from resillm.mock_upstream.server import app_stats, build_mock_app


class MockUpstream:
    """A running mock upstream; `close()` stops it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.stats = app_stats(runner.app)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> MockUpstream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


async def start_mock_upstream(
    options: MockUpstreamOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 1.0,
) -> MockUpstream:
    """Serve the mock on the running loop; `port=0` picks a free port (see `.port`)."""
    app = build_mock_app(options or MockUpstreamOptions())
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return MockUpstream(runner, host, bound_port)


async def _serve_until_signal(options: MockUpstreamOptions, host: str, port: int) -> None:
    upstream = await start_mock_upstream(options, host, port, shutdown_timeout=5.0)
    try:
        print(f"resillm mock-upstream listening on {upstream.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await upstream.close()


def run_mock_upstream(
    options: MockUpstreamOptions, host: str = "127.0.0.1", port: int = 8081
) -> None:
    """Serve the mock until SIGINT or SIGTERM, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_until_signal(options, host, port))
    else:
        uvloop.run(_serve_until_signal(options, host, port))
