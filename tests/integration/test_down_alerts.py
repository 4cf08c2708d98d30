"""Budget alert channels that are down: a webhook on a closed port, one that never answers,
one that answers 500, and an SMTP server that is down or silent. Requests that cross a
threshold never wait for a delivery; each failed delivery is tried three times with a
backoff, then given up with one error line that names no secret; a given-up alert is not
sent again, and a later threshold still fires; the gateway's stop waits for deliveries in
flight a bounded time.

Each request costs exactly $0.01 (see test_budget); the hourly limit is $0.04 and the
thresholds 50% and 100%, so the 2nd request crosses the first and the 4th the second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import resillm.alerts
from tests.conftest import run_gateway
from tests.integration.down_servers import closed_port, hanging_server
from tests.integration.servers import serve_web
from tests.integration.test_budget import budget_config, post

pytestmark = pytest.mark.anyio
SECRET_PATH = "/hooks/T0-secret-path"
SECRET_QUERY = "token=q-secret-value"
SMTP_PASSWORD = "smtp-secret-password"
FAST_S = 1.0  # a request takes milliseconds; a webhook that hangs is waited for 10 s


def alerting(tmp_path: Path, **alerts: Any) -> dict[str, Any]:
    return budget_config(tmp_path, hourly_limit=0.04, alerts={"thresholds": [0.5, 1.0], **alerts})


def hook(base: str) -> str:
    return f"{base}{SECRET_PATH}?{SECRET_QUERY}"


class Flaky:
    """A webhook receiver that answers 500 to its first ``failures`` requests."""

    def __init__(self, failures: int, status: int = 500) -> None:
        self.failures = failures
        self.status = status
        self.attempts: list[float] = []
        self.received: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            return web.Response(status=self.status, text=f"broken, see {request.url}")
        self.received.append(await request.json())
        return web.Response(text="ok")


@asynccontextmanager
async def flaky_webhook(failures: int, status: int = 500) -> AsyncIterator[tuple[str, Flaky]]:
    flaky = Flaky(failures, status)
    app = web.Application()
    app.router.add_post(SECRET_PATH, flaky.handle)
    async with serve_web(app) as url:
        yield url, flaky


async def timed_posts(url: str, count: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.monotonic()
            assert await post(session, url) == 200
            times.append(time.monotonic() - started)
    return times


def alert_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "resillm.alerts" and text in r.getMessage()
    ]


async def wait_for_lines(caplog: pytest.LogCaptureFixture, text: str, count: int) -> None:
    async with asyncio.timeout(20):
        while len(alert_lines(caplog, text)) < count:  # noqa: ASYNC110 - log records, polled
            await asyncio.sleep(0.02)


def assert_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    for secret in (SECRET_PATH, "secret-path", SECRET_QUERY, "q-secret", SMTP_PASSWORD):
        assert secret not in caplog.text


@pytest.mark.parametrize("kind", ["closed", "500"])
async def test_a_failing_webhook_is_tried_three_times_then_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="resillm")
    async with flaky_webhook(failures=1000) as (base, flaky):
        if kind == "closed":
            base = f"http://127.0.0.1:{closed_port()}"
        async with run_gateway(alerting(tmp_path, webhook_url=hook(base))) as gw:
            times = await timed_posts(gw.url, 4)  # crosses 50%, then 100%
            await wait_for_lines(caplog, "given up", 2)
    assert max(times) < FAST_S, times
    given_up = sorted(alert_lines(caplog, "given up"))
    reason = "HTTP 500 Internal Server Error" if kind == "500" else "Cannot connect to host"
    assert [line.split(": ", 1)[0] for line in given_up] == [
        "budget alert via webhook failed after 3 attempts"
    ] * 2
    assert all(reason in line for line in given_up), given_up
    assert "global hourly spend $0.0200 reached 50%" in given_up[0] + given_up[1]
    assert "global hourly spend $0.0400 reached 100%" in given_up[0] + given_up[1]
    assert len(alert_lines(caplog, "failed, retrying")) == 4  # two retries an alert
    if kind == "500":
        assert len(flaky.attempts) == 6  # three per alert
        # Both alerts start together; their retries come 0.5 s, then 2 s more, later.
        tries = sorted(flaky.attempts)
        assert tries[2] - tries[0] >= 0.45 and tries[4] - tries[0] >= 2.4, tries
    assert_no_secret(caplog)


async def test_a_webhook_that_refuses_the_alert_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resillm")
    async with flaky_webhook(failures=1000, status=404) as (base, flaky):  # a wrong URL
        async with run_gateway(alerting(tmp_path, webhook_url=hook(base))) as gw:
            await timed_posts(gw.url, 4)  # crosses 50%, then 100%
            await wait_for_lines(caplog, "given up", 2)
    assert len(flaky.attempts) == 2  # one per alert
    refused = alert_lines(caplog, "given up")
    assert all("refused (HTTP 404 Not Found), not retried" in line for line in refused)
    assert not alert_lines(caplog, "retrying")
    assert_no_secret(caplog)


async def test_a_given_up_alert_is_not_resent_and_the_next_threshold_fires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resillm")
    async with flaky_webhook(failures=3) as (base, flaky):
        async with run_gateway(alerting(tmp_path, webhook_url=hook(base))) as gw:
            await timed_posts(gw.url, 2)  # 50%: three 500s, given up
            await wait_for_lines(caplog, "given up", 1)
            await timed_posts(gw.url, 2)  # 100%: delivered at once
            async with asyncio.timeout(10):
                while not flaky.received:  # noqa: ASYNC110 - a list, polled
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # time for a resend of the 50% alert, if any
    assert [body["threshold"] for body in flaky.received] == [1.0]
    assert len(flaky.attempts) == 4
    assert_no_secret(caplog)


async def test_a_webhook_that_never_answers_delays_no_request_and_not_the_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery waits up to 10 s an attempt; the stop waits for it 5 s, then drops it
    with a log line."""
    caplog.set_level(logging.WARNING, logger="resillm")
    async with hanging_server() as hanging:
        async with run_gateway(alerting(tmp_path, webhook_url=hook(hanging.url))) as gw:
            times = await timed_posts(gw.url, 2)
            await hanging.wait_for_connection()  # the 50% alert is stuck from now on
            times += await timed_posts(gw.url, 2)
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping
    assert max(times) < FAST_S, times
    assert stopped_in < resillm.alerts.DRAIN_TIMEOUT_S + 3.0
    given_up = alert_lines(caplog, "given up, the gateway is stopping")
    assert len(given_up) == 2  # both alerts were in their first attempt
    assert_no_secret(caplog)


@asynccontextmanager
async def smtp_down(kind: str) -> AsyncIterator[int]:
    if kind == "closed":
        yield closed_port()
        return
    async with hanging_server() as hanging:  # accepts, never greets
        yield hanging.port


@pytest.mark.parametrize("kind", ["closed", "silent"])
async def test_an_smtp_server_that_is_down_is_given_up_the_same_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.WARNING, logger="resillm")
    async with smtp_down(kind) as port:
        email = {
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "starttls": False,
            "username": "gateway",
            "password": SMTP_PASSWORD,
            "from": "resillm@example.com",
            "to": ["ops@example.com"],
            "timeout": "300ms",
        }
        async with run_gateway(alerting(tmp_path, email=email)) as gw:
            times = await timed_posts(gw.url, 4)
            await wait_for_lines(caplog, "given up", 2)
    assert max(times) < FAST_S, times
    given_up = alert_lines(caplog, "given up")
    assert all(
        line.startswith("budget alert via email failed after 3 attempts") for line in given_up
    )
    assert_no_secret(caplog)
