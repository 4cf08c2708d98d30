"""Slow clients without sockets: the server settings' validation and their mapping to the
servers, the body deadline of the request layer, and the send-timeout layer."""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from middleware.errors import ErrorsMiddleware
from middleware.request import RequestMiddleware
from middleware.send_timeout import SendTimeoutMiddleware
from resillm.admin.respond import read_form
from resillm.asgi import Message, Receive, Scope, Send
from resillm.config_loader import ConfigError, config_from_dict, load_config
from resillm.context import SCOPE_KEY, RequestContext
from resillm.errors import RequestTimeout
from resillm.server import uvicorn_options
from tests.unit.test_middleware import HELLO_BYTES, Recorder, make_scope

pytestmark = pytest.mark.anyio
MINIMAL = """\
providers:
  m: {type: mock}
models:
  chat:
    targets:
      - {provider: m, model: mock-1}
"""


def minimal(**sections: Any) -> dict[str, Any]:
    return {
        "providers": {"m": {"type": "mock"}},
        "models": {"chat": {"targets": [{"provider": "m", "model": "mock-1"}]}},
        **sections,
    }


def server_config(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "resillm.yaml"
    path.write_text(MINIMAL + "server:\n" + textwrap.indent(server, "  "), encoding="utf-8")
    return path


# -- config ----------------------------------------------------------------------------------


def test_slow_client_defaults() -> None:
    server = config_from_dict(minimal()).server
    assert (server.body_timeout, server.send_timeout) == (30.0, 60.0)
    assert (server.keep_alive_timeout, server.read_timeout) == (75.0, None)


@pytest.mark.parametrize(
    ("key", "line"),
    [("keep_alive_timeout", 8), ("read_timeout", 9), ("body_timeout", 10), ("send_timeout", 11)],
)
def test_a_zero_server_timeout_is_an_error_at_its_line(tmp_path: Path, key: str, line: int) -> None:
    settings = ["keep_alive_timeout: 75s", "read_timeout: 10m", "body_timeout: 30s"]
    settings.append("send_timeout: 1m")
    settings = [f"{key}: 0s" if s.startswith(key) else s for s in settings]
    with pytest.raises(ConfigError) as info:
        load_config(server_config(tmp_path, "\n".join(settings) + "\n"))
    [issue] = info.value.issues
    assert (issue.path, issue.line, issue.column) == (f"server.{key}", line, 3)
    assert "greater than 0" in issue.message
    assert str(issue).startswith(f"{tmp_path / 'resillm.yaml'}:{line}:3: server.{key}: ")


@pytest.mark.parametrize("key", ["read_timeout", "body_timeout", "send_timeout"])
def test_null_turns_a_slow_client_limit_off(tmp_path: Path, key: str) -> None:
    config = load_config(server_config(tmp_path, f"{key}: null\n"))
    assert getattr(config.server, key) is None


def test_keep_alive_timeout_cannot_be_turned_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(server_config(tmp_path, "keep_alive_timeout: null\n"))
    [issue] = info.value.issues
    assert (issue.path, issue.line) == ("server.keep_alive_timeout", 8)


def test_a_negative_body_timeout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(server_config(tmp_path, "body_timeout: -1s\n"))
    assert [i.path for i in info.value.issues] == ["server.body_timeout"]


def test_the_server_section_reaches_uvicorn() -> None:
    config = config_from_dict(
        minimal(server={"keep_alive_timeout": "2.5s", "max_header_bytes": 4096})
    )
    options = uvicorn_options(config)
    assert options["timeout_keep_alive"] == 2.5
    assert options["h11_max_incomplete_event_size"] == 4096
    assert options["access_log"] is False


# -- the body deadline -----------------------------------------------------------------------


async def never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    app = RequestMiddleware(endpoint, max_request_bytes=1024, body_timeout=0.1)
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        await app(make_scope(), never, Recorder())
    assert 0.1 <= time.monotonic() - started < 2.0
    assert info.value.status == 408
    assert info.value.headers == {"Connection": "close"}


async def test_the_408_is_openai_shaped_and_closes_the_connection() -> None:
    app = ErrorsMiddleware(RequestMiddleware(endpoint, max_request_bytes=1024, body_timeout=0.05))
    recorder = Recorder()
    await app(make_scope(), never, recorder)
    start, body = recorder.messages
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert b'"code":"request_timeout"' in body["body"]


async def test_a_body_in_parts_within_the_deadline_is_read() -> None:
    parts = [HELLO_BYTES[:10], HELLO_BYTES[10:]]

    async def receive() -> Message:
        await asyncio.sleep(0.05)
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    recorder = Recorder()
    app = RequestMiddleware(endpoint, max_request_bytes=1024, body_timeout=2.0)
    await app(make_scope(), receive, recorder)
    assert recorder.messages[0]["status"] == 200


async def test_an_admin_form_that_does_not_arrive_in_time_is_a_408() -> None:
    # The login form needs no key: anyone could otherwise hold a connection with it.
    with pytest.raises(RequestTimeout):
        await read_form(never, within_s=0.05)


# -- the send timeout ------------------------------------------------------------------------


def context_scope() -> Scope:
    scope = make_scope()
    scope[SCOPE_KEY] = RequestContext("req-1", "/v1/chat/completions")
    return scope


async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(6):
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def blocked_after(sends: int) -> Send:
    """A ``send`` whose client stops reading after ``sends`` messages."""
    count = 0

    async def send(message: Message) -> None:
        nonlocal count
        count += 1
        if count > sends:
            await asyncio.Event().wait()

    return send


async def test_a_send_waiting_past_the_timeout_ends_the_request_as_408() -> None:
    scope = context_scope()
    app = SendTimeoutMiddleware(streaming, timeout=0.2)
    started = time.monotonic()
    await app(scope, never, blocked_after(3))  # returns: the stalled request is over
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2.0  # the timeout, plus at most a quarter of it, plus load
    ctx = RequestContext.of(scope)
    assert ctx.status == 408
    assert ctx.error == "the client took no response bytes for 0.2s"


async def test_sends_that_each_wait_less_than_the_timeout_are_left_alone() -> None:
    async def slow_client(message: Message) -> None:
        await asyncio.sleep(0.1)  # seven sends: 0.7s in all, 3.5 times the timeout

    scope = context_scope()
    await SendTimeoutMiddleware(streaming, timeout=0.2)(scope, never, slow_client)
    assert RequestContext.of(scope).status == 0


async def test_waiting_for_the_upstream_is_not_a_stalled_client() -> None:
    async def thinking(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.5)  # no send pending: the upstream's silence is not ours
        await endpoint(scope, receive, send)

    scope, recorder = context_scope(), Recorder()
    await SendTimeoutMiddleware(thinking, timeout=0.1)(scope, never, recorder)
    assert RequestContext.of(scope).status == 0
    assert recorder.messages[-1]["more_body"] is False


async def test_another_cancellation_of_a_stalled_request_still_goes_through() -> None:
    app = SendTimeoutMiddleware(streaming, timeout=0.2)
    task = asyncio.create_task(app(context_scope(), never, blocked_after(1)))
    await asyncio.sleep(0.05)
    task.cancel()  # e.g. the server stopping
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_timer_is_gone_once_the_request_ends() -> None:
    loop: Any = asyncio.get_running_loop()
    before = len(loop._scheduled)
    await SendTimeoutMiddleware(streaming, timeout=60)(context_scope(), never, Recorder())
    # A cancelled timer stays in the loop's heap until its time; it must be cancelled.
    assert all(handle.cancelled() for handle in loop._scheduled[before:])


async def test_requests_in_flight_share_one_timer_and_each_stall_is_its_own() -> None:
    # One timer for all requests, not one each: a thousand held streams hold no timers.
    loop: Any = asyncio.get_running_loop()
    before = len([h for h in loop._scheduled if not h.cancelled()])
    app = SendTimeoutMiddleware(streaming, timeout=0.2)
    scopes = [context_scope() for _ in range(3)]
    stalled = asyncio.create_task(app(scopes[0], never, blocked_after(2)))
    healthy = [asyncio.create_task(app(s, never, blocked_after(100))) for s in scopes[1:]]
    await asyncio.sleep(0)
    assert len([h for h in loop._scheduled if not h.cancelled()]) - before == 1
    await asyncio.wait_for(asyncio.gather(stalled, *healthy), 2)
    statuses = [RequestContext.of(s).status for s in scopes]
    assert statuses == [408, 0, 0]
