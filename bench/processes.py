"""The processes under test: start, pin to CPUs, wait for health, measure memory, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class CpuPlan:
    gateway: frozenset[int] | None
    mock: frozenset[int] | None
    driver: frozenset[int] | None

    @classmethod
    def for_this_machine(cls) -> CpuPlan:
        if not hasattr(os, "sched_getaffinity"):
            return cls(None, None, None)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None, None)
        rest = frozenset(cpus[2:]) or frozenset({cpus[1]})
        return cls(frozenset({cpus[0]}), frozenset({cpus[1]}), rest)

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned"
        return (
            f"gateway {_cpus(self.gateway)}, mock {_cpus(self.mock)}, driver {_cpus(self.driver)}"
        )


def _cpus(cpus: frozenset[int] | None) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus or ()))


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of `pid` (threads started later inherit from their creator)."""
    if cpus is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


class Server:
    """A `resillm` subprocess with its output in a temporary file; leaving it stops it."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed on __exit__
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "resillm.cli", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )

    def output_tail(self, lines: int = 30) -> str:
        self.log.flush()
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) / 1024 if match else float("nan")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.stop()
        finally:
            self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def wait_healthy(session: aiohttp.ClientSession, server: Server, url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} did not come up on {url}:\n{server.output_tail()}")


def gateway_config(gateway_port: int, upstream_port: int) -> str:
    return (
        f"server: {{host: 127.0.0.1, port: {gateway_port}}}\n"
        "providers:\n"
        f"  up: {{type: openai_compatible, base_url: http://127.0.0.1:{upstream_port}/v1}}\n"
        "models:\n"
        "  bench: {targets: [{provider: up, model: mock-model}]}\n"
    )
