"""schemathesis against a live gateway: its own OpenAPI document, no 5xx, no schema violation.

The gateway runs under real hypercorn on loopback (in a thread with its own event loop, as
schemathesis calls it synchronously) with the in-process ``mock`` provider, so no upstream
is needed. Bounded in examples so the run stays well under a minute.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import run_gateway

CONFIG: dict[str, Any] = {
    "providers": {"m": {"type": "mock"}},
    "models": {"chat": {"targets": [{"provider": "m", "model": "mock-1"}]}},
    "logging": {"level": "error"},
}


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    urls: queue.Queue[str] = queue.Queue()
    stop: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None

    async def serve() -> None:
        nonlocal stop, loop
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        async with run_gateway(CONFIG) as server:
            urls.put(server.url)
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield urls.get(timeout=10)
    finally:
        assert loop is not None and stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def test_gateway_answers_every_generated_request_without_5xx(gateway_url: str) -> None:
    api = schemathesis.openapi.from_url(gateway_url + "/openapi.json")
    checks = [not_a_server_error, response_schema_conformance]
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call()
            if response.status_code == 503 and case.path == "/ready":
                return  # documented: an alias without an available target
            case.validate_response(response, checks=checks)

        check()
