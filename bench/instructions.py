"""Instructions per request under callgrind: bare vs every layer on, free of machine noise.

CPU time per request moves 10-15% from one round to the next on a shared machine; the
number of instructions the gateway executes for a request does not (two runs agree to
about 0.5%). This runs each feature set's gateway (`resillm serve`, hypercorn or uvicorn)
under `valgrind --tool=callgrind` with instrumentation off, warms it up, switches
counting on (`callgrind_control -i on`) for a fixed number of non-stream requests at
concurrency 32, dumps, and reports instructions per request and all over bare.

Instructions are not time: a layer's cache misses (its code and data evicting the
server's) come on top, so the CPU ratio `make bench` measures runs higher than this one.
It is the figure to compare a change against. About 30 s per feature set; only loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from loadgen import body
from processes import REPO, Server, free_port, gateway_config, wait_healthy

CONCURRENCY = 32
STARTUP_TIMEOUT_S = 120.0  # python under valgrind starts some 30 times slower


async def drive(url: str, count: int) -> None:
    """`count` distinct non-stream requests, `CONCURRENCY` at a time; each must succeed."""
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        serials = iter(range(count))

        async def worker() -> None:
            for _ in serials:
                request = body("bench")
                headers = {"content-type": "application/json"}
                async with session.post(url, data=request, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: status {response.status}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)}: {done.stderr or done.stdout}")


def instructions(workdir: Path, name: str) -> int:
    """The instruction count of the last dump callgrind wrote in `workdir`."""
    dumps = [p for p in workdir.glob("callgrind.out.*") if p.suffix[1:].isdigit()]
    if not dumps:
        raise RuntimeError(f"{name}: callgrind wrote no dump")
    text = max(dumps, key=lambda p: p.stat().st_mtime).read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{name}: no totals in the callgrind dump")
    return int(found.group(1))


async def count(features: str, server: str, upstream: int, args: argparse.Namespace) -> int:
    """Instructions the gateway executed for `args.requests` requests, once warm."""
    workdir = Path(tempfile.mkdtemp(prefix="resillm-ir-"))
    port = free_port({upstream})
    config = workdir / "gateway.yaml"
    config.write_text(gateway_config(port, upstream, features=features, workdir=workdir,
                                     name=features))  # fmt: skip
    out = workdir / "callgrind.out"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "resillm.cli", "serve", "-c", str(config), "--server", server,
    ]  # fmt: skip
    with Server(f"{server}/{features}", command, interpreter=False) as gateway:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, gateway, base, timeout_s=STARTUP_TIMEOUT_S)
        url = base + "/v1/chat/completions"
        await drive(url, args.warmup)
        pid = str(gateway.process.pid)
        control("-i", "on", pid)
        await drive(url, args.requests)
        control("-d", pid)
        control("-i", "off", pid)
    total = instructions(workdir, f"{server}/{features}")
    shutil.rmtree(workdir, ignore_errors=True)
    return total


async def run(args: argparse.Namespace) -> list[str]:
    upstream = free_port(set())
    mock = [str(REPO / "bench" / "mock.py"), "--port", str(upstream), "--chunks", "32"]
    lines = [
        f"instructions per request under callgrind: {args.requests} non-stream requests at "
        f"concurrency {CONCURRENCY}, after {args.warmup} to warm up",
        "",
        f"{'server':<10} {'features':<9} {'per request':>12} {'vs bare':>8}",
    ]
    with Server("mock", mock):
        await asyncio.sleep(1.0)  # the mock starts in well under a second
        for server in args.servers:
            per_request: dict[str, float] = {}
            for features in args.features:
                started = time.monotonic()
                total = await count(features, server, upstream, args)
                per_request[features] = total / args.requests
                print(f"{server}/{features}: {time.monotonic() - started:.0f} s",
                      file=sys.stderr)  # fmt: skip
            bare = per_request.get("bare")
            for features, value in per_request.items():
                ratio = f"{value / bare:.3f}x" if bare else "-"
                lines.append(f"{server:<10} {features:<9} {value:>12,.0f} {ratio:>8}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="requests counted")
    parser.add_argument("--warmup", type=int, default=1500, help="requests before counting")
    parser.add_argument("--server", choices=("hypercorn", "uvicorn", "both"), default="hypercorn")
    parser.add_argument("--features", choices=("bare", "all", "both"), default="both")
    args = parser.parse_args(argv)
    args.servers = ("hypercorn", "uvicorn") if args.server == "both" else (args.server,)
    args.features = ("bare", "all") if args.features == "both" else (args.features,)
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        print(f"{' and '.join(missing)} not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        print("\n".join(asyncio.run(run(args))))
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
