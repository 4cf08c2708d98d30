"""Load balancing: each strategy orders an alias's targets for one request.

The failover loop then walks that order with its retries, circuits and fallbacks, so
balancing and resilience compose. Health comes first whatever the strategy: targets whose
circuit is open go last (tried only if everything else failed), and a target that answered
429 with a reset time is left out until then (unless every target is).

Per-target figures (latency EWMA, requests in flight) live in :class:`TargetStats`, kept
by the gateway per target id beside the circuits, so they survive reloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resillm.targets import Route, Target

Clock = Callable[[], float]
# The expected cost of sending this request to a target: (target, prompt tokens, completion
# tokens) -> USD, or None when the target's price is unknown.
CostOf = Callable[["Target", int, int], float | None]
EWMA_ALPHA = 0.3  # weight of the newest latency sample
STALE_AFTER_S = 30.0  # a target unmeasured this long is tried first once, to be measured again


class TargetStats:
    """What the balancer knows of one target."""

    __slots__ = ("ewma_s", "inflight", "measured_at", "rate_limited_until")

    def __init__(self) -> None:
        self.ewma_s: float | None = None
        self.inflight = 0
        self.measured_at = 0.0
        self.rate_limited_until = 0.0

    def observe(self, latency_s: float, now: float) -> None:
        """A latency sample: the whole answer, or the first chunk of a stream."""
        ewma = self.ewma_s
        self.ewma_s = latency_s if ewma is None else ewma + EWMA_ALPHA * (latency_s - ewma)
        self.measured_at = now


class StatsRegistry:
    def __init__(self) -> None:
        self._stats: dict[str, TargetStats] = {}

    def get(self, target_id: str) -> TargetStats:
        stats = self._stats.get(target_id)
        if stats is None:
            stats = self._stats[target_id] = TargetStats()
        return stats


class Balancer:
    """Orders one route's targets by its strategy; holds round-robin and weight state."""

    def __init__(
        self,
        route: Route,
        *,
        clock: Clock = time.monotonic,
        cost_of: CostOf | None = None,
    ) -> None:
        self.route = route
        self.strategy = route.config.strategy
        self.clock = clock
        self.cost_of = cost_of
        self._turn = 0
        self._current = [0.0] * len(route.targets)  # smooth weighted round robin

    def order(self, expected_tokens: tuple[int, int] = (0, 0)) -> list[Target]:
        """The route's own targets in the order to try them for this request
        (``expected_tokens``: its prompt and completion tokens, for the cost strategy)."""
        targets = self._by_strategy(expected_tokens)
        now = self.clock()
        usable, limited, open_ = [], [], []
        for target in targets:
            if not target.circuit.available():
                open_.append(target)
            elif target.stats.rate_limited_until > now:
                limited.append(target)
            else:
                usable.append(target)
        if usable:
            return usable + open_  # rate-limited targets sit out until their reset
        return limited + open_

    def chain(self, expected_tokens: tuple[int, int] = (0, 0)) -> list[Target]:
        """The ordered targets, then the fallback aliases' (as in ``route.chain``)."""
        own = self.order(expected_tokens)
        seen = {t.id for t in self.route.targets}
        return [*own, *(t for t in self.route.chain if t.id not in seen)]

    def _by_strategy(self, expected_tokens: tuple[int, int]) -> list[Target]:
        targets = self.route.targets
        strategy = self.strategy
        if strategy == "round_robin":
            start = self._turn % len(targets)
            self._turn += 1
            return [*targets[start:], *targets[:start]]
        if strategy == "weighted":
            return self._weighted()
        if strategy == "least_latency":
            return self._least_latency()
        if strategy == "least_busy":
            return sorted(targets, key=lambda t: t.stats.inflight)
        if strategy == "cost" and self.cost_of is not None:
            cost_of, (prompt, completion) = self.cost_of, expected_tokens
            return sorted(targets, key=lambda t: _cost_key(cost_of(t, prompt, completion)))
        return list(targets)

    def _weighted(self) -> list[Target]:
        """nginx's smooth weighted round robin: a 2:1 split goes a, b, a, a, b, a, ..."""
        targets = self.route.targets
        current = self._current
        total = 0.0
        for index, target in enumerate(targets):
            current[index] += target.weight
            total += target.weight
        best = max(range(len(targets)), key=current.__getitem__)
        current[best] -= total
        rest = sorted((i for i in range(len(targets)) if i != best), key=lambda i: -current[i])
        return [targets[best], *(targets[i] for i in rest)]

    def _least_latency(self) -> list[Target]:
        now = self.clock()

        def key(target: Target) -> tuple[int, float]:
            stats = target.stats
            if stats.ewma_s is None or now - stats.measured_at > STALE_AFTER_S:
                return (0, 0.0)  # unmeasured or stale: measure it (again) first
            return (1, stats.ewma_s)

        return sorted(self.route.targets, key=key)


def _cost_key(cost: float | None) -> float:
    return float("inf") if cost is None else cost
