"""What to do after a failed upstream attempt, and how long to wait before the next one.

``decide`` sorts a failure into: try the same target again, move on to the next target, or
give the error back to the client (SPEC section 5). ``Backoff`` spaces the retries:
``min(max_backoff, initial_backoff * multiplier**n)`` with full, equal or no jitter, and an
upstream's ``Retry-After`` honoured when it is not longer than ``max_backoff``.
"""

from __future__ import annotations

import enum
import random
import re

from resillm.config import RetryConfig
from resillm.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)


class Next(enum.Enum):
    RETRY = "retry"  # the same target again, after a backoff
    FALLBACK = "fallback"  # the next target; this one will not do
    CLIENT = "client"  # the request itself is wrong: answer the client now


# Fall back on these: the key or model of that target is wrong, another target may work.
_TARGET_STATUSES = frozenset({401, 403, 404})
_CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_LENGTH_RE = re.compile(
    r"context[ _]length|context window|maximum context|prompt is too long|"
    r"input is too long|too many (input )?tokens",
    re.IGNORECASE,
)


def is_context_length(error: UpstreamStatusError) -> bool:
    if error.code in _CONTEXT_LENGTH_CODES:
        return True
    return error.status in (400, 413, 422) and bool(_CONTEXT_LENGTH_RE.search(error.message))


def decide(error: UpstreamError, *, others_left: bool) -> Next:
    """The SPEC section 5 rules. ``others_left``: another target remains in the chain."""
    if isinstance(error, UpstreamStatusError):
        if error.retryable:
            return Next.RETRY
        if error.status in _TARGET_STATUSES or is_context_length(error):
            return Next.FALLBACK
        return Next.CLIENT  # a plain 400, a content-policy refusal, 422, other 4xx
    if isinstance(error, UpstreamTimeout):
        # A silent target would only burn the deadline again: try it again only when it is
        # the last one left.
        return Next.FALLBACK if others_left else Next.RETRY
    if isinstance(error, (UpstreamConnectError, UpstreamProtocolError)):
        return Next.RETRY
    return Next.RETRY if error.retryable else Next.FALLBACK


def counts_against_target(error: UpstreamError) -> bool:
    """Whether a failure says something about the target's health (for its circuit)."""
    if isinstance(error, UpstreamStatusError):
        return error.retryable or error.status in _TARGET_STATUSES
    return True


class Backoff:
    """Delays between attempts on one target; ``rng`` is injectable for tests."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()

    def delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (0 for the first retry)."""
        config = self.config
        try:
            ceiling = min(config.max_backoff, config.initial_backoff * config.multiplier**retry)
        except OverflowError:
            ceiling = config.max_backoff
        if config.jitter == "full":
            return self.rng.uniform(0.0, ceiling)
        if config.jitter == "equal":
            return ceiling / 2.0 + self.rng.uniform(0.0, ceiling / 2.0)
        return ceiling

    def wait_before_retry(self, retry: int, error: UpstreamError) -> float | None:
        """Seconds to wait, or ``None`` when the upstream asked for longer than
        ``max_backoff`` (give this target up)."""
        asked = error.retry_after_s if isinstance(error, UpstreamStatusError) else None
        if asked is not None:
            return asked if asked <= self.config.max_backoff else None
        return self.delay(retry)
