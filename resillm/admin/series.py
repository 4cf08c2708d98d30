"""The admin page's live charts: a ring of one-second buckets over the last 15 minutes.

Each finished ``/v1`` request costs one :meth:`RequestSeries.record` call on the event loop
thread: a few integer bumps in the bucket of the current second (a new second first clears
the slot it reuses, so buckets older than the ring expire by themselves). Latencies go into
a small log-scale histogram per bucket, so percentiles over any span are a merge of
histograms and memory stays fixed whatever the traffic. All the arithmetic for a chart
happens in :meth:`RequestSeries.window`, when the page asks.

The ring is per process: with ``server.workers > 1`` each worker charts its own requests.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]
RING_SECONDS = 900  # 15 minutes
# Latency histogram bucket upper bounds: 1 ms to ~10 min, each 25 % above the last, so an
# interpolated percentile is within about 12 % of the true one.
LATENCY_BOUNDS_S: tuple[float, ...] = tuple(0.001 * 1.25**i for i in range(60))


@dataclass(frozen=True)
class Column:
    """One column of a chart: ``seconds`` one-second buckets merged, starting at ``start``."""

    start: int  # epoch second
    seconds: int
    requests: int
    errors: int
    fallbacks: int
    p50_s: float | None  # None: no request finished in this column
    p99_s: float | None

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def errors_per_s(self) -> float:
        return self.errors / self.seconds


class RequestSeries:
    """A ring of ``size`` one-second buckets: requests, errors, fallbacks, latencies."""

    __slots__ = ("_clock", "_errors", "_fallbacks", "_latency", "_requests", "_stamp", "size")

    def __init__(self, size: int = RING_SECONDS, clock: Clock = time.time) -> None:
        self.size = size
        self._clock = clock
        self._stamp = [-1] * size  # the epoch second each slot holds; -1: never used
        self._requests = [0] * size
        self._errors = [0] * size
        self._fallbacks = [0] * size
        self._latency: list[list[int] | None] = [None] * size

    def record(self, status: int, duration_s: float, fallbacks: int = 0) -> None:
        """One finished request (the per-request path: keep it this small)."""
        second = int(self._clock())
        slot = second % self.size
        if self._stamp[slot] != second:
            self._stamp[slot] = second
            self._requests[slot] = self._errors[slot] = self._fallbacks[slot] = 0
            self._latency[slot] = None
        self._requests[slot] += 1
        # An error: the gateway or its upstreams failed (5xx), or every upstream was
        # rate-limited (429). Other 4xx are the client's own mistakes.
        if status >= 500 or status == 429:
            self._errors[slot] += 1
        if fallbacks:
            self._fallbacks[slot] += fallbacks
        histogram = self._latency[slot]
        if histogram is None:
            histogram = self._latency[slot] = [0] * (len(LATENCY_BOUNDS_S) + 1)
        histogram[bisect_left(LATENCY_BOUNDS_S, duration_s)] += 1

    def now(self) -> int:
        return int(self._clock())

    def window(self, seconds: int = RING_SECONDS, step: int = 5) -> list[Column]:
        """The last ``seconds`` (the current one included) in columns of ``step`` seconds,
        oldest first; seconds the ring no longer holds count as empty."""
        seconds = max(step, min(seconds, self.size) // step * step)
        end = self.now() + 1
        columns = []
        for start in range(end - seconds, end, step):
            columns.append(self._column(start, step))
        return columns

    def _column(self, start: int, step: int) -> Column:
        requests = errors = fallbacks = 0
        merged: list[int] | None = None
        for second in range(start, start + step):
            slot = second % self.size
            if self._stamp[slot] != second:
                continue
            requests += self._requests[slot]
            errors += self._errors[slot]
            fallbacks += self._fallbacks[slot]
            histogram = self._latency[slot]
            if histogram is not None:
                merged = list(histogram) if merged is None else _add(merged, histogram)
        return Column(
            start=start,
            seconds=step,
            requests=requests,
            errors=errors,
            fallbacks=fallbacks,
            p50_s=None if merged is None else percentile(merged, 0.50),
            p99_s=None if merged is None else percentile(merged, 0.99),
        )


def _add(total: list[int], more: Sequence[int]) -> list[int]:
    for i, count in enumerate(more):
        if count:
            total[i] += count
    return total


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram, interpolated inside its bucket."""
    count = sum(histogram)
    if count == 0:
        return None
    rank = q * count
    seen = 0
    for i, n in enumerate(histogram):
        if n and seen + n >= rank:
            low = LATENCY_BOUNDS_S[i - 1] if i > 0 else 0.0
            high = LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else low * 1.25
            return low + (high - low) * max(0.0, rank - seen) / n
        seen += n
    return LATENCY_BOUNDS_S[-1]
