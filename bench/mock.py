"""The mock upstream as the bench runs it: `resillm mock-upstream`'s app, deeper accept queue.

aiohttp listens with a backlog of 128 by default. When 1000 streams connect at once, the
kernel then drops SYNs and clients retry after 1 s, 3 s..., which would put seconds of
retransmission into the direct figures of the held-streams phase (and into the gateway's
own connections to the mock). Same app, same answers, same options; only the backlog
differs. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from resillm.mock_upstream import MockUpstreamOptions
from resillm.mock_upstream.server import build_mock_app

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


async def serve(host: str, port: int, options: MockUpstreamOptions) -> None:
    runner = web.AppRunner(
        build_mock_app(options), handler_cancellation=True, access_log=None, shutdown_timeout=5.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
        print(f"bench mock upstream listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    args = parser.parse_args(argv)
    options = MockUpstreamOptions(chunks=args.chunks)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, options))
    else:
        uvloop.run(serve(args.host, args.port, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
