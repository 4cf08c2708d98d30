"""The processes under test: configure, start, pin to CPUs, wait for health, measure, stop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import math
import os
import re
import resource
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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# The held-streams phase: the mock paces these answers (per-request `x-mock-*` headers, sent
# by the driver when direct and by the gateway's `slow` provider otherwise).
HELD_CHUNKS = 20
HELD_CHUNK_DELAY_S = 0.1
HELD_HEADERS = {"x-mock-chunk-delay": f"{HELD_CHUNK_DELAY_S:g}", "x-mock-chunks": str(HELD_CHUNKS)}
MAX_CONNECTIONS = 2000  # the bench providers' pool; the default (100) would queue held streams


def free_port(taken: set[int]) -> int:
    """A loopback port free now and not in `taken` (which it joins)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def raise_open_files_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def missing_modules(*names: str) -> list[str]:
    """Which of these modules this interpreter (the one that runs the gateway) lacks."""
    return [name for name in names if importlib.util.find_spec(name) is None]


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


def cpu_busy_seconds(cpus: frozenset[int] | None) -> float:
    """CPU time these CPUs spent on anything but idling (all processes, the kernel, steal)."""
    if cpus is None:
        return math.nan
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full (all
    sockets of the machine: `TcpExt: ListenOverflows`); -1 when it cannot be read."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return -1
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            found = dict(zip(names.split(), values.split(), strict=True))
            return int(found.get("ListenOverflows", -1))
    return -1


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of `pid` (threads started later inherit from their creator)."""
    if cpus is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(tid), cpus)


class Server:
    """A Python subprocess (`args` after the interpreter; the whole command with
    `interpreter=False`) with its output (stdout and stderr) in a temporary file; leaving
    it stops it."""

    def __init__(self, name: str, args: list[str], *, interpreter: bool = True) -> None:
        self.name = name
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed on __exit__
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        self.process = subprocess.Popen(
            [sys.executable, *args] if interpreter else args,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def output_tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def peak_rss_mb(self) -> float:
        """`VmHWM` (the resident set's high-water mark) in MB (10^6 bytes)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) * 1024 / 1e6 if match else float("nan")

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process (all its threads) so far; NaN once gone."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except FileNotFoundError:
            return math.nan
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

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


async def wait_healthy(
    session: aiohttp.ClientSession,
    server: Server,
    url: str,
    *,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with session.get(url + "/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} did not come up on {url}:\n{server.output_tail()}")


def gateway_config(
    gateway_port: int, upstream_port: int, *, features: str, workdir: Path, name: str
) -> str:
    """The gateway's config: `bare` (what every deployment has) or `all` layers on.

    `all`: metrics (always on), the access log, a memory budget whose limits never reject
    (so every request is priced and reserved), and the memory cache (the driver makes every
    request distinct, so this measures the miss path: key, lookup, store).
    """
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    slow_headers = ", ".join(f'{key}: "{value}"' for key, value in HELD_HEADERS.items())
    pricing = ", pricing: {input_per_mtok: 1, output_per_mtok: 2}" if features == "all" else ""
    lines = [
        f"server: {{host: 127.0.0.1, port: {gateway_port}}}",
        "providers:",
        f"  up: {{type: openai_compatible, base_url: {upstream}, "
        f"max_connections: {MAX_CONNECTIONS}}}",
        f"  slow: {{type: openai_compatible, base_url: {upstream}, "
        f"max_connections: {MAX_CONNECTIONS}, headers: {{{slow_headers}}}}}",
        "models:",
        f"  bench: {{targets: [{{provider: up, model: mock-model}}]{pricing}}}",
        f"  bench-slow: {{targets: [{{provider: slow, model: mock-model}}]{pricing}}}",
    ]
    if features == "all":
        snapshot = workdir / f"budget-{name}.json"
        lines += [
            "logging: {log_requests: true}",
            "budget: {hourly_limit: 1000000, daily_limit: 1000000, store: memory, "
            f'snapshot_path: "{snapshot}"}}',
            "cache: {enabled: true, backend: memory}",
        ]
    elif features == "bare":
        lines.append("logging: {log_requests: false}")
    else:
        raise ValueError(f"unknown feature set {features!r}")
    return "\n".join(lines) + "\n"


async def cache_lookups(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """`resillm_cache_requests_total` by result, from the gateway's /metrics."""
    async with session.get(base_url + "/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for match in re.finditer(
        r'^resillm_cache_requests_total\{[^}]*result="(\w+)"[^}]*\}\s+([\d.eE+-]+)',
        text,
        re.MULTILINE,
    ):
        found[match.group(1)] = found.get(match.group(1), 0.0) + float(match.group(2))
    return found
