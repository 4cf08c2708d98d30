"""The gateway ASGI app: lifespan, the running runtime, and reloads.

``Gateway`` is what ``create_app`` returns. It owns what outlives a config (the HTTP
session, metrics, circuits, latency figures, budget spend, cached answers, the tracer) and
the running :class:`~resillm.runtime.Runtime`. A reload validates the whole new file,
builds a new runtime and swaps it in with one assignment: requests in flight finish on the
runtime they started with, new requests see the new config at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from providers.http import create_session, pool_connections
from resillm.asgi import Receive, Scope, Send, route_path
from resillm.balance import StatsRegistry
from resillm.budget import BudgetTracker
from resillm.cache import ResponseCache
from resillm.circuit import CircuitRegistry
from resillm.config import Config
from resillm.config_diff import ReloadReport, diff_configs
from resillm.config_loader import (
    ConfigError,
    config_from_dict,
    default_config_path,
    load_config,
)
from resillm.gc_freeze import HeapFreezer
from resillm.metrics import Metrics
from resillm.runtime import GatewayState, Runtime

if TYPE_CHECKING:  # optional extras, imported only when they are on
    from opentelemetry.sdk.trace.export import SpanExporter

    from middleware.tracing import Tracing
    from resillm.reload import ConfigWatcher

logger = logging.getLogger("resillm")


class Gateway:
    """The ASGI app. Starts on ``lifespan.startup``, through ``gateway.lifespan`` for hosts
    that do not forward lifespan to mounts, or lazily on its first request.

    With a config file, ``watch`` (default on) reloads it whenever its content changes.
    """

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        *,
        watch: bool = True,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.watch = watch and config_path is not None
        # Tracing (tracing.enabled): the gateway's own tracer provider, built at start and
        # flushed at stop. ``span_exporter`` replaces the configured exporter (tests).
        self.tracing: Tracing | None = None
        self.span_exporter = span_exporter
        self.runtime: Runtime | None = None
        # Set by `resillm serve`: the process is the gateway's (see resillm.gc_freeze).
        self.freezer: HeapFreezer | None = None
        self.state: GatewayState | None = None
        self.metrics = Metrics()
        self.circuits = CircuitRegistry(
            config.resilience.circuit_breaker, listener=self.metrics.circuit_changed
        )
        self.stats = StatsRegistry()  # latency and load per target, for the balancer
        self.budget = BudgetTracker(config, metrics=self.metrics)
        self.cache = ResponseCache(config.cache)
        self.metrics.on_render(self._count_connections)
        self._watcher: ConfigWatcher | None = None
        self._start_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan_protocol(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        runtime = self.runtime or await self.start()
        if route_path(scope).startswith("/v1/"):
            await runtime.v1(scope, receive, send)
        else:
            await runtime.ops(scope, receive, send)

    def asgi(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The same app, handing each request straight to the runtime's stack: no frame of
        its own for as long as the request lasts (a stream held for minutes). Not a
        coroutine function, so a server must be told it is ASGI 3: ``resillm serve`` does;
        an app mounting the gateway calls the gateway itself."""
        runtime = self.runtime
        if runtime is None or scope["type"] != "http":
            return self(scope, receive, send)  # lifespan, the first request, websockets
        if route_path(scope).startswith("/v1/"):
            return runtime.v1(scope, receive, send)
        return runtime.ops(scope, receive, send)

    async def start(self) -> Runtime:
        async with self._start_lock:
            if self.runtime is None:
                session = create_session()
                await self.budget.start(session)
                await self.cache.start()
                if self.config.tracing.enabled:
                    from middleware.tracing import Tracing

                    self.tracing = Tracing(self.config.tracing, self.span_exporter)
                self.state = GatewayState(
                    session=session,
                    metrics=self.metrics,
                    circuits=self.circuits,
                    stats=self.stats,
                    budget=self.budget,
                    cache=self.cache,
                    tracing=self.tracing,
                    reload=self.reload,
                )
                self.runtime = Runtime(self.config, self.state)
                if self.watch and self.config_path is not None:
                    from resillm.reload import ConfigWatcher

                    self._watcher = ConfigWatcher(self.config_path, self.reload)
                    self._watcher.start()
                if not self.config.auth.keys:
                    logger.warning(
                        "no auth.keys configured: the /v1 routes are open to anyone who can "
                        "reach this address"
                    )
                if self.freezer is not None:
                    self.freezer.freeze()
            return self.runtime

    async def reload(self) -> ReloadReport:
        """Re-read the config file and swap it in; an invalid file changes nothing.

        ``server.*`` and ``tracing.*`` changes are reported as needing a restart and not
        applied; everything else applies to new requests at once.
        """
        async with self._reload_lock:
            report = await self._reload()
        level = logging.INFO if report.applied else logging.ERROR
        fields = {"config": self.config_path, **_report_fields(report)}
        logger.log(level, "config reload", extra={"fields": fields})
        return report

    async def _reload(self) -> ReloadReport:
        if self.config_path is None:
            return ReloadReport(applied=False, errors=["this gateway was not built from a file"])
        if self._watcher is not None:
            self._watcher.seen()  # this content is being handled now
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.metrics.config_reloads.inc({"result": "error"})
            return ReloadReport(applied=False, errors=[str(issue) for issue in exc.issues])
        changes = diff_configs(self.config, new)
        # What needs a restart keeps running as it started.
        applied = msgspec.structs.replace(
            new, server=self.config.server, tracing=self.config.tracing
        )
        self.config = applied
        self.budget.configure(applied)
        await self.cache.configure(applied.cache)
        if self.runtime is not None and self.state is not None:
            self.runtime = Runtime(applied, self.state, previous=self.runtime)
            if self.freezer is not None:
                self.freezer.reloaded()
        self.metrics.config_reloads.inc({"result": "success"})
        return ReloadReport(applied=True, restart_needed=changes.restart_needed, changes=changes)

    async def stop(self) -> None:
        if self.freezer is not None:
            self.freezer.stop()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await watcher.stop()
        runtime, state = self.runtime, self.state
        self.runtime, self.state = None, None
        if runtime is not None:
            await runtime.aclose()
        await self.budget.stop()  # the last snapshot; alerts in flight still use the session
        await self.cache.stop()
        if state is not None:
            await state.session.close()
        tracing, self.tracing = self.tracing, None
        if tracing is not None:
            await tracing.shutdown()  # exports the spans still buffered

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """For hosts: ``Starlette(..., lifespan=gateway.lifespan)``."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _lifespan_protocol(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self.state.session if self.state is not None else None

    def _count_connections(self) -> None:
        """``resillm_upstream_connections``, counted at scrape time only."""
        session = self.session
        active, idle = pool_connections(session) if session is not None else (0, 0)
        self.metrics.upstream_connections.set({"state": "active"}, active)
        self.metrics.upstream_connections.set({"state": "idle"}, idle)


def _report_fields(report: ReloadReport) -> dict[str, Any]:
    fields: dict[str, Any] = msgspec.to_builtins(report)
    changes = fields.pop("changes", None) or {}
    fields.update({key: value for key, value in changes.items() if value})
    return fields


def create_app(
    config: str | os.PathLike[str] | dict[str, Any] | Config | None = None,
    *,
    watch: bool = True,
) -> Gateway:
    if isinstance(config, Config):
        return Gateway(config)
    if isinstance(config, dict):
        return Gateway(config_from_dict(config))
    path = os.fspath(config) if config is not None else default_config_path()
    return Gateway(load_config(path), path, watch=watch)
