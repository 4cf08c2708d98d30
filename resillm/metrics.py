"""Prometheus collectors (SPEC section 7), one registry per gateway, through aioprometheus.

aioprometheus has been quiet since 2023, so it stays behind this module: collectors are
built per app (no global registry: two gateways in one process, and the tests, never
collide) and rendered with its text formatter. Labels are low-cardinality only: aliases,
provider names, target ids, statuses, outcomes — never request ids or raw paths.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import cast

from aioprometheus import histogram as aggregates
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

from resillm.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)

# From a cached answer in milliseconds to a long generation in minutes.
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
NONE = "none"
MAX_PENDING = 4096  # distinct label sets held before a flush, scraped or not
Labels = tuple[tuple[str, str], ...]


def attempt_outcome(error: UpstreamError | None) -> str:
    """The ``outcome`` label of ``resillm_upstream_attempts_total``."""
    if error is None:
        return "success"
    if isinstance(error, UpstreamStatusError):
        if error.status == 429:
            return "rate_limited"
        return "server_error" if error.status >= 500 else "client_error"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamConnectError):
        return "connection_error"
    if isinstance(error, UpstreamProtocolError):
        return "protocol_error"
    return "error"


class _Observed:
    """Observations of one histogram's label set not flushed yet: a count per bucket (each
    value in the first bucket that holds it), their sum and number."""

    __slots__ = ("bounds", "counts", "histogram", "number", "sum")

    def __init__(self, histogram: Histogram, bounds: list[float]) -> None:
        self.histogram = histogram
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.number = 0


class Metrics:
    """Every collector the gateway exports. Owned by the gateway, so it survives reloads."""

    def __init__(self) -> None:
        # Counter increments wait here (plain dict arithmetic) until a scrape flushes them
        # into aioprometheus, whose own ``inc`` checks and JSON-encodes labels every time.
        self._pending: dict[tuple[str, Labels], float] = {}
        self._counters: dict[str, Counter] = {}
        # Histogram observations likewise, bucketed with one bisect: aioprometheus's own
        # ``observe`` JSON-encodes the labels and walks every bucket in Python each time.
        self._observed: dict[tuple[str, Labels], _Observed] = {}
        self._bounds: dict[str, list[float]] = {}
        # Requests being served now: set into resillm_inflight_requests at each scrape.
        self.inflight_now = 0
        self._render_hooks: list[Callable[[], None]] = [self.flush]
        self.registry = registry = Registry()
        self.requests = Counter(
            "resillm_requests_total", "Client requests by alias, provider and status.",
            registry=registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "resillm_request_duration_seconds", "Whole request time, streams to their end.",
            registry=registry, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.ttft = Histogram(
            "resillm_time_to_first_token_seconds", "Time until a stream's first chunk.",
            registry=registry, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.upstream_attempts = Counter(
            "resillm_upstream_attempts_total", "Upstream attempts by provider, model and outcome.",
            registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "resillm_retries_total", "Attempts that repeated a target after a failure.",
            registry=registry,
        )  # fmt: skip
        self.fallbacks = Counter(
            "resillm_fallbacks_total", "Moves from one target to the next within a request.",
            registry=registry,
        )  # fmt: skip
        self.circuit_state = Gauge(
            "resillm_circuit_state", "Circuit per target: 0 closed, 1 half-open, 2 open.",
            registry=registry,
        )  # fmt: skip
        self.tokens = Counter(
            "resillm_tokens_total", "Tokens by alias, provider and kind (prompt, completion).",
            registry=registry,
        )  # fmt: skip
        self.cost = Counter(
            "resillm_cost_usd_total", "Spend in USD by alias and provider.", registry=registry
        )
        self.cache_requests = Counter(
            "resillm_cache_requests_total", "Cache lookups by result (hit, miss).",
            registry=registry,
        )  # fmt: skip
        self.budget_spent = Gauge(
            "resillm_budget_spent_usd", "Spend in the current window (hour, day).",
            registry=registry,
        )  # fmt: skip
        self.budget_store_errors = Counter(
            "resillm_budget_store_errors_total",
            "Budget store operations that failed (Redis down, snapshot file not written or "
            "read), by operation and policy.",
            registry=registry,
        )
        self.config_reloads = Counter(
            "resillm_config_reloads_total", "Config reloads by result (success, error).",
            registry=registry,
        )  # fmt: skip
        self.inflight = Gauge(
            "resillm_inflight_requests", "Requests being served now.", registry=registry
        )
        self.upstream_connections = Gauge(
            "resillm_upstream_connections",
            "Upstream connections of the shared pool, by state (active: in use, idle: kept).",
            registry=registry,
        )
        self.stream_recoveries = Counter(
            "resillm_stream_recoveries_total",
            "Streams that died mid-way, by recovery outcome (continued, restarted, failed).",
            registry=registry,
        )
        self.malformed_events = Counter(
            "resillm_stream_malformed_events_total", "Malformed upstream stream events skipped.",
            registry=registry,
        )  # fmt: skip
        self.inflight.set({}, 0)

    def count(self, counter: Counter, labels: Labels, amount: float = 1.0) -> None:
        """Add to ``counter`` cheaply; visible at the next scrape (or ``flush``)."""
        self._counters.setdefault(counter.name, counter)
        key = (counter.name, labels)
        pending = self._pending
        pending[key] = pending.get(key, 0.0) + amount
        if len(pending) > MAX_PENDING:
            self.flush()

    def observe(self, histogram: Histogram, labels: Labels, value: float) -> None:
        """Observe ``value`` into ``histogram`` cheaply; visible at the next scrape (or
        ``flush``), counted exactly as aioprometheus counts it."""
        key = (histogram.name, labels)
        observed = self._observed.get(key)
        if observed is None:
            if len(self._observed) >= MAX_PENDING:
                self.flush()
            observed = self._observed[key] = _Observed(histogram, self._bounds_of(histogram))
        observed.counts[bisect_left(observed.bounds, value)] += 1
        observed.sum += value
        observed.number += 1

    def _bounds_of(self, histogram: Histogram) -> list[float]:
        bounds = self._bounds.get(histogram.name)
        if bounds is None:  # the aggregator's own buckets: as floats, +Inf added
            bounds = list(aggregates.Histogram(*histogram.upper_bounds).buckets)
            self._bounds[histogram.name] = bounds
        return bounds

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for (name, labels), amount in pending.items():
            self._counters[name].add(dict(labels), amount)
        observed, self._observed = self._observed, {}
        for (_, labels), batch in observed.items():
            _add_observed(batch, dict(labels))
        self.inflight.set({}, self.inflight_now)

    def on_render(self, hook: Callable[[], None]) -> None:
        """``hook`` brings its gauges up to date just before each scrape, so a figure that
        changes on every request is not pushed into the registry on every request."""
        self._render_hooks.append(hook)

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        for hook in self._render_hooks:
            hook()
        content, headers = render(self.registry, accept)
        return content, dict(headers)

    def circuit_changed(self, target_id: str, state: int) -> None:
        self.circuit_state.set({"target": target_id}, state)


def _add_observed(batch: _Observed, labels: dict[str, str]) -> None:
    """Add a batch to its label set's aggregator: each bucket counts every value at or
    below its bound (cumulative), as ``aioprometheus.histogram.Histogram.observe`` does."""
    histogram = batch.histogram
    try:
        aggregate = cast(aggregates.Histogram, histogram.get_value(labels))
    except KeyError:
        aggregate = aggregates.Histogram(*histogram.upper_bounds)
        histogram.set_value(labels, aggregate)  # as its own ``add`` does
    running = 0
    for bound, count in zip(aggregate.buckets, batch.counts, strict=True):
        running += count
        if running:
            aggregate.buckets[bound] += running
    aggregate.sum += batch.sum
    aggregate.observations += batch.number
