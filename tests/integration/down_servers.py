"""Dependencies that are down, for the failure-of-dependencies tests: a loopback port with
nothing listening, a server that accepts connections and never answers, and ``resillm
serve`` in its own process with its stderr kept line by line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Hanging:
    port: int
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for_connection(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.connections:  # noqa: ASYNC110 - a counter, polled
                await asyncio.sleep(0.02)


@asynccontextmanager
async def hanging_server() -> AsyncIterator[Hanging]:
    """Accepts connections, reads nothing, answers nothing: a dependency that hangs."""
    hanging = Hanging(0)

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hanging.connections += 1
        hanging.writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    hanging.port = server.sockets[0].getsockname()[1]
    try:
        yield hanging
    finally:
        for writer in hanging.writers:
            writer.close()
        server.close()
        await server.wait_closed()


@dataclass
class ServeProcess:
    url: str
    process: asyncio.subprocess.Process
    lines: list[str]  # stderr, after the "serving on" line

    async def stop(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the process took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
        return code, time.monotonic() - started

    def records(self) -> list[dict[str, Any]]:
        """Every stderr line as JSON (a line that is not JSON fails the test)."""
        return [json.loads(line) for line in self.lines if line.strip()]


@asynccontextmanager
async def serve_process(
    config: dict[str, Any], path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """``resillm serve -c path`` in its own process; killed at the end if still running."""
    path.write_text(json.dumps(config))  # JSON is YAML
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "resillm.cli", "serve", "-c", str(path), "--port", "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip
    assert process.stderr is not None
    stderr = process.stderr
    lines: list[str] = []

    async def keep_lines() -> None:
        async for line in stderr:
            lines.append(line.decode(errors="replace").rstrip("\n"))

    reader: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(20):
            first = (await stderr.readline()).decode()
            match = re.search(r"http://127\.0\.0\.1:(\d+)", first)
            assert match, f"no address in {first!r}"
            url = f"http://127.0.0.1:{match.group(1)}"
            reader = asyncio.create_task(keep_lines())
            async with aiohttp.ClientSession() as session:
                while True:
                    try:
                        async with session.get(url + "/health") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
        yield ServeProcess(url, process, lines)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if reader is not None:
            await reader
