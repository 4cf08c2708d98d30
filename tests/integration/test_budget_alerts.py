"""Budget alerts reach a JSON webhook, a Slack webhook (fake aiohttp receivers) and a real
local SMTP server (aiosmtpd), each exactly once per window and threshold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.conftest import run_gateway
from tests.integration.test_budget import budget_config, post
from tests.redis_server import redis_server

pytestmark = pytest.mark.anyio
SETTLE_S = 0.5  # after the last delivery: time for a duplicate to show up, if any


class Receiver:
    """Webhook endpoints that record every JSON body; ``fail_first`` answers 503 once."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.bodies: dict[str, list[Any]] = {"/hook": [], "/slack": []}
        self.attempts = 0
        self.fail_first = fail_first
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.fail_first and self.attempts == 1:
            return web.Response(status=503)
        self.bodies[request.path].append(await request.json())
        return web.Response(text="ok")


@asynccontextmanager
async def receiver(**kwargs: Any) -> AsyncIterator[Receiver]:
    found = Receiver(**kwargs)
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    app.router.add_post("/slack", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    found.url = f"http://{host}:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"from-the-env")


@asynccontextmanager
async def smtp_server() -> AsyncIterator[tuple[Mailbox, int]]:
    """aiosmtpd in this event loop (the gateway's smtplib runs in a worker thread)."""
    mailbox = Mailbox()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(mailbox, authenticator=mailbox.authenticate, auth_require_tls=False),
        "127.0.0.1",
        0,
    )
    try:
        yield mailbox, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - plain lists, polled
            await asyncio.sleep(0.02)


async def test_each_channel_gets_each_threshold_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "from-the-env")
    async with receiver(fail_first=True) as hooks, smtp_server() as (mailbox, smtp_port):
        alerts = {
            "thresholds": [0.5, 1.0],
            "webhook_url": hooks.url + "/hook",
            "slack_webhook_url": hooks.url + "/slack",
            "email": {
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp_port,
                "starttls": False,
                "username": "gateway",
                "password": "${SMTP_PASSWORD}",
                "from": "resillm@example.com",
                "to": ["ops@example.com", "finance@example.com"],
            },
        }
        config = budget_config(tmp_path, hourly_limit=0.04, alerts=alerts)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            statuses = [await post(session, gw.url) for _ in range(6)]
            webhook, slack = hooks.bodies["/hook"], hooks.bodies["/slack"]
            await wait_for(lambda: len(webhook) == len(slack) == len(mailbox.messages) == 2)
            await asyncio.sleep(SETTLE_S)
    assert statuses == [200, 200, 200, 200, 429, 429]
    # Exactly once each, although the first delivery failed and was retried.
    assert hooks.attempts == 5
    # The retried 50% alert may arrive after the 100% one.
    webhook.sort(key=lambda b: b["threshold"])
    assert [b["threshold"] for b in webhook] == [0.5, 1.0]
    assert webhook[0] == {
        "event": "budget_threshold",
        "scope": "global",
        "key": None,
        "window": "hour",
        "window_start": webhook[0]["window_start"],
        "resets_at": webhook[0]["resets_at"],
        "threshold": 0.5,
        "spent": 0.02,
        "limit": 0.04,
    }
    assert webhook[1]["spent"] == 0.04
    assert [set(b) for b in slack] == [{"text"}, {"text"}]
    texts = sorted(b["text"] for b in slack)  # "$0.0200 reached 50%" sorts first
    assert "spend $0.0200 reached 50% of the $0.04 limit" in texts[0]
    assert "spend $0.0400 reached 100% of the $0.04 limit" in texts[1]
    assert len(mailbox.messages) == 2
    assert mailbox.logins[0] == (b"gateway", b"from-the-env")
    subjects = sorted(str(m["Subject"]) for m in mailbox.messages)
    assert "reached 50%" in subjects[0] and "reached 100%" in subjects[1]
    first = mailbox.messages[0]
    assert first["To"] == "ops@example.com, finance@example.com"
    assert first["From"] == "resillm@example.com"


async def test_key_budgets_alert_with_the_key_name(tmp_path: Path) -> None:
    async with receiver() as hooks:
        config = budget_config(
            tmp_path, alerts={"thresholds": [1.0], "webhook_url": hooks.url + "/hook"}
        )
        config["auth"] = {
            "keys": [{"name": "team-a", "key": "key-a", "budget": {"daily_limit": 0.02}}]
        }
        async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
            headers = {"authorization": "Bearer key-a"}
            for _ in range(3):
                async with session.post(
                    gw.url + "/v1/chat/completions",
                    headers=headers,
                    json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                ) as response:
                    await response.read()
            await wait_for(lambda: len(hooks.bodies["/hook"]) == 1)
            await asyncio.sleep(SETTLE_S)
    (alert,) = hooks.bodies["/hook"]
    assert (alert["scope"], alert["key"], alert["window"]) == ("key", "team-a", "day")


async def test_instances_sharing_redis_alert_once(tmp_path: Path) -> None:
    async with redis_server() as redis, receiver() as hooks:
        config = budget_config(
            tmp_path,
            hourly_limit=0.1,
            store="redis",
            redis_url=redis.url,
            alerts={"thresholds": [0.3], "webhook_url": hooks.url + "/hook"},
        )
        async with (
            run_gateway(config) as one,
            run_gateway(config) as two,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(3):
                assert await post(session, one.url) == 200
                assert await post(session, two.url) == 200
            await wait_for(lambda: len(hooks.bodies["/hook"]) >= 1)
            await asyncio.sleep(SETTLE_S)
    assert [json.dumps(b["threshold"]) for b in hooks.bodies["/hook"]] == ["0.3"]
