"""Fault injection: server-wide options, overridden per request by `x-mock-*` headers.

A gateway test configures a provider with extra `headers` to make one target misbehave:

| header | effect |
|---|---|
| `x-mock-fail-status: 500` | always answer that status with the API's error JSON |
| `x-mock-fail-first: N` | fail the first N requests carrying this header value, then succeed |
| `x-mock-fail-code: context_length_exceeded` | the error's `code` (and message wording) |
| `x-mock-retry-after: 0.5` | sent back as `retry-after` on failures |
| `x-mock-latency: 0.5` | seconds before anything is sent |
| `x-mock-chunk-delay: 0.05` | seconds between content chunks |
| `x-mock-chunks: 20` | content chunks (words) in the answer |
| `x-mock-cut-after: N` | N content chunks, then the TCP connection is dropped mid-body |
| `x-mock-stall-after: N` | N content chunks, then silence until the client goes away |
| `x-mock-malformed-at: N` | one `data: {not json` event before content chunk N |
| `x-mock-error-event-after: N` | N content chunks, then an in-stream error event, then the end |
| `x-mock-no-finish: 1` | a clean end (with `[DONE]`) but no finish reason |

Without streaming, cut and stall happen before any response byte and `malformed-at` makes
the JSON body unparseable.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from resillm.mock_upstream.options import MockUpstreamOptions

_T = TypeVar("_T")

HEADER_PREFIX = "x-mock-"


class FaultHeaderError(ValueError):
    """An `x-mock-*` header whose value cannot be used."""


@dataclass(frozen=True)
class Faults:
    """What to do wrong (or slowly) for one request."""

    fail_status: int | None
    fail_code: str | None
    retry_after: float | None
    latency: float
    chunk_delay: float
    chunks: int
    cut_after: int | None
    stall_after: int | None
    malformed_at: int | None
    error_event_after: int | None
    no_finish: bool


class FaultInjector:
    """Decides each request's faults; holds the failure RNG and the fail-first counters."""

    def __init__(self, options: MockUpstreamOptions) -> None:
        self._options = options
        self._rng = random.Random(options.seed)
        self._fail_first_seen: Counter[int] = Counter()

    def for_request(self, headers: Mapping[str, str]) -> Faults:
        opts = self._options
        h = _HeaderReader(headers)
        status = h.get("fail-status", _status, None)
        fail_first = h.get("fail-first", _non_negative_int, None)
        return Faults(
            fail_status=self._fail_status(status, fail_first),
            fail_code=headers.get(HEADER_PREFIX + "fail-code", opts.fail_code),
            retry_after=h.get("retry-after", _non_negative_float, opts.retry_after),
            latency=h.get("latency", _non_negative_float, opts.latency),
            chunk_delay=h.get("chunk-delay", _non_negative_float, opts.chunk_delay),
            chunks=h.get("chunks", _positive_int, opts.chunks),
            cut_after=h.get("cut-after", _non_negative_int, opts.cut_after),
            stall_after=h.get("stall-after", _non_negative_int, opts.stall_after),
            malformed_at=h.get("malformed-at", _non_negative_int, opts.malformed_at),
            error_event_after=h.get("error-event-after", _non_negative_int, opts.error_event_after),
            no_finish=h.get("no-finish", _flag, opts.no_finish),
        )

    def _fail_status(self, header_status: int | None, header_fail_first: int | None) -> int | None:
        status = header_status if header_status is not None else self._options.fail_status
        if header_fail_first is not None:
            return status if self._count_toward(header_fail_first) else None
        if header_status is not None:
            return header_status
        if self._options.fail_first and self._count_toward(self._options.fail_first):
            return status
        if self._options.fail_rate and self._rng.random() < self._options.fail_rate:
            return status
        return None

    def _count_toward(self, first: int) -> bool:
        """Whether this is one of the first `first` requests under that fail-first value."""
        self._fail_first_seen[first] += 1
        return self._fail_first_seen[first] <= first


class _HeaderReader:
    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = headers

    def get(self, name: str, parse: Callable[[str], _T], default: _T) -> _T:
        raw = self._headers.get(HEADER_PREFIX + name)
        if raw is None:
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise FaultHeaderError(f"{HEADER_PREFIX}{name}: {exc}") from None


def _status(raw: str) -> int:
    status = int(raw)
    if not 400 <= status <= 599:
        raise ValueError(f"expected a 4xx or 5xx status, got {status}")
    return status


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"expected a number >= 1, got {value}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"expected seconds >= 0, got {raw}")
    return value


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected 1 or 0, got {raw}")
