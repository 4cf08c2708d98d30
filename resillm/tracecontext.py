"""The tracing hooks the core calls, with no OpenTelemetry import: zero cost when tracing is off.

Tracing is an optional extra, so the failover loop, the relay and the providers never import
OpenTelemetry. They see only what this leaf declares:

- ``ctx.tracer`` (a :class:`RequestTracer`, or ``None`` when tracing is off): the tracing
  middleware puts one per request at ``scope[TRACER_SCOPE_KEY]`` and the request layer copies
  it onto the context. The failover loop runs each upstream attempt through
  ``tracer.attempt`` (a CLIENT span) and reports retries, fallbacks and circuit rejections;
  with tracing off that costs one ``None`` check per attempt.
- :func:`with_trace_headers`: while an attempt runs, the tracer sets the W3C ``traceparent``
  (of that attempt's CLIENT span) in a context variable; every provider merges it into the
  headers of its upstream request. Off, it returns the provider's own dict untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from typing import Protocol, TypeVar

TRACER_SCOPE_KEY = "resillm.tracer"

T = TypeVar("T")
TargetT = TypeVar("TargetT", bound="TracedTarget")

_upstream_headers: ContextVar[Mapping[str, str] | None] = ContextVar(
    "resillm_upstream_trace_headers", default=None
)


def with_trace_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the trace context of the attempt being made, if it is traced.

    Providers call this for every upstream request; it returns ``headers`` itself when
    tracing is off, so the hot path allocates nothing.
    """
    extra = _upstream_headers.get()
    if extra is None:
        return headers
    return {**headers, **extra}


def set_trace_headers(headers: Mapping[str, str]) -> Token[Mapping[str, str] | None]:
    """For the tracer: the headers upstream requests carry until :func:`reset_trace_headers`."""
    return _upstream_headers.set(headers)


def reset_trace_headers(token: Token[Mapping[str, str] | None]) -> None:
    _upstream_headers.reset(token)


class TracedTarget(Protocol):
    """What the tracer reads of a target (``resillm.targets.Target`` fits)."""

    @property
    def id(self) -> str: ...

    @property
    def provider(self) -> str: ...

    @property
    def model(self) -> str: ...


class RequestTracer(Protocol):
    """One request's trace, as the failover loop and the stream relay report to it."""

    @property
    def trace_id(self) -> str:
        """32 hex digits; the access log carries it so logs and traces can be joined."""
        ...

    def attempt(
        self,
        target: TargetT,
        call: Callable[[TargetT, float], Awaitable[T]],
        seconds_left: float,
        *,
        retry: int,
        fallback: bool,
    ) -> Awaitable[T]:
        """Run ``call(target, seconds_left)`` inside a CLIENT span (upstream headers carry
        its ``traceparent``). ``retry`` counts the earlier tries of this target in this run;
        ``fallback`` says the target is not the first of its chain."""
        ...

    def retry(self, target_id: str, retry: int, wait_s: float, error: BaseException) -> None:
        """The loop will try ``target_id`` again after ``wait_s`` seconds."""
        ...

    def fallback(self, from_target: str, to_target: str) -> None:
        """The loop moves along the chain."""
        ...

    def circuit_rejected(self, target_id: str, retry_in_s: float) -> None:
        """A target was skipped without a network call: its circuit is open."""
        ...

    def stream_failed(self, error: BaseException) -> None:
        """The stream being relayed died after its response started (recovery may follow)."""
        ...
