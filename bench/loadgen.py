"""The load: targets, distinct request bodies, throughput and one-at-a-time latency."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import msgspec

THROUGHPUT_CONCURRENCY = 32
JSON_HEADERS = {"Content-Type": "application/json"}
PROMPT = "Benchmark prompt {}: tell me something resilient."
_PLACEHOLDER = "\x00serial\x00"
_serials = itertools.count(1)


def body(model: str, *, stream: bool = False, serial: str | None = None) -> bytes:
    """A chat request whose user message is new every time (so a cache only ever misses)."""
    content = PROMPT.format(serial if serial is not None else next(_serials))
    messages = [{"role": "user", "content": content}]
    return msgspec.json.encode({"model": model, "messages": messages, "stream": stream})


@dataclass(frozen=True)
class Target:
    """Where requests go: the mock straight ("direct") or a gateway, and how to read its CPU."""

    name: str
    url: str
    model: str  # the model (direct) or alias (gateway) of the ordinary phases
    held_model: str  # the one of the held-streams phase, whose chunks the mock paces
    held_headers: Mapping[str, str] = field(default_factory=dict)
    cpu_seconds: Callable[[], float] | None = None

    def body(self, *, stream: bool = False) -> bytes:
        return body(self.model, stream=stream)


@dataclass
class Figures:
    """Every figure of one target; NaN (or 0 for counts) until its phase has run."""

    rps: float = math.nan
    requests: int = 0
    throughput_errors: int = 0
    driver_cpu_share: float = math.nan
    server_cpu_ms_per_request: float = math.nan  # the gateway's (or the mock's, direct)
    server_cpu_share: float = math.nan  # of one CPU, during the throughput phase
    latency_p50_ms: float = math.nan
    latency_p99_ms: float = math.nan
    latency_errors: int = 0
    ttft_c1_p50_ms: float = math.nan
    ttft_c1_p99_ms: float = math.nan
    ttft_c8_p50_ms: float = math.nan
    ttft_c8_p99_ms: float = math.nan
    chunk_interval_us: float = math.nan
    stream_errors: int = 0
    held_streams: int = 0
    held_completed: int = 0
    held_peak_open: int = 0  # the most open at one time, first content chunk to end
    held_listen_overflows: int = 0  # SYNs dropped on full accept queues (whole machine)
    held_ttft_p50_ms: float = math.nan
    held_ttft_p99_ms: float = math.nan
    held_gap_p50_ms: float = math.nan
    held_gap_p99_ms: float = math.nan
    held_gap_samples: int = 0
    held_gap_p99_all_ms: float = math.nan  # the gaps before the last stream started too
    held_seconds: float = math.nan
    peak_rss_mb: float = math.nan
    cache_hits: float = math.nan
    cache_misses: float = math.nan
    access_log_lines: int = 0
    notes: list[str] = field(default_factory=list)  # what went wrong in a phase


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; `share` in (0, 1]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1))]


@dataclass
class Samples:
    """What the rounds of the phases gathered for one target, before it becomes Figures."""

    ok: int = 0
    errors: int = 0
    wall: float = 0.0
    server_cpu: float = 0.0
    driver_cpu: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    latency_errors: int = 0
    ttft_ms: dict[int, list[float]] = field(default_factory=lambda: {1: [], 8: []})
    gaps_us: list[float] = field(default_factory=list)
    stream_errors: int = 0
    # Per throughput round: (requests answered, wall seconds, server CPU per request).
    rounds: list[tuple[int, float, float]] = field(default_factory=list)

    def throughput_round(self, ok: int, errors: int, wall: float, cpu: float) -> None:
        self.ok, self.errors, self.wall = self.ok + ok, self.errors + errors, self.wall + wall
        self.server_cpu += cpu
        if ok + errors and wall > 0:
            self.rounds.append((ok, wall, cpu / (ok + errors)))

    def into(self, figures: Figures) -> None:
        """Throughput and CPU per request are the median of the rounds' figures: a burst
        of other work on the machine during one round (or the first round's warming up)
        does not decide them; totals would let it."""
        requests = self.ok + self.errors
        if self.wall > 0:
            figures.rps = statistics.median(ok / wall for ok, wall, _ in self.rounds)
            figures.requests = requests
            figures.throughput_errors = self.errors
            figures.driver_cpu_share = self.driver_cpu / self.wall
            figures.server_cpu_share = self.server_cpu / self.wall
        if requests:
            figures.server_cpu_ms_per_request = statistics.median(
                cpu * 1000 for _, _, cpu in self.rounds
            )
        figures.latency_p50_ms = percentile(self.latency_ms, 0.50)
        figures.latency_p99_ms = percentile(self.latency_ms, 0.99)
        figures.latency_errors = self.latency_errors
        figures.ttft_c1_p50_ms = percentile(self.ttft_ms[1], 0.50)
        figures.ttft_c1_p99_ms = percentile(self.ttft_ms[1], 0.99)
        figures.ttft_c8_p50_ms = percentile(self.ttft_ms[8], 0.50)
        figures.ttft_c8_p99_ms = percentile(self.ttft_ms[8], 0.99)
        figures.chunk_interval_us = (
            sum(self.gaps_us) / len(self.gaps_us) if self.gaps_us else math.nan
        )
        figures.stream_errors = self.stream_errors


class CpuWindow:
    """The target's server CPU time (utime + stime) and the wall time over a phase."""

    def __init__(self, target: Target) -> None:
        self._read = target.cpu_seconds
        self._cpu = self._read() if self._read else math.nan
        self._wall = time.monotonic()

    def close(self) -> tuple[float, float]:
        """CPU seconds (NaN without a reader) and wall seconds since the start."""
        cpu = self._read() - self._cpu if self._read else math.nan
        return cpu, time.monotonic() - self._wall


async def throughput_aiohttp(
    session: aiohttp.ClientSession, target: Target, seconds: float, samples: Samples
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ok = errors = 0

    async def worker() -> None:
        nonlocal ok, errors
        while loop.time() < deadline:
            try:
                async with session.post(
                    target.url, data=target.body(), headers=JSON_HEADERS
                ) as response:
                    await response.read()
                    ok, errors = (ok + 1, errors) if response.status == 200 else (ok, errors + 1)
            except (TimeoutError, aiohttp.ClientError):
                errors += 1

    window, driver_start = CpuWindow(target), time.process_time()
    await asyncio.gather(*(worker() for _ in range(THROUGHPUT_CONCURRENCY)))
    cpu, wall = window.close()
    samples.throughput_round(ok, errors, wall, cpu)
    samples.driver_cpu += time.process_time() - driver_start


def wrk_script(target: Target) -> str:
    """A wrk script that sends the target's request with a new user message every time."""
    template = body(target.model, serial=_PLACEHOLDER).decode()
    prefix, suffix = template.split(msgspec.json.encode(_PLACEHOLDER).decode()[1:-1])
    tag = f"wrk{next(_serials)}-"  # apart from every other phase's serials
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local prefix = [==[{prefix}{tag}]==]\n"
        f"local suffix = [==[{suffix}]==]\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        "  return wrk.format(nil, nil, nil, prefix .. n .. suffix)\n"
        "end\n"
    )


_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


async def throughput_wrk(target: Target, seconds: int, samples: Samples) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_script(target))
    try:
        window = CpuWindow(target)
        process = await asyncio.create_subprocess_exec(
            # One thread: one Lua state, so the serials never repeat.
            *("wrk", "-t1", f"-c{THROUGHPUT_CONCURRENCY}", f"-d{seconds}s"),
            *("-s", script.name, target.url),
            stdout=asyncio.subprocess.PIPE,
        )
        output = (await process.communicate())[0].decode()
        cpu, _ = window.close()
    finally:
        os.unlink(script.name)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", output)
    if total is None:
        raise RuntimeError(f"could not read wrk's output:\n{output}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    requests, non_ok = int(total.group(1)), int(bad.group(1)) if bad else 0
    errors = non_ok + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    wall = float(total.group(2)) * _WRK_UNITS[total.group(3)]
    samples.throughput_round(requests - non_ok, errors, wall, cpu)
    samples.driver_cpu = math.nan  # wrk's, not measured


async def latency(
    session: aiohttp.ClientSession, target: Target, count: int, samples: Samples
) -> None:
    for _ in range(count):
        data = target.body()
        start = time.perf_counter()
        try:
            async with session.post(target.url, data=data, headers=JSON_HEADERS) as response:
                await response.read()
                ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            samples.latency_ms.append((time.perf_counter() - start) * 1000)
        else:
            samples.latency_errors += 1
