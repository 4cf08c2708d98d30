"""One config made runnable: providers bound to targets, and the composed ASGI stacks.

A ``Runtime`` is immutable once built; a reload builds a new one and the gateway swaps it
in with one assignment, so requests in flight finish on the runtime they started with.
State that must outlive a reload (metrics, circuits, latency figures, budget spend, cached
answers, the HTTP session) belongs to the gateway and reaches a runtime as ``GatewayState``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
import msgspec

from middleware.access_log import AccessLogMiddleware
from middleware.auth import AuthMiddleware
from middleware.budget import BudgetMiddleware
from middleware.cache import CacheMiddleware
from middleware.cors import CorsMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.metrics import MetricsMiddleware
from middleware.request import CHAT_COMPLETIONS, RequestMiddleware
from middleware.send_timeout import SendTimeoutMiddleware
from providers.base import Provider
from providers.registry import build_provider
from resillm.admin.state import AdminState
from resillm.asgi import ASGIApp, Receive, Scope, Send, direct, route_path, send_json
from resillm.balance import StatsRegistry
from resillm.budget import BudgetTracker
from resillm.cache import ResponseCache
from resillm.circuit import CircuitRegistry
from resillm.config import Config
from resillm.config_diff import ReloadReport
from resillm.context import RequestContext
from resillm.errors import MethodNotAllowed, NotFound
from resillm.metrics import Metrics
from resillm.pricing import PriceBook, cost_nano_usd, to_usd
from resillm.router import Router
from resillm.schema import ModelCard, ModelList, json_encoder
from resillm.targets import Route, Target, build_routes

if TYPE_CHECKING:  # tracing is an optional extra, imported only when it is on
    from middleware.tracing import Tracing

MIN_SECRET_CHARS = 8  # shorter "keys" would mangle plain words in logged bodies
_HEALTH_BODY = b'{"status":"ok"}'


class GatewayState:
    """What the gateway keeps across reloads, handed to each runtime it builds."""

    __slots__ = (
        "admin",
        "budget",
        "cache",
        "circuits",
        "metrics",
        "reload",
        "session",
        "stats",
        "tracing",
    )

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        circuits: CircuitRegistry,
        stats: StatsRegistry,
        budget: BudgetTracker,
        cache: ResponseCache,
        tracing: Tracing | None,
        reload: Callable[[], Awaitable[ReloadReport]],
        admin: AdminState | None = None,
    ) -> None:
        self.admin = admin or AdminState()  # the admin page's charts, recent requests, sessions
        self.session = session
        self.metrics = metrics
        self.circuits = circuits
        self.stats = stats
        self.budget = budget
        self.cache = cache
        self.tracing = tracing
        self.reload = reload


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
        self, config: Config, state: GatewayState, previous: Runtime | None = None
    ) -> None:
        self.config = config
        self.state = state
        self.cache = state.cache  # the gateway's; its layer is in the stack only when enabled
        self.circuits = state.circuits
        self.metrics = state.metrics
        self.stats = state.stats
        self.budget = state.budget
        self.tracing = state.tracing
        self.prices = PriceBook(config.models)
        self.providers = self.build_providers(previous)
        self.circuits.configure(config.resilience.circuit_breaker)
        self.routes = build_routes(config, self.providers, self.circuits, self.stats)
        self.router = Router(self.routes, config.resilience, cost_of=self.expected_cost)
        state.admin.recent.resize(config.admin.recent_requests)
        self.admin: ASGIApp = admin_off
        if config.auth.admin_key:  # the admin page's modules load only when it is on
            from resillm.admin.api import AdminAPI

            self.admin = AdminAPI(
                config.auth.admin_key,
                lambda: self.routes,
                config=config,
                reload=state.reload,
                state=state.admin,
                budget=self.budget,
                secrets=config_secrets(config),
            )
        self.v1 = direct(self.v1_stack())
        self.ops = ErrorsMiddleware(self.ops_endpoints)

    def build_providers(self, previous: Runtime | None) -> dict[str, Provider]:
        """A provider whose settings did not change is kept across a reload, with its
        connection cap and its counts of requests in flight; the others are built anew
        (new credentials and base URLs apply to new requests at once)."""
        providers: dict[str, Provider] = {}
        for name, settings in self.config.providers.items():
            if previous is not None and previous.config.providers.get(name) == settings:
                providers[name] = previous.providers[name]
            else:
                providers[name] = build_provider(name, settings, self.state.session)
        return providers

    def expected_cost(
        self, target: Target, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        """For the cost strategy: what ``target`` would charge for these tokens."""
        price = self.prices.price(None, target.provider, target.model, None)
        if price is None:
            return None
        return to_usd(cost_nano_usd(price, prompt_tokens, completion_tokens))

    def v1_stack(self) -> ASGIApp:
        config, tracing, server = self.config, self.tracing, self.config.server
        send_timeout = server.send_timeout
        # The admin page's per-request feeds, only while it is on: one append, one record.
        admin = self.state.admin if config.auth.admin_key else None
        traced = [partial(tracing.middleware, providers=config.providers)] if tracing else []
        layers: list[Callable[[ASGIApp], ASGIApp]] = [  # outermost first
            *([partial(CorsMiddleware, config=config.cors)] if config.cors.allow_origins else []),
            ErrorsMiddleware,
            *traced,  # the SERVER span, with tracing.enabled
            *self.access_log_layer(admin),
            partial(
                MetricsMiddleware,
                metrics=self.metrics,
                observe=admin.series.record if admin else None,  # the admin page's charts
            ),
            partial(
                RequestMiddleware,
                max_request_bytes=server.max_request_bytes,
                body_timeout=server.body_timeout,
            ),
            *([partial(SendTimeoutMiddleware, timeout=send_timeout)] if send_timeout else []),
            *self.auth_layer(),
            *self.budget_layer(),
            *self.cache_layer(),  # last: a hit has passed auth and the budget gate
        ]
        app: ASGIApp = self.v1_endpoints
        for layer in reversed(layers):
            app = layer(app)
        return app

    def access_log_layer(self, admin: AdminState | None) -> list[Callable[[ASGIApp], ASGIApp]]:
        """The access log, when it logs or feeds the admin page's recent requests."""
        if not self.config.logging.log_requests and admin is None:
            return []
        return [
            partial(
                AccessLogMiddleware,
                config=self.config.logging,
                secrets=config_secrets(self.config),
                recent=admin.recent.append if admin else None,  # the admin page's list
            )
        ]

    def auth_layer(self) -> list[Callable[[ASGIApp], ASGIApp]]:
        """Client keys, when any are configured; without, the routes are open (no layer)."""
        keys = self.config.auth.keys
        if not keys:
            return []
        return [partial(AuthMiddleware, keys=keys, aliases=self.routes.keys())]

    def budget_layer(self) -> list[Callable[[ASGIApp], ASGIApp]]:
        """The budget gate. Always there: spend is tracked (``/v1/budget``, the spend gauge)
        even with no limit set, and an answer may be priced by the model it names even
        where no alias has a price of its own."""
        return [
            partial(
                BudgetMiddleware,
                tracker=self.budget,
                prices=self.prices,
                default_max_tokens=self.config.budget.default_max_tokens,
            )
        ]

    def cache_layer(self) -> list[Callable[[ASGIApp], ASGIApp]]:
        """The cache layer when ``cache.enabled``; none at all otherwise (zero cost)."""
        if self.cache is None or not self.config.cache.enabled:
            return []
        return [
            partial(
                CacheMiddleware, cache=self.cache, metrics=self.metrics, aliases=self.routes.keys()
            )
        ]

    def v1_endpoints(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: it hands over the router's, so a request that is relayed
        # (a stream held for minutes) does not also hold a frame for this dispatch.
        ctx = RequestContext.of(scope)
        if ctx.route == CHAT_COMPLETIONS and scope["method"] == "POST":
            return self.router.__call__(scope, receive, send)  # called as a method: cheaper
        return self.other_v1_endpoints(ctx, scope, send)

    async def other_v1_endpoints(self, ctx: RequestContext, scope: Scope, send: Send) -> None:
        method = scope["method"]
        if ctx.route == CHAT_COMPLETIONS:
            raise MethodNotAllowed(f"{CHAT_COMPLETIONS} takes POST")
        if ctx.route in ("/v1/models", "/v1/models/"):
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
        elif path == "/openapi.json":
            from resillm.openapi import openapi_document  # loaded on first ask

            await send_json(send, 200, openapi_document())
        elif path == "/admin" or path.startswith("/admin/"):
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


async def admin_off(scope: Scope, receive: Receive, send: Send) -> None:
    raise NotFound("the admin routes are off: set auth.admin_key to turn them on")


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
