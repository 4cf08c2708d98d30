"""The budget gate: reserve before the request goes upstream, settle with its real cost.

Only chat completions are gated. The reservation is the estimated cost of the prompt
(four characters a token) plus ``max_completion_tokens``/``max_tokens`` (or
``budget.default_max_tokens``) times ``n``, at the price of the alias's dearest target.
Settlement happens just before the response's last body message (so a client that asks
``/v1/budget`` next sees its own spend, and its next request is judged by it rather than by
the reservation), or in ``finally`` for a request that failed, was cancelled or whose client
left mid-stream: it still releases its reservation and pays for what it used. ``ctx.cost``
is set for the metrics and the access log. Under ``action: warn`` an over-budget request goes
through with ``x-resillm-budget-warning``.
"""

from __future__ import annotations

import asyncio

from middleware.request import CHAT_COMPLETIONS
from resillm.asgi import ASGIApp, Message, Receive, Scope, Send, direct
from resillm.budget import Admission, BudgetTracker
from resillm.context import RequestContext
from resillm.pricing import PriceBook, cost_nano_usd, to_usd
from resillm.usage import estimate_tokens, prompt_chars

WARNING_HEADER = b"x-resillm-budget-warning"


class BudgetMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        tracker: BudgetTracker,
        prices: PriceBook,
        default_max_tokens: int,
    ) -> None:
        self.app = direct(app)
        self.tracker = tracker
        self.prices = prices
        self.default_max_tokens = default_max_tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        if ctx.route != CHAT_COMPLETIONS or ctx.alias is None or not self.prices.knows(ctx.alias):
            await self.app(scope, receive, send)  # the router answers 404 to an unknown alias
            return
        estimate = self.estimate(ctx) if self.tracker.persist else 0
        admission = await self.tracker.admit(ctx.client_key, estimate)
        settlement = _Settlement(self, ctx, admission, send)
        try:
            await self.app(scope, receive, settlement.send)
        finally:
            if not settlement.settled:
                await settlement.settle()

    def estimate(self, ctx: RequestContext) -> int:
        """The reservation, in nano-dollars."""
        request, alias = ctx.request, ctx.alias
        assert request is not None and alias is not None
        price = self.prices.reservation_price(alias)
        if price is None:
            return 0
        completion = (request.token_limit or self.default_max_tokens) * (request.n or 1)
        return cost_nano_usd(price, estimate_tokens(prompt_chars(request)), completion)

    def cost(self, ctx: RequestContext) -> int | None:
        """The real cost in nano-dollars; ``None`` when no upstream reported usage."""
        if ctx.cache == "hit":
            return 0
        usage = ctx.usage
        if usage is None:
            return None
        # The configured model of the target that answered (its first successful attempt).
        target_model = None
        for provider, model, outcome, _ in ctx.attempt_log:
            if outcome == "success" and provider == ctx.provider:
                target_model = model
                break
        price = self.prices.price(ctx.alias, ctx.provider, target_model, ctx.upstream_model)
        if price is None:
            return 0
        return cost_nano_usd(price, usage.prompt_tokens, usage.completion_tokens)


class _Settlement:
    """One request's reservation: settled with the real cost just before the response's
    last body message, or when the request ends without one. Its ``send`` adds the warning
    header under ``action: warn``."""

    __slots__ = ("admission", "ctx", "gate", "inner", "settled")

    def __init__(
        self, gate: BudgetMiddleware, ctx: RequestContext, admission: Admission, send: Send
    ) -> None:
        self.gate = gate
        self.ctx = ctx
        self.admission = admission
        self.inner = send
        self.settled = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            warning = self.admission.warning
            if warning is not None:
                header = (WARNING_HEADER, warning.encode("latin-1", "replace"))
                message["headers"] = [*message.get("headers", ()), header]
        elif (
            message["type"] == "http.response.body"
            and not message.get("more_body")
            and not self.settled
        ):
            await self.settle()  # before the client sees the end: it reads its own spend
        await self.inner(message)

    async def settle(self) -> None:
        self.settled = True
        ctx, tracker = self.ctx, self.gate.tracker
        cost = self.gate.cost(ctx)
        ctx.cost = None if cost is None else to_usd(cost)
        settling = tracker.settle(self.admission, cost)
        if tracker.store_awaits:
            # Shielded: a second cancellation (server shutdown) must not lose the spend.
            await asyncio.shield(settling)
        else:
            await settling  # runs to its end without suspending: nothing to cancel
