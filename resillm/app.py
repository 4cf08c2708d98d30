"""The composition root: the gateway ASGI app, its middleware order, lifespan and routes.

``Gateway`` is what ``create_app`` returns. It owns the process's HTTP session and the
running ``Runtime`` (one config made runnable); a reload builds a new ``Runtime`` and swaps
it in one assignment, so requests in flight finish on the one they started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from middleware.access_log import AccessLogMiddleware
from middleware.auth import AuthMiddleware
from middleware.budget import BudgetMiddleware
from middleware.cache import CacheMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.metrics import MetricsMiddleware
from middleware.request import CHAT_COMPLETIONS, RequestMiddleware
from providers.base import Provider
from providers.http import create_session
from providers.registry import build_provider
from resillm.admin.api import AdminAPI
from resillm.asgi import ASGIApp, Receive, Scope, Send, route_path, send_json
from resillm.balance import StatsRegistry
from resillm.budget import BudgetTracker
from resillm.cache import ResponseCache
from resillm.circuit import CircuitRegistry
from resillm.config import Config
from resillm.config_loader import (
    ConfigError,
    config_from_dict,
    default_config_path,
    load_config,
)
from resillm.context import RequestContext
from resillm.errors import MethodNotAllowed, NotFound
from resillm.metrics import Metrics
from resillm.pricing import PriceBook, cost_nano_usd, to_usd
from resillm.router import Router
from resillm.schema import ModelCard, ModelList, json_encoder
from resillm.targets import Route, Target, build_routes

if TYPE_CHECKING:  # tracing is an optional extra, imported only when it is on
    from opentelemetry.sdk.trace.export import SpanExporter

    from middleware.tracing import Tracing

logger = logging.getLogger("resillm")
MIN_SECRET_CHARS = 8  # shorter "keys" would mangle plain words in logged bodies
_HEALTH_BODY = b'{"status":"ok"}'


class TargetStatus(msgspec.Struct):
    provider: str
    model: str
    available: bool


class AliasStatus(msgspec.Struct):
    ready: bool
    targets: list[TargetStatus]


class ReadyStatus(msgspec.Struct):
    status: str
    models: dict[str, AliasStatus]


class Runtime:
    """One config made runnable: providers bound to targets, and the composed ASGI stacks."""

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        circuits: CircuitRegistry,
        metrics: Metrics,
        stats: StatsRegistry | None = None,
        budget: BudgetTracker | None = None,
        tracing: Tracing | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.cache = cache  # the gateway's; its layer is in the stack only when enabled
        self.circuits = circuits
        self.metrics = metrics
        self.stats = stats or StatsRegistry()
        self.budget = budget or BudgetTracker(config, metrics=metrics)
        self.prices = PriceBook(config.models)
        self.providers: dict[str, Provider] = {
            name: build_provider(name, provider, session)
            for name, provider in config.providers.items()
        }
        circuits.configure(config.resilience.circuit_breaker)
        self.routes = build_routes(config, self.providers, circuits, self.stats)
        self.router = Router(self.routes, config.resilience, cost_of=self.expected_cost)
        self.admin = AdminAPI(config.auth.admin_key, lambda: self.routes)
        self.tracing = tracing
        self.v1 = self.v1_stack()
        self.ops = ErrorsMiddleware(self.ops_endpoints)

    def expected_cost(
        self, target: Target, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        """For the cost strategy: what ``target`` would charge for these tokens."""
        price = self.prices.price(None, target.provider, target.model, None)
        if price is None:
            return None
        return to_usd(cost_nano_usd(price, prompt_tokens, completion_tokens))

    def v1_stack(self) -> ASGIApp:
        config, tracing = self.config, self.tracing
        traced = [partial(tracing.middleware, providers=config.providers)] if tracing else []
        layers: list[Callable[[ASGIApp], ASGIApp]] = [  # outermost first
            ErrorsMiddleware,
            *traced,  # the SERVER span, with tracing.enabled
            partial(AccessLogMiddleware, config=config.logging, secrets=config_secrets(config)),
            partial(MetricsMiddleware, metrics=self.metrics),
            partial(RequestMiddleware, max_request_bytes=config.server.max_request_bytes),
            partial(AuthMiddleware, keys=config.auth.keys, aliases=self.routes.keys()),
            partial(
                BudgetMiddleware,
                tracker=self.budget,
                prices=self.prices,
                default_max_tokens=config.budget.default_max_tokens,
            ),
            *self.cache_layer(),  # last: a hit has passed auth and the budget gate
        ]
        app: ASGIApp = self.v1_endpoints
        for layer in reversed(layers):
            app = layer(app)
        return app

    def cache_layer(self) -> list[Callable[[ASGIApp], ASGIApp]]:
        """The cache layer when ``cache.enabled``; none at all otherwise (zero cost)."""
        if self.cache is None or not self.config.cache.enabled:
            return []
        return [
            partial(
                CacheMiddleware, cache=self.cache, metrics=self.metrics, aliases=self.routes.keys()
            )
        ]

    async def v1_endpoints(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        method = scope["method"]
        if ctx.route == CHAT_COMPLETIONS:
            if method != "POST":
                raise MethodNotAllowed(f"{CHAT_COMPLETIONS} takes POST")
            await self.router(scope, receive, send)
        elif ctx.route in ("/v1/models", "/v1/models/"):
            if method != "GET":
                raise MethodNotAllowed("/v1/models takes GET")
            await send_json(send, 200, self.model_list(ctx))
        elif ctx.route in ("/v1/budget", "/v1/budget/"):
            if method != "GET":
                raise MethodNotAllowed("/v1/budget takes GET")
            status = await self.budget.status(ctx.client_key)
            await send_json(send, 200, json_encoder.encode(status))
        else:
            raise NotFound(f"no such endpoint: {method} {ctx.route}")

    def model_list(self, ctx: RequestContext) -> bytes:
        allowed = ctx.client_key.models if ctx.client_key is not None else None
        cards = [ModelCard(id=a) for a in self.routes if allowed is None or a in allowed]
        return json_encoder.encode(ModelList(data=cards))

    async def ops_endpoints(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path == "/health":
            await send_json(send, 200, _HEALTH_BODY)
        elif path == "/ready":
            status = self.readiness()
            code = 200 if status.status == "ready" else 503
            await send_json(send, code, json_encoder.encode(status))
        elif path == "/metrics":
            accept = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"accept"]
            content, headers = self.metrics.render(accept)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                }
            )
            await send({"type": "http.response.body", "body": content})
        elif path.startswith("/admin/"):
            await self.admin(scope, receive, send)
        else:
            raise NotFound(f"no such endpoint: {scope.get('method')} {path}")

    def readiness(self) -> ReadyStatus:
        models = {alias: _alias_status(route) for alias, route in self.routes.items()}
        ready = all(status.ready for status in models.values())
        return ReadyStatus(status="ready" if ready else "unavailable", models=models)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


def config_secrets(config: Config) -> frozenset[str]:
    """Every key in the config (client, admin, upstream): never written to a log."""
    found = [key.key for key in config.auth.keys]
    found.append(config.auth.admin_key or "")
    for provider in config.providers.values():
        for field in ("api_key", "secret_access_key", "session_token"):
            found.append(getattr(provider, field, None) or "")
    for model in config.models.values():
        found.extend(target.api_key or "" for target in model.targets)
    return frozenset(s for s in found if len(s) >= MIN_SECRET_CHARS)


def _alias_status(route: Route) -> AliasStatus:
    targets = [
        TargetStatus(
            provider=t.provider,
            model=t.model,
            # Not open (or due for a probe): half-open with its probe slots taken still counts.
            available=t.circuit.retry_in() == 0,
        )
        for t in route.targets
    ]
    return AliasStatus(ready=any(t.available for t in targets), targets=targets)


class Gateway:
    """The ASGI app. Starts on ``lifespan.startup``, through ``gateway.lifespan`` for hosts
    that do not forward lifespan to mounts, or lazily on its first request."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        *,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # Tracing (tracing.enabled): the gateway's own tracer provider, built at start and
        # flushed at stop. ``span_exporter`` replaces the configured exporter (tests).
        self.tracing: Tracing | None = None
        self.span_exporter = span_exporter
        self.runtime: Runtime | None = None
        self._session: aiohttp.ClientSession | None = None
        # Metrics and circuit state belong to the gateway, not to one config: they outlive
        # reloads.
        self.metrics = Metrics()
        self.circuits = CircuitRegistry(
            config.resilience.circuit_breaker, listener=self.metrics.circuit_changed
        )
        self.stats = StatsRegistry()  # latency and load per target, for the balancer
        self.budget = BudgetTracker(config, metrics=self.metrics)  # spend outlives reloads
        self.cache = ResponseCache(config.cache)  # stored answers outlive reloads too
        self._start_lock = asyncio.Lock()

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

    async def start(self) -> Runtime:
        async with self._start_lock:
            if self.runtime is None:
                self._session = create_session()
                await self.budget.start(self._session)
                await self.cache.start()
                if self.config.tracing.enabled:
                    from middleware.tracing import Tracing

                    self.tracing = Tracing(self.config.tracing, self.span_exporter)
                self.runtime = Runtime(
                    self.config,
                    self._session,
                    self.circuits,
                    self.metrics,
                    self.stats,
                    self.budget,
                    tracing=self.tracing,
                    cache=self.cache,
                )
                if not self.config.auth.keys:
                    logger.warning(
                        "no auth.keys configured: the /v1 routes are open to anyone who can "
                        "reach this address"
                    )
            return self.runtime

    async def reload(self) -> bool:
        """Re-read the config file and swap it in; an invalid file changes nothing.

        Requests in flight keep the runtime they started with. ``server.*`` needs a restart.
        """
        if self.config_path is None:
            return False
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            logger.error("config reload failed, the running config stays:\n%s", exc)
            self.metrics.config_reloads.inc({"result": "error"})
            return False
        if config.server != self.config.server:
            logger.warning("server.* changed in %s: restart to apply it", self.config_path)
        if config.tracing != self.config.tracing:
            logger.warning("tracing.* changed in %s: restart to apply it", self.config_path)
        self.config = config
        self.budget.configure(config)
        await self.cache.configure(config.cache)
        if self.runtime is not None and self._session is not None:
            self.runtime = Runtime(
                config,
                self._session,
                self.circuits,
                self.metrics,
                self.stats,
                self.budget,
                tracing=self.tracing,
                cache=self.cache,
            )
        self.metrics.config_reloads.inc({"result": "success"})
        logger.info("config reloaded from %s", self.config_path)
        return True

    async def stop(self) -> None:
        runtime, session = self.runtime, self._session
        self.runtime, self._session = None, None
        if runtime is not None:
            await runtime.aclose()
        await self.budget.stop()  # the last snapshot; alerts in flight still use the session
        await self.cache.stop()
        if session is not None:
            await session.close()
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


def create_app(config: str | os.PathLike[str] | dict[str, Any] | Config | None = None) -> Gateway:
    if isinstance(config, Config):
        return Gateway(config)
    if isinstance(config, dict):
        return Gateway(config_from_dict(config))
    path = os.fspath(config) if config is not None else default_config_path()
    return Gateway(load_config(path), path)
