"""The attempt loop: targets in order, retries with backoff, circuits, one overall deadline.

Each attempt is a callable the router supplies (a whole completion, or a stream up to its
first chunk), so the same loop serves both. It returns the target that answered and what
the attempt produced, or raises the error the client should see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from resillm.circuit import CircuitState
from resillm.config import ResilienceConfig
from resillm.context import RequestContext
from resillm.errors import (
    AllTargetsFailed,
    CircuitOpen,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from resillm.metrics import attempt_outcome
from resillm.retry import Backoff, Next, counts_against_target, decide, is_context_length
from resillm.targets import Route, Target

T = TypeVar("T")
Attempt = Callable[[Target, float], Awaitable[T]]


class Failover:
    def __init__(self, config: ResilienceConfig, backoff: Backoff | None = None) -> None:
        self.config = config
        self.backoff = backoff or Backoff(config.retry)

    async def run(
        self,
        ctx: RequestContext,
        route: Route,
        attempt: Attempt[T],
        *,
        chain: Sequence[Target] | None = None,
        max_attempts: int | None = None,
        deadline: float | None = None,
        settle: bool = True,
    ) -> tuple[Target, T]:
        """Try the chain; ``attempt(target, seconds_left)`` raises ``UpstreamError`` on failure.

        ``chain``, ``max_attempts`` (per target) and ``deadline`` (loop time) default to the
        route's chain, the retry config and now + ``timeouts.request``. With ``settle``
        false, a successful attempt leaves the target's circuit unsettled: the caller must
        call ``target.settle(...)`` once (a stream's verdict comes at its end).
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.timeouts.request
        if max_attempts is None:
            max_attempts = self.config.retry.max_attempts
        failures: list[UpstreamError] = []
        skipped: list[Target] = []
        unsupported: InvalidRequest | None = None
        if chain is None:
            chain = route.chain
        previous: Target | None = None
        tracer = ctx.tracer  # None unless tracing is on: then spans and events, see below
        for index, target in enumerate(chain):
            retry = 0
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise self.give_up(route, failures or [_deadline(target, self.config)])
                if previous is not None and previous is not target:
                    ctx.fallbacks += 1
                    ctx.fallback_log += ((previous.id, target.id),)
                    if tracer is not None:
                        tracer.fallback(previous.id, target.id)
                previous = target
                if not target.circuit.allow():
                    skipped.append(target)
                    if tracer is not None:
                        tracer.circuit_rejected(target.id, target.circuit.retry_in())
                    break
                ctx.attempts += 1
                target.begin()
                started = loop.time()
                try:
                    try:
                        async with asyncio.timeout(left):
                            if tracer is None:
                                result = await attempt(target, left)
                            else:  # a CLIENT span; upstream headers carry its traceparent
                                result = await tracer.attempt(
                                    target, attempt, left, retry=retry, fallback=index > 0
                                )
                    except TimeoutError:
                        raise _deadline(target, self.config) from None
                except UpstreamError as exc:
                    # Kept without its traceback, which holds this frame and so `failures`:
                    # a cycle only the garbage collector would free.
                    failures.append(exc.with_traceback(None))
                    _note_rate_limit(target, exc, loop.time())
                    ctx.attempt_log += (
                        (target.provider, target.model, attempt_outcome(exc), retry > 0),
                    )
                    others_left = any(t.circuit.available() for t in chain[index + 1 :])
                    step = decide(exc, others_left=others_left)
                    if step is Next.CLIENT:
                        target.settle("release")
                        raise exc from None
                    target.settle("failure" if counts_against_target(exc) else "release")
                    if (
                        step is Next.FALLBACK
                        or retry + 1 >= max_attempts
                        or target.circuit.state is CircuitState.OPEN
                    ):
                        break
                    wait = self.backoff.wait_before_retry(retry, exc)
                    if wait is None or wait >= deadline - loop.time():
                        break
                    retry += 1
                    ctx.retries += 1
                    if tracer is not None:
                        tracer.retry(target.id, retry, wait, exc)
                    await asyncio.sleep(wait)
                except InvalidRequest as exc:
                    # This target's API cannot express the request (say n > 1 for Claude);
                    # another target may. Nothing was sent, so nothing is held against it.
                    target.settle("release")
                    unsupported = exc.with_traceback(None)
                    break
                except BaseException:
                    target.settle("release")
                    raise
                else:
                    target.stats.observe(loop.time() - started, loop.time())
                    if settle:
                        target.settle("success")
                    ctx.attempt_log += ((target.provider, target.model, "success", retry > 0),)
                    return target, result
        if not failures and unsupported is not None:
            raise unsupported
        if not failures and skipped:
            raise CircuitOpen(route.alias, min(t.circuit.retry_in() for t in skipped))
        raise self.give_up(route, failures)

    @staticmethod
    def give_up(route: Route, failures: list[UpstreamError]) -> GatewayError:
        """A request no target could take because of its size goes back as the upstream
        said it; anything else is 'every target failed'."""
        last = failures[-1] if failures else None
        if isinstance(last, UpstreamStatusError) and is_context_length(last):
            return last
        return AllTargetsFailed(route.alias, failures)


def _note_rate_limit(target: Target, error: UpstreamError, now: float) -> None:
    """A 429 with a reset time: the balancer leaves the target out until then."""
    if isinstance(error, UpstreamStatusError) and error.status == 429 and error.retry_after_s:
        target.stats.rate_limited_until = now + error.retry_after_s


def _deadline(target: Target, config: ResilienceConfig) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"no answer within the request deadline ({config.timeouts.request:g}s)",
        provider=target.provider,
        model=target.model,
    )
