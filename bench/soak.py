"""`make soak`: minutes of mixed traffic through the real gateway into upstreams that fail in
every way `resillm mock-upstream` knows, then proof that nothing leaked (issue 15).

    .venv/bin/python bench/soak.py --seconds 300 [--concurrency 24] [--json FILE] [--logs DIR]

Runs, all on loopback: two `resillm mock-upstream` processes (`faults`, which fails per
request as each target's model name or provider headers say, and `flaky`, which fails 30%
of requests at random), and `resillm serve` (hypercorn) with the config of `soak_setup.py`:
fifteen aliases over every fault mode, retries, fallbacks, circuit breakers, every load
balancing strategy but cost, stream recovery, a memory budget with one price for every
alias, the memory cache, metrics, the JSON access log (its stderr is kept) and short
timeouts, so that hangs and stalls end within seconds.

The traffic (`soak_traffic.py`): `--concurrency` workers, each sending requests back to
back — streams and not, raw aiohttp and the official `openai` SDK, some with tools or
`max_tokens` or `include_usage`, some asking what others asked (cache hits, coalescing), a
few the gateway must refuse (400, 401, 403, 404) — and, on the `loose` key only, clients
that hang up mid-stream or time out early; meanwhile `POST /admin/reload` every 5 s.

Afterwards, once every process is quiet (`soak_checks.py`): every client-visible outcome
is a success with the right answer or a clean OpenAI-shaped error; the gateway's log has no
unhandled error, traceback or 500, and it exits 0 on SIGTERM; each mock has no request
active and `requests == completed + disconnected + aborted`; the gateway's upstream pool
has no connection in use (`resillm_upstream_connections`), its in-flight gauge is 0 and
no target has a request in flight; the access log has a line per request; every fault
target was called; the budget is exact: the `metered` key's spend equals, to the
nano-dollar, the usage the mocks reported for its models at the configured price, and the
`loose` key's — where the gateway bills its documented estimate for answers cut before
their usage — equals the costs its access log lines show, the global windows the sum of
both; and the gateway's RSS grows less than `--max-rss-mb` MiB per 10k requests after the
warm-up; every reload was applied. Exit status 1 when any check fails.

Why two keys rather than one exact sum: a call cut before it reported usage is billed at
four characters a token of what the *gateway* received, which no upstream counter can
reproduce (a client hanging up races the bytes in flight). Keeping those faults and those
clients on their own aliases leaves the exact equality provable on everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from processes import Server, free_port, wait_healthy
from soak_checks import Observed, checks, parse_metrics, report, save_logs
from soak_setup import ADMIN_KEY, KEYS, gateway_config, mock_args, write_config
from soak_traffic import Clients, Driver, Traffic

QUIET_TIMEOUT_S = 30.0
RSS_EVERY_S = 1.0
RELOAD_EVERY_S = 5.0


def vm_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


async def get_json(http: aiohttp.ClientSession, url: str, secret: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    async with http.get(url, headers=headers) as response:
        response.raise_for_status()
        return await response.json()


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[Any, float]:
    async with http.get(url + "/metrics") as response:
        return parse_metrics(await response.text())


async def sample_rss(pid: int, traffic: Traffic, observed: Observed, started: float) -> None:
    while True:
        observed.rss_kb.append((time.monotonic() - started, traffic.done, vm_rss_kb(pid)))
        await asyncio.sleep(RSS_EVERY_S)


async def reload_now_and_then(
    http: aiohttp.ClientSession, gateway: str, observed: Observed
) -> None:
    """`POST /admin/reload` of the unchanged file: a new runtime under load, every few
    seconds; the requests in flight finish on the old one."""
    while True:
        await asyncio.sleep(RELOAD_EVERY_S)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.post(gateway + "/admin/reload", headers=headers) as response:
            body = await response.json()
        observed.reloads[f"{response.status} applied={body.get('applied')}"] += 1


async def quiesce(http: aiohttp.ClientSession, gateway: str, mocks: list[str]) -> float:
    """Seconds until nothing is in flight anywhere (or the timeout: the checks then say)."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_TIMEOUT_S:
        samples = await scrape(http, gateway)
        busy = samples.get(("resillm_inflight_requests", frozenset()), 0.0) + samples.get(
            ("resillm_upstream_connections", frozenset({("state", "active")})), 0.0
        )
        for mock in mocks:
            busy += (await get_json(http, mock + "/_mock/stats"))["active"]
        if not busy:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def run(args: argparse.Namespace, workdir: Path) -> tuple[Observed, Traffic]:
    taken: set[int] = set()
    ports = {name: free_port(taken) for name in ("faults", "flaky", "gateway")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    observed, traffic = Observed(), Traffic()
    observed.warmup_s = max(5.0, min(30.0, args.seconds * 0.2))
    config = gateway_config(
        port=ports["gateway"], faults_url=urls["faults"], flaky_url=urls["flaky"], workdir=workdir
    )
    write_config(workdir / "soak.yaml", config)
    with contextlib.ExitStack() as stack:
        mocks = {
            name: stack.enter_context(
                Server(f"mock {name}", mock_args(ports[name], flaky=name == "flaky"))
            )
            for name in ("faults", "flaky")
        }
        serve = ["-m", "resillm.cli", "serve", "-c", str(workdir / "soak.yaml")]
        gateway = stack.enter_context(Server("gateway", serve))
        gw = urls["gateway"]
        async with aiohttp.ClientSession() as http:
            for name, server in [*mocks.items(), ("gateway", gateway)]:
                await wait_healthy(http, server, urls[name])
            observed.budget_start = await get_json(http, gw + "/v1/budget", KEYS["metered"])
            clients = Clients(gw, args.concurrency)
            started = time.monotonic()
            pid = gateway.process.pid
            sampler = asyncio.create_task(sample_rss(pid, traffic, observed, started))
            reloader = asyncio.create_task(reload_now_and_then(http, gw, observed))
            try:
                await Driver(clients, traffic, args.seed).run(args.concurrency, args.seconds)
            finally:
                sampler.cancel()
                reloader.cancel()
                await clients.aclose()
            observed.seconds = time.monotonic() - started
            observed.quiet_after_s = await quiesce(http, gw, [urls["faults"], urls["flaky"]])
            observed.rss_kb.append((time.monotonic() - started, traffic.done, vm_rss_kb(pid)))
            observed.metrics = await scrape(http, gw)
            targets = await get_json(http, gw + "/admin/targets", ADMIN_KEY)
            observed.targets = targets["targets"]
            for key, secret in KEYS.items():
                observed.budget_end[key] = await get_json(http, gw + "/v1/budget", secret)
            for name in mocks:
                observed.mock_stats[name] = await get_json(http, urls[name] + "/_mock/stats")
        gateway.stop()  # SIGTERM: a graceful exit, and the whole log written
        observed.gateway_exit = gateway.process.returncode
        observed.gateway_log = gateway.output()
        for name, server in mocks.items():
            server.stop()
            observed.mock_logs[name] = server.output()
    return observed, traffic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("SOAK_SECONDS") or 300),
        help="seconds of traffic (default $SOAK_SECONDS or 300)",
    )
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-rss-mb", type=float, default=10.0, help="per 10k requests")
    parser.add_argument("--json", type=Path, help="write the checks and figures here")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resillm-soak-") as tmp:
        observed, traffic = asyncio.run(run(args, Path(tmp)))
    if args.logs is not None:
        save_logs(observed, args.logs)
    found = checks(observed, traffic, args.max_rss_mb)
    print(report(observed, traffic, found), flush=True)
    if args.json is not None:
        figures = {
            "seconds": observed.seconds,
            "requests": traffic.done,
            "outcomes": {str(o): n for o, n in traffic.outcomes.items()},
            "rss_kb": observed.rss_kb,
            "mock_stats": observed.mock_stats,
        }
        checked = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in found]
        args.json.write_bytes(msgspec.json.encode({"checks": checked, "figures": figures}))
    return 0 if all(check.passed for check in found) else 1


if __name__ == "__main__":
    sys.exit(main())
