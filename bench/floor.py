"""The floor: what the HTTP server and the HTTP client alone cost, with no gateway logic.

A raw ASGI app that forwards ``POST /v1/chat/completions`` to the mock with one shared
aiohttp session and sends the answer back as it comes (a stream chunk by chunk), served by
the same server with the same settings as ``resillm serve`` (hypercorn on uvloop, or
uvicorn with httptools). No parsing, no routing, no retries, no metrics: the bench runs it
beside the gateway (``--floor``) so that each figure can be read as floor + gateway logic.
Requests for the model ``bench-slow`` get the held-streams pacing headers, as the gateway's
``slow`` provider sends them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import aiohttp

from resillm.hypercorn_fix import release_closed_connections  # imports nothing of resillm

LISTEN_BACKLOG = 2048  # as resillm.server's (not imported: the floor's memory is its own)
MAX_CONNECTIONS = 2000
Scope = dict[str, Any]
Message = dict[str, Any]


class Floor:
    def __init__(self, upstream: str, slow_headers: dict[str, str]) -> None:
        self.upstream = upstream
        self.slow_headers = slow_headers
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["path"] == "/health":
            await answer(send, 200, b'{"status":"ok"}')
        else:
            await self.proxy(receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def proxy(self, receive: Any, send: Any) -> None:
        assert self.session is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {"content-type": "application/json"}
        if b'"bench-slow"' in body:
            headers.update(self.slow_headers)
        async with self.session.post(self.upstream, data=body, headers=headers) as response:
            content_type = response.headers.get("content-type", "application/json").encode()
            if not content_type.startswith(b"text/event-stream"):
                await answer(send, response.status, await response.read(), content_type)
                return
            start = {"type": "http.response.start", "status": response.status}
            await send({**start, "headers": [(b"content-type", content_type)]})
            async for data in response.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


async def answer(send: Any, status: int, body: bytes, kind: bytes = b"application/json") -> None:
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_hypercorn(app: Floor, port: int) -> None:
    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    release_closed_connections()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.backlog = LISTEN_BACKLOG
    config.keep_alive_timeout = 75.0
    config.include_server_header = False

    async def main() -> None:
        await serve(app, config)  # type: ignore[arg-type]

    uvloop.run(main())


def serve_uvicorn(app: Floor, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        backlog=LISTEN_BACKLOG,
        access_log=False,
        log_level="warning",
        server_header=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", choices=("hypercorn", "uvicorn"), default="hypercorn")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the mock's chat completions URL")
    parser.add_argument("--slow-header", action="append", default=[], help="NAME:VALUE")
    args = parser.parse_args(argv)
    slow = dict(header.split(":", 1) for header in args.slow_header)
    app = Floor(args.upstream, slow)
    if args.server == "hypercorn":
        serve_hypercorn(app, args.port)
    else:
        serve_uvicorn(app, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
