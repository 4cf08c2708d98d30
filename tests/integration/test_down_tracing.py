"""The trace collector is down (nothing listening) or hangs (accepts, never answers):
requests never wait for it, the failure is logged once rather than per request or per
retry, and the gateway's stop waits for the last spans only a bounded time.

The exporters keep their real 10 s timeout; only the batch processor's delay is cut
(``OTEL_BSP_SCHEDULE_DELAY``) so exports start while the requests run.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

import middleware.tracing_export
from resillm.app import Gateway
from resillm.config_loader import config_from_dict
from tests.conftest import serve_asgi
from tests.integration.down_servers import closed_port, hanging_server, serve_process

pytestmark = pytest.mark.anyio
DEFAULT_BOUND_S = middleware.tracing_export.SHUTDOWN_TIMEOUT_S  # 5 s, before the fixture
SHUTDOWN_BOUND_S = 1.0  # the stop's wait for the last spans, cut from 5 s for the tests
HELLO = [{"role": "user", "content": "hello"}]
FAST_S = 1.0  # a request through the gateway takes milliseconds; an export waits 10 s


@pytest.fixture(autouse=True)
def quick_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setattr(middleware.tracing_export, "SHUTDOWN_TIMEOUT_S", SHUTDOWN_BOUND_S)


def traced(exporter: str, endpoint: str) -> dict[str, Any]:
    return {
        "providers": {"m": {"type": "mock", "latency": "1ms", "chunk_delay": "1ms"}},
        "models": {"chat": {"targets": [{"provider": "m", "model": "m"}]}},
        "logging": {"level": "warning"},
        "server": {"graceful_timeout": "1s"},
        "tracing": {"enabled": True, "exporter": exporter, "endpoint": endpoint},
    }


async def timed_requests(url: str, count: int) -> list[float]:
    """``count`` requests with the official SDK, every other one streamed; their times."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    times: list[float] = []
    try:
        for i in range(count):
            started = time.monotonic()
            if i % 2:
                stream = await client.chat.completions.create(
                    model="chat", messages=HELLO, stream=True
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream])
            else:
                answer = await client.chat.completions.create(model="chat", messages=HELLO)
                text = answer.choices[0].message.content or ""
            assert text
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.05)  # let the batch processor pick the spans up
    finally:
        await client.close()
    return times


@asynccontextmanager
async def collector(kind: str) -> AsyncIterator[tuple[str, Any]]:
    """``closed``: a port with nothing on it; ``hang``: a server that never answers."""
    if kind == "closed":
        yield f"http://127.0.0.1:{closed_port()}", None
        return
    async with hanging_server() as hanging:
        yield hanging.url, hanging


@pytest.mark.parametrize("exporter", ["otlp", "zipkin"])
@pytest.mark.parametrize("kind", ["closed", "hang"])
async def test_requests_never_wait_for_a_collector_that_is_down(exporter: str, kind: str) -> None:
    async with collector(kind) as (endpoint, hanging):
        config = traced(exporter, endpoint)
        gateway = Gateway(config_from_dict(config))
        async with serve_asgi(gateway, config) as url:
            first = await timed_requests(url, 2)
            if hanging is not None:
                await hanging.wait_for_connection()  # an export is stuck from now on
            times = first + await timed_requests(url, 10)
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping
    assert max(times) < FAST_S, times
    # hypercorn's own graceful stop, then at most the bound for the spans: not the 10 s
    # (per batch, 30 s in all) the SDK would wait for the collector.
    assert stopped_in < SHUTDOWN_BOUND_S + 3.0
    assert gateway.tracing is None


async def zipkin_collector(port: int, received: list[bytes]) -> web.AppRunner:
    async def spans(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/api/v2/spans", spans)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_a_collector_outage_is_logged_once_and_its_end_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = closed_port()
    config = traced("zipkin", f"http://127.0.0.1:{port}")
    received: list[bytes] = []
    gateway = Gateway(config_from_dict(config))
    runner = None
    with caplog.at_level(logging.INFO, logger="resillm.tracing"):
        try:
            async with serve_asgi(gateway, config) as url:
                assert gateway.tracing is not None
                exporter = gateway.tracing.exporter
                await timed_requests(url, 12)  # several batches, each refused
                dropped = exporter.dropped
                runner = await zipkin_collector(port, received)
                await timed_requests(url, 2)
                async with asyncio.timeout(10):
                    while not received:  # noqa: ASYNC110 - a list, polled
                        await asyncio.sleep(0.02)
        finally:
            # The collector outlives the gateway: the spans its stop flushes (a second batch
            # when the machine is busy) must not meet a collector already gone, a new outage.
            if runner is not None:
                await runner.cleanup()
    mine = f"http://127.0.0.1:{port}/"  # not an earlier test's exporter, still finishing
    messages = [r.getMessage() for r in caplog.records if mine in r.getMessage()]
    failed = [m for m in messages if "failed" in m]
    assert len(failed) == 1, messages  # twelve requests, several failed batches: one line
    assert f"http://127.0.0.1:{port}/api/v2/spans failed (ConnectionError" in failed[0]
    assert dropped >= 12  # nothing exported (a request makes a span or two)
    (back,) = [m for m in messages if "works again" in m]
    match = re.search(r"\((\d+) spans were dropped\)", back)
    assert match and int(match.group(1)) >= dropped


async def test_serve_keeps_its_log_json_and_quiet_when_the_collector_is_down(
    tmp_path: Path,
) -> None:
    """``resillm serve`` as deployed: the OTLP exporter's retry-by-retry warnings would reach
    stderr as bare text between the JSON lines; they come through the JSON handler, each
    kind at most once a minute, and the stop is bounded."""
    config = traced("otlp", f"http://127.0.0.1:{closed_port()}")
    env = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
    async with serve_process(config, tmp_path / "resillm.yaml", env) as served:
        started = time.monotonic()
        while time.monotonic() - started < 3.5:  # OTLP retries after 1 s, 2 s, 4 s
            await timed_requests(served.url, 2)
        code, stopped_in = await served.stop()
    records = served.records()  # every line is JSON
    assert code == 0
    # graceful_timeout (1 s) for the requests, then the default 5 s for the spans at most.
    assert stopped_in < 1.0 + DEFAULT_BOUND_S + 4.0
    retries = [r for r in records if "Transient error" in r["msg"]]
    assert len(retries) == 1, records  # two or three retries happened: one line
    assert retries[0]["logger"].startswith("opentelemetry.")
    assert not [r for r in records if "exception" in r or "Traceback" in r["msg"]]
    stop_lines = [r for r in records if r["logger"] == "resillm.tracing"]
    assert any(f"did not finish within {DEFAULT_BOUND_S:g}s" in r["msg"] for r in stop_lines)
