"""A real ``redis-server`` on a free loopback port, for the tests that need one.

The binary comes from the system (``apt-get install redis-server``; ``.ci/run`` installs
it); without it the tests that ask for one are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

START_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    url: str
    process: asyncio.subprocess.Process

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _answers_ping(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return await reader.readline() == b"+PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


@asynccontextmanager
async def redis_server(port: int | None = None) -> AsyncIterator[RedisServer]:
    """A fresh, empty Redis; on ``port`` to bring one back where an earlier one was."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = port or _free_port()
    process = await asyncio.create_subprocess_exec(
        binary,
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    server = RedisServer(f"redis://127.0.0.1:{port}/0", process)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not await _answers_ping(port):
                if process.returncode is not None:
                    raise RuntimeError(f"redis-server exited with {process.returncode}")
                await asyncio.sleep(0.02)
        yield server
    finally:
        await server.kill()
