"""hypercorn with a response's head held back: it must go out with the body in one write,
and never later than the event loop's next turn when no body follows yet."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from resillm.hypercorn_head import coalesce_response_heads
from resillm.hypercorn_lean import lighten_hypercorn

pytestmark = pytest.mark.anyio

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
ANSWER = b'{"answer": "' + b"x" * 300 + b'"}'


class Writes:
    """What the server's stream writers are asked to write, one entry a call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[bytes] = []
        write, writelines = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines

        def recording_write(writer: asyncio.StreamWriter, data: Any) -> None:
            self.calls.append(bytes(data))
            write(writer, data)

        def recording_writelines(writer: asyncio.StreamWriter, data: Any) -> None:
            data = [bytes(part) for part in data]
            self.calls.append(b"".join(data))
            writelines(writer, data)

        monkeypatch.setattr(asyncio.StreamWriter, "write", recording_write)
        monkeypatch.setattr(asyncio.StreamWriter, "writelines", recording_writelines)

    def server_side(self) -> list[bytes]:
        # The test's own client writes requests; the server's writes are the rest.
        return [c for c in self.calls if c and not c.startswith((b"GET ", b"POST ", b"HEAD "))]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[App], Awaitable[int]]]:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    lighten_hypercorn()
    coalesce_response_heads()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start(app: App) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = config.errorlog = None
        tasks.append(asyncio.create_task(hypercorn_serve(app, config, shutdown_trigger=stop.wait)))  # type: ignore[arg-type]
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
            else:
                writer.close()
                return port
        raise AssertionError("hypercorn did not come up")

    yield start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def request(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


async def json_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    length = str(len(ANSWER)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


async def test_a_json_answer_goes_out_in_one_write(
    serve: Callable[[App], Awaitable[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = await serve(json_app)
    writes = Writes(monkeypatch)
    reader, writer = await request(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.readexactly(len(ANSWER)), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200") and body == ANSWER
    [one] = writes.server_side()
    assert one == head + body


async def test_keep_alive_answers_each_go_out_whole(
    serve: Callable[[App], Awaitable[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = await serve(json_app)
    writes = Writes(monkeypatch)
    reader, writer = await request(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    for n in range(3):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert await asyncio.wait_for(reader.readexactly(len(ANSWER)), 5) == ANSWER
        if n < 2:
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    writer.close()
    server_writes = writes.server_side()
    assert len(server_writes) == 3
    assert all(w.startswith(b"HTTP/1.1 200") and w.endswith(ANSWER) for w in server_writes)


async def test_a_head_with_no_body_yet_is_not_held_back(
    serve: Callable[[App], Awaitable[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first_chunk = asyncio.Event()

    async def stream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await first_chunk.wait()  # an upstream that takes its time
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    port = await serve(stream_app)
    writes = Writes(monkeypatch)
    reader, writer = await request(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # before any chunk
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    first_chunk.set()
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()
    assert b"data: 1\n\n" in rest
    assert writes.server_side()[0] == head  # the head alone, then the chunks


async def test_an_empty_answer_and_a_failed_app_still_answer(
    serve: Callable[[App], Awaitable[int]],
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/fail":
            raise RuntimeError("before any response")  # hypercorn answers 500 itself
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = await serve(app)
    reader, writer = await request(
        port, b"GET /empty HTTP/1.1\r\nhost: x\r\n\r\nHEAD /fail HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert first.startswith(b"HTTP/1.1 204") and second.startswith(b"HTTP/1.1 500")


def test_hypercorn_uses_it_once_patched() -> None:
    from hypercorn.asyncio.tcp_server import TCPServer

    coalesce_response_heads()
    patched = TCPServer.protocol_send
    coalesce_response_heads()  # a second call changes nothing
    assert TCPServer.protocol_send is patched
    assert getattr(patched, "_resillm_coalesces_heads", False)
