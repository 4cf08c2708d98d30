"""The admin page in a real browser: Debian's chromium driven headless by playwright.

Never a browser download: playwright is pointed at the system ``chromium`` (``.ci/run``
installs Debian's package) and the test is skipped, saying why, when it is absent. The
gateway is the real one under hypercorn, in front of a fake upstream with one target that
always answers 503 (its circuit opens at the first failure) and one that works.

The screenshot is saved in the test's ``tmp_path`` and, when ``RESILLM_ARTIFACTS`` names a
directory, copied there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from resillm.app import create_app
from resillm.mock_upstream import MockUpstream
from tests.conftest import serve_asgi

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="Python playwright is not installed (the test extra has it)"
)
expect = playwright_api.expect
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
    ),
]
# As python.md prescribes: headless, no sandbox (root in a container), nothing that phones out.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ADMIN_KEY = "browser-admin-key-0123456789"
CLIENT_KEY = "browser-client-key-0123456789"
TIMEOUT_MS = 15_000


def gateway_config(
    upstream: MockUpstream, snapshot: Path, hourly_limit: float = 0.5
) -> dict[str, Any]:
    base = upstream.url + "/v1"
    pricing = {"input_per_mtok": 200.0, "output_per_mtok": 400.0}  # a visible spend
    return {
        "providers": {
            "flaky": {
                "type": "openai_compatible",
                "base_url": base,
                "api_key": "sk-flaky-upstream-secret-0001",
                "headers": {"x-mock-fail-status": "503"},
            },
            "steady": {
                "type": "openai_compatible",
                "base_url": base,
                "api_key": "sk-steady-upstream-secret-0002",
            },
        },
        "models": {
            "chat": {
                "targets": [
                    {"provider": "flaky", "model": "flaky-model"},
                    {"provider": "steady", "model": "steady-model"},
                ],
                "pricing": pricing,
            },
            "broken": {"targets": [{"provider": "flaky", "model": "other-model"}]},
        },
        "auth": {
            "admin_key": ADMIN_KEY,
            "keys": [{"name": "team-a", "key": CLIENT_KEY, "budget": {"hourly_limit": 0.25}}],
        },
        "resilience": {
            "retry": {"max_attempts": 1},
            "circuit_breaker": {"failure_threshold": 1, "open_timeout": "5m"},
        },
        "budget": {
            "hourly_limit": hourly_limit,
            "daily_limit": 5.0,
            "snapshot_path": str(snapshot),
        },
        "logging": {"level": "error", "log_responses": True},
        "admin": {"recent_requests": 50},
    }


@pytest.fixture
async def gateway(upstream: MockUpstream, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    config = gateway_config(upstream, tmp_path / "budget.json")
    path = tmp_path / "resillm.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    async with serve_asgi(create_app(path, watch=False), config) as url:
        yield url, path


async def send_traffic(url: str, count: int, model: str = "chat") -> list[int]:
    statuses = []
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            body = {
                "model": model,
                "max_tokens": 20,  # a small reservation against the budget
                "messages": [{"role": "user", "content": f"hello {i}, mail me at a@example.com"}],
            }
            async with session.post(
                url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def test_admin_page_in_chromium(
    gateway: tuple[str, Path], upstream: MockUpstream, tmp_path: Path
) -> None:
    url, config_path = gateway
    assert (await send_traffic(url, 12)).count(200) == 12  # flaky fails once, then is open
    assert await send_traffic(url, 3, model="broken") == [502, 503, 503]  # then open

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1000})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))

            # Not signed in: the login form; a wrong key is refused.
            await page.goto(url + "/admin/")
            await page.fill("#admin-key", "not-the-key")
            await page.click("button[type=submit]")
            await page.wait_for_selector("text=That is not the admin key.", timeout=TIMEOUT_MS)
            await page.fill("#admin-key", ADMIN_KEY)
            await page.click("button[type=submit]")
            await page.wait_for_selector("#targets table", timeout=TIMEOUT_MS)
            problems.clear()  # the refused login's 401 was expected
            cookies = await page.context.cookies()
            assert [c["name"] for c in cookies] == ["resillm_admin"]
            assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
            assert ADMIN_KEY not in cookies[0]["value"]

            # The panels: the failing target's circuit is open, the charts have data.
            open_row = page.locator('#targets tr[data-circuit="open"]')
            await open_row.first.wait_for(timeout=TIMEOUT_MS)
            assert "flaky/flaky-model" in await open_row.first.inner_text()
            assert await page.locator('#charts [data-chart="requests"] .bars rect').count() >= 1
            assert await page.locator('#charts [data-chart="errors"] .bars rect').count() >= 1
            assert await page.locator('#charts [data-chart="latency"] path.line').count() >= 1
            assert await page.locator("#budget svg.progress").count() == 4  # global, team-a
            assert await page.locator("#requests tbody tr[data-status]").count() == 15

            # Polling: new traffic shows up without a reload of the page.
            await send_traffic(url, 2)
            rows = page.locator("#requests tbody tr[data-status]")
            await expect(rows).to_have_count(17, timeout=TIMEOUT_MS)
            # A request's details: bodies, redacted as in the logs.
            await page.locator("#requests button.link").first.click()
            detail = page.locator("#request-detail .detail")
            await detail.wait_for(timeout=TIMEOUT_MS)
            text = await detail.inner_text()
            assert "[EMAIL]" in text and "a@example.com" not in text

            # Reload: change the file, click, see the report; the config panel follows.
            config_path.write_text(
                json.dumps(gateway_config(upstream, tmp_path / "budget.json", hourly_limit=0.75))
            )
            await page.click("#reload-button")
            report = page.locator("#reload-report .report.ok")
            await report.wait_for(timeout=TIMEOUT_MS)
            assert "Reloaded" in await report.inner_text()
            assert "budget" in await report.inner_text()
            config_text = page.locator("#config pre")
            await expect(config_text).to_contain_text("hourly_limit: 0.75", timeout=TIMEOUT_MS)
            await page.wait_for_timeout(2500)  # one more poll: the charts and lists settle

            content = await page.content()
            for secret in (ADMIN_KEY, CLIENT_KEY, "sk-flaky-upstream", "sk-steady-upstream"):
                assert secret not in content
            save_screenshot(await page.screenshot(full_page=True), tmp_path)

            # Sign out: back to the login form, and the old page's polls are refused.
            await page.click("text=Sign out")
            await page.wait_for_selector("#admin-key", timeout=TIMEOUT_MS)
            assert await page.context.cookies() == []
            assert not [p for p in problems if "Content Security Policy" in p], problems
            assert problems == [], problems
        finally:
            await browser.close()


def save_screenshot(png: bytes, tmp_path: Path) -> None:
    shot = tmp_path / "admin-page.png"
    shot.write_bytes(png)
    artifacts = os.environ.get("RESILLM_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
