"""`make bench`: the gateway against the mock upstream it fronts, in one run, on loopback.

Starts `resillm mock-upstream` and `resillm serve` as subprocesses, then drives the same
requests straight at the mock ("direct") and through the gateway, and prints a table of
figures side by side. The ratios are what matter; absolute times depend on the machine.

This script is the load generator: a third process, pinned to its own CPU when there are
enough of them (gateway on one CPU, mock upstream on another, this driver on the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from loadgen import (
    STREAM_CONCURRENCY,
    THROUGHPUT_CONCURRENCY,
    Figures,
    Target,
    latency,
    streaming,
    throughput_aiohttp,
    throughput_wrk,
)
from processes import CpuPlan, Server, free_port, gateway_config, pin, wait_healthy

MOCK_CHUNKS = 32


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    latency_requests: int
    stream_requests: int
    gateway: bool
    wrk: bool
    json: bool


async def measure(
    settings: Settings, targets: list[Target], session: aiohttp.ClientSession
) -> dict[str, Figures]:
    """Each phase for every target in turn, so slow drift hits both sides alike."""
    results = {target.name: Figures() for target in targets}

    async def each(phase: Callable[[Target, Figures], Awaitable[None]]) -> None:
        for target in targets:
            await phase(target, results[target.name])

    async def warm_then_throughput(target: Target, figures: Figures) -> None:
        await throughput_aiohttp(session, target, settings.warmup, Figures())
        if settings.wrk:
            await throughput_wrk(target, settings.duration, figures)
        else:
            await throughput_aiohttp(session, target, settings.duration, figures)

    await each(warm_then_throughput)
    await each(lambda target, figures: latency(session, target, settings.latency_requests, figures))
    await each(
        lambda target, figures: streaming(session, target, settings.stream_requests, figures)
    )
    return results


@dataclass(frozen=True)
class Running:
    """A server under test and the target that reaches it."""

    server: Server
    target: Target
    cpus: frozenset[int] | None


def start_servers(
    stack: contextlib.ExitStack[bool | None], settings: Settings, cpus: CpuPlan
) -> list[Running]:
    """Start the mock (and the gateway); `stack` stops them, whatever happens next."""
    upstream_port, gateway_port = free_port(), free_port()
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resillm-bench-")))
    mock_args = ["mock-upstream", "--port", str(upstream_port), "--chunks", str(MOCK_CHUNKS)]
    mock = stack.enter_context(Server("mock-upstream", mock_args))
    direct = Target("direct", f"http://127.0.0.1:{upstream_port}/v1/chat/completions", "mock-model")
    running = [Running(mock, direct, cpus.mock)]
    if settings.gateway:
        config = workdir / "gateway.yaml"
        config.write_text(gateway_config(gateway_port, upstream_port))
        gateway = stack.enter_context(Server("gateway", ["serve", "-c", str(config)]))
        url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        running.append(Running(gateway, Target("gateway", url, "bench"), cpus.gateway))
    return running


async def drive(settings: Settings, running: list[Running]) -> dict[str, Figures]:
    connector = aiohttp.TCPConnector(limit=THROUGHPUT_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for each in running:
            await wait_healthy(
                session, each.server, each.target.url.removesuffix("/v1/chat/completions")
            )
            pin(each.server.process.pid, each.cpus)
        return await measure(settings, [each.target for each in running], session)


def report(settings: Settings, cpus: CpuPlan, result: dict[str, object]) -> str:
    direct = result["direct"]
    gateway = result.get("gateway")
    assert isinstance(direct, dict)
    rows: list[tuple[str, str, float, str]] = [
        (f"throughput, c={THROUGHPUT_CONCURRENCY} (req/s)", "rps", 0, "ratio"),
        ("throughput errors", "throughput_errors", 0, "none"),
        ("latency p50, c=1 (ms)", "latency_p50_ms", 2, "added"),
        ("latency p99, c=1 (ms)", "latency_p99_ms", 2, "added"),
        (f"stream TTFT p50, c={STREAM_CONCURRENCY} (ms)", "ttft_p50_ms", 2, "added"),
        (f"stream TTFT p99, c={STREAM_CONCURRENCY} (ms)", "ttft_p99_ms", 2, "added"),
        ("gap between chunks, mean (us)", "chunk_interval_us", 1, "added"),
        ("stream errors", "stream_errors", 0, "none"),
    ]
    generator = "wrk" if settings.wrk else "aiohttp"
    lines = [
        f"resillm bench: {settings.duration:g} s throughput phases ({generator}), "
        f"{settings.latency_requests} latency requests, {settings.stream_requests} streams "
        f"of {MOCK_CHUNKS} chunks; CPUs: {cpus.describe()}",
        f"{'figure':<34} {'direct':>10} {'gateway':>10} {'ratio/added':>14}",
    ]
    for label, key, digits, compare in rows:
        d = float(direct[key])
        g = float(gateway[key]) if isinstance(gateway, dict) else float("nan")
        extra = ""
        if isinstance(gateway, dict) and compare == "ratio":
            extra = f"{g / d:.2f}x" if d else "-"
        elif isinstance(gateway, dict) and compare == "added":
            extra = f"{g - d:+.{digits}f}" + (f" ({g / d:.1f}x)" if d else "")
        lines.append(f"{label:<34} {d:>10.{digits}f} {g:>10.{digits}f} {extra:>14}")
    rss = result.get("gateway_peak_rss_mib")
    rss_mib = float(rss) if isinstance(rss, float) else float("nan")
    lines.append(f"{'gateway peak RSS (MiB)':<34} {'-':>10} {rss_mib:>10.1f}")
    share = float(direct["driver_cpu_share"])
    if share > 0.9:
        lines.append(
            f"note: this driver used {share:.0%} of a CPU in the direct throughput phase, "
            "so the direct req/s is bounded by the driver, not the mock"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput phase")
    parser.add_argument("--quick", action="store_true", help="a short run (a smoke test)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--no-gateway", action="store_true", help="measure the mock upstream only")
    parser.add_argument(
        "--no-wrk",
        action="store_true",
        help="drive throughput with aiohttp even when wrk is installed",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    return Settings(
        duration=2.0 if quick else float(args.duration),
        warmup=0.5 if quick else 1.0,
        latency_requests=100 if quick else 1000,
        stream_requests=80 if quick else 800,
        gateway=not args.no_gateway,
        wrk=shutil.which("wrk") is not None and not args.no_wrk,
        json=bool(args.json),
    )


def run_loop(main: Coroutine[Any, Any, dict[str, Figures]]) -> dict[str, Figures]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    cpus = CpuPlan.for_this_machine()
    if cpus.driver is not None:
        os.sched_setaffinity(0, cpus.driver)
    with contextlib.ExitStack() as stack:
        running = start_servers(stack, settings, cpus)
        figures = run_loop(drive(settings, running))
        result: dict[str, object] = {name: asdict(each) for name, each in figures.items()}
        if settings.gateway:
            gateway = running[1].server
            result["gateway_peak_rss_mib"] = gateway.peak_rss_mib()
            if figures["gateway"].throughput_errors or figures["gateway"].stream_errors:
                print(
                    f"gateway errors; its log ends with:\n{gateway.output_tail()}", file=sys.stderr
                )
    print(report(settings, cpus, result))
    if settings.json:
        document = {"settings": asdict(settings), "cpus": cpus.describe(), **result}
        print(msgspec.json.encode(document).decode())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers were stopped on the way out
        sys.exit(130)
