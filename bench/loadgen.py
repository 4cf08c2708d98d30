"""The load: throughput, one-at-a-time latency and streams, against one target."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from dataclasses import dataclass

import aiohttp
import msgspec

THROUGHPUT_CONCURRENCY = 32
STREAM_CONCURRENCY = 8
PROMPT = [{"role": "user", "content": "Benchmark prompt: tell me something resilient."}]
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str

    def body(self, *, stream: bool = False) -> bytes:
        return msgspec.json.encode({"model": self.model, "messages": PROMPT, "stream": stream})


@dataclass
class Figures:
    rps: float = 0.0
    throughput_errors: int = 0
    driver_cpu_share: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    chunk_interval_us: float = 0.0
    stream_errors: int = 0


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; `share` in (0, 1]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))]


async def throughput_aiohttp(
    session: aiohttp.ClientSession, target: Target, seconds: float, figures: Figures
) -> None:
    body, loop = target.body(), asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ok = errors = 0

    async def worker() -> None:
        nonlocal ok, errors
        while loop.time() < deadline:
            try:
                async with session.post(target.url, data=body, headers=JSON_HEADERS) as response:
                    await response.read()
                    ok, errors = (ok + 1, errors) if response.status == 200 else (ok, errors + 1)
            except aiohttp.ClientError:
                errors += 1

    cpu_start, wall_start = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(THROUGHPUT_CONCURRENCY)))
    wall = time.monotonic() - wall_start
    figures.rps = ok / wall
    figures.throughput_errors = errors
    figures.driver_cpu_share = (time.process_time() - cpu_start) / wall


async def throughput_wrk(target: Target, seconds: float, figures: Figures) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{target.body().decode()}]]\n"
        )
    try:
        process = await asyncio.create_subprocess_exec(
            *("wrk", "-t1", f"-c{THROUGHPUT_CONCURRENCY}", f"-d{max(1, round(seconds))}s"),
            *("-s", script.name, target.url),
            stdout=asyncio.subprocess.PIPE,
        )
        output = (await process.communicate())[0].decode()
    finally:
        os.unlink(script.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise RuntimeError(f"could not read wrk's output:\n{output}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_ok = int(bad.group(1)) if bad else 0
    figures.rps = float(rps.group(1)) * (1 - non_ok / max(1, int(total.group(1))))
    figures.throughput_errors = non_ok + (
        sum(map(int, socket_errors.groups())) if socket_errors else 0
    )
    figures.driver_cpu_share = float("nan")


async def latency(
    session: aiohttp.ClientSession, target: Target, count: int, figures: Figures
) -> None:
    body, samples = target.body(), []
    for _ in range(count):
        start = time.perf_counter()
        async with session.post(target.url, data=body, headers=JSON_HEADERS) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{target.name}: status {response.status} in the latency phase")
        samples.append((time.perf_counter() - start) * 1000)
    figures.latency_p50_ms = percentile(samples, 0.50)
    figures.latency_p99_ms = percentile(samples, 0.99)


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def content_events(events: list[bytes]) -> int:
    """How many of these SSE events carry content (a gateway may frame them as it likes)."""
    found = 0
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                chunk = _decode_chunk(line[6:])
                found += any(choice.delta.content for choice in chunk.choices)
    return found


async def one_stream(
    session: aiohttp.ClientSession, target: Target, body: bytes
) -> tuple[float, float]:
    """Time to the first content chunk, and the mean gap between content chunks (seconds).

    Reads whatever the socket has (not line by line) to keep the driver's own cost per
    chunk small; chunks that arrive in one read share its arrival time.
    """
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    pending = b""
    async with session.post(target.url, data=body, headers=JSON_HEADERS) as response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        async for data in response.content.iter_any():
            arrived = time.perf_counter()
            *events, pending = (pending + data).replace(b"\r\n", b"\n").split(b"\n\n")
            if found := content_events(events):
                first = first or arrived
                last = arrived
                count += found
    if count < 2:
        raise RuntimeError(f"only {count} content chunk(s)")
    return first - start, (last - first) / (count - 1)


async def streaming(
    session: aiohttp.ClientSession, target: Target, count: int, figures: Figures
) -> None:
    body, left = target.body(stream=True), count
    ttfts: list[float] = []
    gaps: list[float] = []

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                ttft, gap = await one_stream(session, target, body)
            except (aiohttp.ClientError, RuntimeError, msgspec.DecodeError):
                figures.stream_errors += 1
                continue
            ttfts.append(ttft * 1000)
            gaps.append(gap * 1_000_000)

    await asyncio.gather(*(worker() for _ in range(STREAM_CONCURRENCY)))
    figures.ttft_p50_ms = percentile(ttfts, 0.50)
    figures.ttft_p99_ms = percentile(ttfts, 0.99)
    figures.chunk_interval_us = sum(gaps) / len(gaps) if gaps else float("nan")
