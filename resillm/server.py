"""Run the gateway as a server: hypercorn (default) or uvicorn, one process or several.

One worker runs in this process on uvloop when it is installed; SIGTERM and SIGINT stop
accepting and let in-flight requests and streams finish (up to
``server.graceful_timeout``), SIGHUP reloads the config. Several workers are processes
sharing one socket (:mod:`resillm.workers`), each building its gateway from
``$RESILLM_CONFIG``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from resillm.app import Gateway
from resillm.asgi import ASGIApp
from resillm.config import Config
from resillm.config_loader import ConfigError, load_config
from resillm.gc_freeze import HeapFreezer
from resillm.hypercorn_fix import release_closed_connections
from resillm.hypercorn_head import coalesce_response_heads
from resillm.hypercorn_lean import lighten_hypercorn
from resillm.log import configure_logging

logger = logging.getLogger("resillm.server")
LISTEN_BACKLOG = 2048


@dataclass(frozen=True)
class ServeOptions:
    config_path: str
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    server: str = "hypercorn"


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``asyncio.run`` on uvloop when it is installed."""
    if has_uvloop():
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def bind_listener(host: str, port: int) -> tuple[str, int]:
    """Bind here, not in hypercorn, so port 0 works and the real port can be printed.

    Returns hypercorn's ``fd://N`` bind (hypercorn takes the descriptor over) and the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    bound_port = int(sock.getsockname()[1])
    return f"fd://{sock.detach()}", bound_port


def hypercorn_config(config: Config, bind: list[str]) -> Any:
    from hypercorn.config import Config as HypercornConfig

    release_closed_connections(config.server.send_timeout)
    lighten_hypercorn()
    coalesce_response_heads()
    hyper = HypercornConfig()
    hyper.bind = bind
    hyper.graceful_timeout = config.server.graceful_timeout
    hyper.accesslog = None  # resillm writes its own structured access log
    hyper.errorlog = logging.getLogger("resillm.hypercorn")
    hyper.keep_alive_timeout = config.server.keep_alive_timeout  # > nginx's keepalive (60s)
    hyper.keep_alive_max_requests = 100_000
    # hypercorn re-listens on the socket with its own backlog (100 by default): a burst of
    # a thousand clients would overflow it and wait out SYN retries.
    hyper.backlog = LISTEN_BACKLOG
    hyper.include_server_header = False
    hyper.h11_max_incomplete_size = config.server.max_header_bytes
    hyper.read_timeout = config.server.read_timeout  # type: ignore[assignment]  # float works
    return hyper


def serve(options: ServeOptions) -> int:
    try:
        config = load_config(options.config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    configure_logging(config.logging)
    host = options.host or config.server.host
    port = config.server.port if options.port is None else options.port
    workers = options.workers or config.server.workers
    from resillm.workers import workers_fit

    if not workers_fit(config, workers):  # e.g. a memory budget store under several workers
        return 1
    if options.server == "uvicorn":
        return _serve_uvicorn(options.config_path, config, host, port, workers)
    bind, bound_port = bind_listener(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    plural = f" with {workers} workers" if workers > 1 else ""
    print(f"resillm serving on http://{shown_host}:{bound_port}{plural}", file=sys.stderr)
    sys.stderr.flush()
    hyper = hypercorn_config(config, [bind])
    if workers > 1:
        return _serve_hypercorn_workers(options.config_path, hyper, workers)
    gateway = served_gateway(config, options.config_path)
    run_loop(lambda: _serve_one(gateway, hyper))
    return 0


async def _serve_one(gateway: Gateway, hyper: Any) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve

    from resillm.workers import quiet_cancelled_connections

    loop = asyncio.get_running_loop()
    quiet_cancelled_connections(loop)  # streams cut when graceful_timeout runs out
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gateway.reload()))
    await hypercorn_serve(gateway.asgi, hyper, shutdown_trigger=stopping.wait, mode="asgi")  # type: ignore[arg-type]


def _serve_hypercorn_workers(path: str, hyper: Any, workers: int) -> int:
    # Not hypercorn.run: see resillm.workers for why (streams cut at shutdown, SIGHUP).
    from resillm.workers import Supervisor

    os.environ["RESILLM_CONFIG"] = os.path.abspath(path)
    share_admin_sessions()
    hyper.workers = workers
    return Supervisor(hyper, workers, hyper.graceful_timeout).run()


def _serve_uvicorn(path: str, config: Config, host: str, port: int, workers: int) -> int:
    try:
        import uvicorn
    except ImportError:
        print("uvicorn is not installed: pip install 'resillm[uvicorn]'", file=sys.stderr)
        return 1
    os.environ["RESILLM_CONFIG"] = os.path.abspath(path)
    share_admin_sessions()
    uvicorn.run(
        "resillm.server:worker_asgi",
        factory=True,
        interface="asgi3",
        host=host,
        port=port,
        workers=workers,
        loop="uvloop" if has_uvloop() else "asyncio",
        **uvicorn_options(config),
    )
    return 0


def uvicorn_options(config: Config) -> dict[str, Any]:
    """The ``server`` section in uvicorn's terms. uvicorn has no header deadline (its
    keep-alive timer runs only between requests) and, with httptools, no header size
    limit: ``max_header_bytes`` holds only for its h11 parser. ``body_timeout`` and
    ``send_timeout`` are the gateway's own and hold under both servers."""
    server = config.server
    return {
        "access_log": False,  # resillm writes its own structured access log
        "timeout_graceful_shutdown": int(server.graceful_timeout),
        "timeout_keep_alive": server.keep_alive_timeout,  # typed int; a float works
        "h11_max_incomplete_event_size": server.max_header_bytes,
    }


def share_admin_sessions() -> None:
    """Workers sign admin sessions with one secret, so a login holds whichever worker
    answers (each would otherwise make its own and refuse the others' cookies)."""
    from resillm.admin.state import SESSION_SECRET_ENV

    os.environ.setdefault(SESSION_SECRET_ENV, secrets.token_urlsafe(32))


def worker_asgi() -> ASGIApp:
    """uvicorn's app factory: the gateway's frameless entry (see ``Gateway.asgi``)."""
    return worker_app().asgi


def worker_app() -> Gateway:
    """The app factory a worker process calls (hypercorn ``--workers``, uvicorn)."""
    path = os.environ["RESILLM_CONFIG"]
    config = load_config(path)
    configure_logging(config.logging)
    return served_gateway(config, path)


def served_gateway(config: Config, path: str) -> Gateway:
    """The gateway of a process that is the gateway's alone (`resillm serve`, a worker)."""
    gateway = Gateway(config, path)
    gateway.freezer = HeapFreezer()  # its collector is ours to tune (resillm.gc_freeze)
    return gateway
