"""Hot reload: watched file, /admin/reload, SIGHUP-equivalent; state kept, nothing lost."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from ruamel.yaml import YAML

from resillm import create_app
from resillm.app import Gateway
from resillm.mock_upstream import MockUpstream
from tests.conftest import serve_asgi

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": "Bearer admin-secret-key"}


def write(path: Path, config: dict[str, Any]) -> None:
    """Write the way editors do: a temporary file renamed over the config."""
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w") as handle:
        YAML().dump(config, handle)
    os.replace(temp, path)


def base_config(upstream: MockUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "providers": {"up": {"type": "openai_compatible", "base_url": upstream.url + "/v1"}},
        "models": {"chat": {"targets": [{"provider": "up", "model": "m1"}]}},
        "auth": {"admin_key": "admin-secret-key"},
        "logging": {"level": "warning"},
        **extra,
    }


@asynccontextmanager
async def gateway_on_file(path: Path, config: dict[str, Any]) -> AsyncIterator[tuple[str, Gateway]]:
    write(path, config)
    gateway = create_app(path)
    async with serve_asgi(gateway, config) as url:
        yield url, gateway


async def ask(url: str, model: str = "chat") -> Any:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        return await sdk.chat.completions.with_raw_response.create(model=model, messages=HELLO)  # type: ignore[arg-type]


async def admin_reload(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/admin/reload", headers=headers or {}) as response,
    ):
        return response.status, await response.json()


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except openai.APIError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the change was not picked up in time")
        await asyncio.sleep(0.05)


async def test_an_edited_file_is_picked_up_by_the_watcher(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    config = base_config(upstream)
    async with gateway_on_file(path, config) as (url, _):
        config["models"]["new"] = {"targets": [{"provider": "up", "model": "m2"}]}
        write(path, config)

        async def new_alias_answers() -> bool:
            return (await ask(url, "new")).parse().model == "m2"

        await eventually(new_alias_answers)


async def test_an_invalid_edit_keeps_the_old_config_and_reports_the_line(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    async with gateway_on_file(path, base_config(upstream)) as (url, gateway):
        path.write_text(path.read_text().replace("models:", "models:\n  broken: {targetz: []}"))
        status, report = await admin_reload(url, ADMIN)
        assert status == 422
        assert report["applied"] is False
        assert any("resillm.yaml:" in e and "targetz" in e for e in report["errors"])
        assert (await ask(url)).parse().model == "m1"  # still serving
        assert gateway.metrics.config_reloads.get({"result": "error"}) >= 1


async def test_a_stream_in_flight_finishes_on_its_old_target(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    config = base_config(upstream)
    config["providers"]["up"]["headers"] = {"x-mock-chunk-delay": "0.1", "x-mock-chunks": "10"}
    async with gateway_on_file(path, config) as (url, _):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)  # type: ignore[arg-type]
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 3:  # mid-stream: move the alias to another model
                    config["models"]["chat"]["targets"][0]["model"] = "m-new"
                    write(path, config)
                    status, _ = await admin_reload(url, ADMIN)
                    assert status == 200
        assert {c.model for c in chunks} == {"m1"}
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert (await ask(url)).parse().model == "m-new"  # new requests see the new config


async def test_an_open_circuit_stays_open_across_an_unrelated_reload(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    config = base_config(
        upstream,
        resilience={
            "retry": {"max_attempts": 1},
            "circuit_breaker": {"failure_threshold": 1, "open_timeout": "60s"},
        },
    )
    config["providers"]["bad"] = {
        "type": "openai_compatible",
        "base_url": upstream.url + "/v1",
        "headers": {"x-mock-fail-status": "503"},
    }
    config["models"]["flaky"] = {"targets": [{"provider": "bad", "model": "b1"}]}
    async with gateway_on_file(path, config) as (url, gateway):
        with pytest.raises(openai.APIStatusError):
            await ask(url, "flaky")  # opens the circuit
        config["models"]["other"] = {"targets": [{"provider": "up", "model": "m3"}]}
        write(path, config)
        status, _ = await admin_reload(url, ADMIN)
        assert status == 200
        with pytest.raises(openai.APIStatusError) as raised:
            await ask(url, "flaky")
        assert raised.value.status_code == 503  # circuit_open: no new upstream call
        assert gateway.circuits.get("bad/b1").state.name == "OPEN"


async def test_a_rotated_api_key_is_used_by_the_next_request(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    config = base_config(upstream)
    config["providers"]["up"]["api_key"] = "sk-old-key-0000"
    async with gateway_on_file(path, config) as (url, _):
        await ask(url)
        assert upstream.stats.last_headers["authorization"] == "Bearer sk-old-key-0000"
        config["providers"]["up"]["api_key"] = "sk-new-key-1111"
        write(path, config)
        status, report = await admin_reload(url, ADMIN)
        assert status == 200 and report["changes"]["providers_changed"] == ["up"]
        assert "sk-new-key" not in str(report)  # names only, never secrets
        await ask(url)
        assert upstream.stats.last_headers["authorization"] == "Bearer sk-new-key-1111"


async def test_a_server_port_change_is_reported_as_needing_a_restart(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "resillm.yaml"
    config = base_config(upstream)
    async with gateway_on_file(path, config) as (url, gateway):
        config["server"] = {"port": 9999}
        write(path, config)
        status, report = await admin_reload(url, ADMIN)
        assert status == 200
        assert report["restart_needed"] == ["server.port"]
        assert gateway.config.server.port == 8080  # not applied


async def test_admin_reload_needs_the_admin_key(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    async with gateway_on_file(path, base_config(upstream)) as (url, _):
        status, body = await admin_reload(url)
        assert status == 403 and body["error"]["type"] == "permission_error"
        status, body = await admin_reload(url, {"Authorization": "Bearer wrong"})
        assert status == 403
        status, body = await admin_reload(url, ADMIN)
        assert status == 200 and body["applied"] is True


async def test_admin_config_masks_every_secret(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    config = base_config(upstream)
    config["providers"]["up"]["api_key"] = "sk-upstream-secret-1234"
    config["auth"]["keys"] = [{"name": "team", "key": "client-secret-5678"}]
    async with gateway_on_file(path, config) as (url, _):
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/admin/config", headers=ADMIN) as response,
        ):
            assert response.status == 200
            shown = await response.json()
    text = str(shown)
    for secret in ("sk-upstream-secret-1234", "client-secret-5678", "admin-secret-key"):
        assert secret not in text
    assert shown["providers"]["up"]["api_key"] == "***"
    assert shown["auth"]["keys"][0] == {
        "name": "team",
        "key": "***",
        "models": None,
        "budget": None,
    }
    assert shown["models"]["chat"]["targets"][0]["model"] == "m1"
