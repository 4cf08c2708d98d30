"""`make bench`: the gateway against the mock upstream it fronts, in one run, on loopback.

Starts `resillm mock-upstream` and one `resillm serve` per variant (server x feature set),
drives the same requests straight at the mock ("direct") and through each variant, phase
by phase (each phase runs for every target in turn, so slow drift hits all of them alike),
and prints one table of the issue's targeted figures with PASS/FAIL, then all vs bare.

This script is the load generator: pinned beside the mock when there are only two CPUs
(gateways on one CPU, mock and driver on the other), on the rest when there are more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import report
from loadgen import (
    THROUGHPUT_CONCURRENCY,
    Figures,
    Samples,
    Target,
    latency,
    throughput_aiohttp,
    throughput_wrk,
)
from processes import (
    HELD_CHUNK_DELAY_S,
    HELD_CHUNKS,
    HELD_HEADERS,
    CpuPlan,
    Server,
    cache_lookups,
    cpu_busy_seconds,
    free_port,
    gateway_config,
    missing_modules,
    pin,
    raise_open_files_limit,
    wait_healthy,
)
from streams import held_streams, streaming

MOCK_CHUNKS = 32
BENCH = Path(__file__).resolve().parent
SERVERS = ("hypercorn", "uvicorn")
FEATURES = ("bare", "all")


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    latency_requests: int
    ttft_c1_streams: int
    ttft_c8_streams: int
    held_streams: int
    rounds: int
    servers: tuple[str, ...]
    features: tuple[str, ...]
    wrk: bool
    json: bool
    floor: bool = False


@dataclass
class Running:
    """A server under test, the target that reaches it, and what it measured."""

    name: str
    server: Server
    target: Target
    cpus: frozenset[int] | None
    features: str = ""
    figures: Figures = field(default_factory=Figures)
    up: bool = True  # it came up (healthy) and is measured

    @property
    def base_url(self) -> str:
        return self.target.url.removesuffix("/v1/chat/completions")


def start_servers(
    stack: contextlib.ExitStack[bool | None], settings: Settings, cpus: CpuPlan
) -> tuple[list[Running], dict[str, str]]:
    """Start the mock and every gateway variant; `stack` stops them, whatever happens next.

    Returns them (direct first) and the variants skipped, with the reason."""
    ports: set[int] = set()
    upstream_port = free_port(ports)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resillm-bench-")))
    mock_args = [str(BENCH / "mock.py"), "--port", str(upstream_port), "--chunks", str(MOCK_CHUNKS)]
    mock = stack.enter_context(Server("mock-upstream", mock_args))
    url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    direct = Target("direct", url, "mock-model", "mock-model", HELD_HEADERS, mock.cpu_seconds)
    running = [Running("direct", mock, direct, cpus.mock)]
    skipped: dict[str, str] = {}
    for server in settings.servers:
        missing = missing_modules("uvicorn", "httptools") if server == "uvicorn" else []
        for features in settings.features:
            name = f"{server}/{features}"
            if missing:
                skipped[name] = (
                    f"{' and '.join(missing)} not installed: pip install resillm[uvicorn]"
                )
                continue
            port = free_port(ports)
            config = workdir / f"{server}-{features}.yaml"
            config.write_text(
                gateway_config(
                    port, upstream_port, features=features, workdir=workdir, name=config.stem
                )
            )
            process = stack.enter_context(
                Server(name, ["-m", "resillm.cli", "serve", "-c", str(config), "--server", server])
            )
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            target = Target(name, url, "bench", "bench-slow", cpu_seconds=process.cpu_seconds)
            running.append(Running(name, process, target, cpus.gateway, features))
        if settings.floor and not missing:
            running.append(start_floor(stack, server, free_port(ports), direct.url, cpus))
    return running, skipped


def start_floor(
    stack: contextlib.ExitStack[bool | None], server: str, port: int, upstream: str, cpus: CpuPlan
) -> Running:
    """`bench/floor.py` on `server`: the same server and client library, no gateway logic."""
    name = f"{server}/floor"
    args = [str(BENCH / "floor.py"), "--server", server, "--port", str(port)]
    args += ["--upstream", upstream]
    args += [
        arg for key, value in HELD_HEADERS.items() for arg in ("--slow-header", f"{key}:{value}")
    ]
    process = stack.enter_context(Server(name, args))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    target = Target(name, url, "bench", "bench-slow", cpu_seconds=process.cpu_seconds)
    return Running(name, process, target, cpus.gateway, "floor")


Phase = Callable[[Running], Awaitable[None]]


class ForeignCpu:
    """How busy the gateways' CPU was with work other than the gateways, per phase."""

    def __init__(self, cpus: frozenset[int] | None, gateways: list[Server]) -> None:
        self.cpus, self.gateways = cpus, gateways
        self.busy: dict[str, list[float]] = {}  # phase: [foreign CPU s, wall s]

    def _now(self) -> tuple[float, float]:
        own = sum(gateway.cpu_seconds() for gateway in self.gateways)
        return cpu_busy_seconds(self.cpus) - own, time.monotonic()

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        cpu, wall = self._now()
        try:
            yield
        finally:
            cpu_end, wall_end = self._now()
            total = self.busy.setdefault(phase, [0.0, 0.0])
            total[0] += cpu_end - cpu
            total[1] += wall_end - wall

    def shares(self) -> dict[str, float]:
        """Per phase, the foreign share of the gateways' CPU(s), 0 to 1 (NaN: not pinned)."""
        width = len(self.cpus or ())
        return {
            phase: max(0.0, cpu) / (wall * width) if wall and width else math.nan
            for phase, (cpu, wall) in self.busy.items()
        }


async def measure(
    settings: Settings, running: list[Running], broken: list[str], foreign: ForeignCpu
) -> None:
    connector = aiohttp.TCPConnector(limit=THROUGHPUT_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    samples = {each.name: Samples() for each in running}
    rounds = settings.rounds
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for each in running:
            try:
                await wait_healthy(session, each.server, each.base_url)
            except RuntimeError as exc:
                if each is running[0]:
                    raise  # no mock, no bench
                broken.append(f"{each.name}: {exc}")
                each.up = False
                continue
            pin(each.server.process.pid, each.cpus)
        measured = [each for each in running if each.up]

        async def throughput(each: Running) -> None:
            seconds = max(1.0, settings.duration / rounds)
            if settings.wrk:
                await throughput_wrk(each.target, round(seconds), samples[each.name])
            else:
                await throughput_aiohttp(session, each.target, seconds, samples[each.name])

        def streams(count: int, concurrency: int) -> Phase:
            return lambda r: streaming(
                session, r.target, -(-count // rounds), concurrency, samples[r.name]
            )

        latency_count = -(-settings.latency_requests // rounds)
        phases: list[tuple[str, Phase, int]] = [
            (
                "warm-up",
                lambda r: throughput_aiohttp(session, r.target, settings.warmup, Samples()),
                1,
            ),
            ("throughput", throughput, rounds),
            (
                "latency",
                lambda r: latency(session, r.target, latency_count, samples[r.name]),
                rounds,
            ),
            ("TTFT c=1", streams(settings.ttft_c1_streams, 1), rounds),
            ("TTFT c=8", streams(settings.ttft_c8_streams, 8), rounds),
            (
                "held streams",
                lambda r: held_streams(r.target, settings.held_streams, HELD_CHUNKS, r.figures),
                1,
            ),
        ]
        # Each phase for every target in turn, in rounds, so drift and bursts of other work
        # on the machine fall on every target alike.
        for title, phase, repeat in phases:
            print(f"bench: {title} ({repeat} round(s))", file=sys.stderr, flush=True)
            for _ in range(repeat):
                for each in measured:
                    try:
                        with foreign.during(title):
                            await phase(each)
                    except Exception as exc:  # the run goes on; the table shows the gaps
                        broken.append(f"{each.name}: {title}: {type(exc).__name__}: {exc}")
        for each in running:
            samples[each.name].into(each.figures)
        for each in measured[1:]:
            await after_the_bench(session, each, broken)


async def after_the_bench(session: aiohttp.ClientSession, each: Running, broken: list[str]) -> None:
    if each.server.process.poll() is not None:
        broken.append(f"{each.name}: exited with {each.server.process.returncode}")
        return
    each.figures.peak_rss_mb = each.server.peak_rss_mb()
    log = each.server.output()
    each.figures.access_log_lines = log.count('"logger":"resillm.access"')
    if each.features == "all":
        try:
            lookups = await cache_lookups(session, each.base_url)
        except (TimeoutError, aiohttp.ClientError) as exc:
            broken.append(f"{each.name}: /metrics: {exc}")
            return
        each.figures.cache_hits = lookups.get("hit", 0.0)
        each.figures.cache_misses = lookups.get("miss", 0.0)
        if each.figures.cache_hits or not each.figures.access_log_lines:
            each.figures.notes.append(
                f"{each.figures.cache_hits:g} cache hits (want 0), "
                f"{each.figures.access_log_lines} access log lines (want > 0)"
            )


def header(
    settings: Settings, cpus: CpuPlan, load: tuple[float, float], foreign: dict[str, float]
) -> list[str]:
    generator = "wrk" if settings.wrk else "aiohttp"
    others = ", ".join(
        f"{phase} {share:.0%}" for phase, share in foreign.items() if not math.isnan(share)
    )
    return [
        f"resillm bench: throughput {settings.duration:g} s per target ({generator}, "
        f"c={THROUGHPUT_CONCURRENCY}); latency {settings.latency_requests} requests at c=1; "
        f"TTFT {settings.ttft_c1_streams} streams at c=1 and {settings.ttft_c8_streams} at c=8 "
        f"({MOCK_CHUNKS} chunks); all in {settings.rounds} rounds; {settings.held_streams} "
        f"streams held at once ({HELD_CHUNKS} chunks, {HELD_CHUNK_DELAY_S * 1000:g} ms apart)",
        f"CPUs: {cpus.describe()} of {os.cpu_count()}; load average {load[0]:.2f} before, "
        f"{load[1]:.2f} after",
        f"other work on the gateways' CPU, by phase: {others or '-'} "
        "(anything above a few % makes the gateway figures noisy)",
    ]


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--duration", type=float, default=15.0, help="throughput seconds per target (all rounds)"
    )
    parser.add_argument("--quick", action="store_true", help="a short run (a smoke test)")
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    parser.add_argument("--server", choices=(*SERVERS, "both"), default="both")
    parser.add_argument("--features", choices=(*FEATURES, "both"), default="both")
    parser.add_argument("--streams", type=int, help="streams held at once (default 1000)")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/floor.py: the server and client library with no gateway logic",
    )
    parser.add_argument(
        "--no-wrk", action="store_true", help="drive throughput with aiohttp even with wrk"
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    return Settings(
        duration=2.0 if quick else float(args.duration),
        warmup=0.5 if quick else 1.0,
        latency_requests=200 if quick else 1000,
        ttft_c1_streams=50 if quick else 300,
        ttft_c8_streams=80 if quick else 400,
        held_streams=args.streams or (200 if quick else 1000),
        rounds=2 if quick else 5,
        servers=SERVERS if args.server == "both" else (args.server,),
        features=FEATURES if args.features == "both" else (args.features,),
        wrk=shutil.which("wrk") is not None and not args.no_wrk,
        json=bool(args.json),
        floor=bool(args.floor),
    )


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    cpus = CpuPlan.for_this_machine()
    if cpus.driver is not None:
        os.sched_setaffinity(0, cpus.driver)
    # Each held stream is a socket in the driver, the gateway and the mock (two there).
    files, _ = raise_open_files_limit(4 * settings.held_streams + 1024)
    broken: list[str] = []
    if files < 2 * settings.held_streams + 256:
        broken.append(f"open-files limit {files} is too low for {settings.held_streams} streams")
    load_before, started = os.getloadavg()[0], time.monotonic()
    with contextlib.ExitStack() as stack:
        running, skipped = start_servers(stack, settings, cpus)
        foreign = ForeignCpu(cpus.gateway, [each.server for each in running[1:]])
        run_loop(measure(settings, running, broken, foreign))
        for each in running:
            if any(problem.startswith(each.name) for problem in broken):
                print(f"{each.name} log ends with:\n{each.server.output_tail()}", file=sys.stderr)
    direct = running[0].figures
    gateways = {each.name: each.figures for each in running[1:] if each.up}
    skipped.update({each.name: "did not come up (below)" for each in running if not each.up})
    held = settings.held_streams
    comparison = report.all_vs_bare(direct, gateways, held)
    load = (load_before, os.getloadavg()[0])
    lines = header(settings, cpus, load, foreign.shares())
    lines += ["", *report.table(direct, gateways, held)]
    lines += [f"{name:<40} skipped: {why}" for name, why in skipped.items()]
    lines += ["", *report.all_vs_bare_table(comparison, held)] if comparison else []
    named = [("direct", direct), *gateways.items()]
    notes = [f"{name}: {note}" for name, figures in named for note in figures.notes]
    shared = cpus.mock is not None and cpus.mock == cpus.driver
    driver, mock = direct.driver_cpu_share, direct.server_cpu_share
    if driver > 0.9 or (shared and driver + mock > 0.9):  # False when NaN (wrk)
        beside = f", beside the mock's {mock:.0%} on the same CPU" if shared else ""
        notes.append(
            f"this driver used {driver:.0%} of a CPU in the direct throughput phase{beside}: "
            "the direct req/s is bounded by the driver, not the mock (wrk is lighter)"
        )
    lines += ["", *(f"note: {note}" for note in notes)] if notes else []
    lines += ["", *(f"BROKEN: {problem}" for problem in broken)] if broken else []
    lines.append(f"\n{time.monotonic() - started:.0f} s in all")
    print("\n".join(lines))
    if settings.json:
        document = {
            "settings": asdict(settings),
            "cpus": cpus.describe(),
            "load_average": list(load),
            "foreign_cpu_share": foreign.shares(),
            "direct": asdict(direct),
            "gateways": {name: asdict(figures) for name, figures in gateways.items()},
            "targets": report.document(direct, gateways, held),
            "all_vs_bare": comparison,
            "skipped": skipped,
            "broken": broken,
            "seconds": time.monotonic() - started,
        }
        print(msgspec.json.encode(_finite(document)).decode())
    return 1 if broken else 0


def _finite(value: object) -> object:
    """NaN (a figure not measured) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(each) for key, each in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(each) for each in value]
    return value


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers were stopped on the way out
        sys.exit(130)
