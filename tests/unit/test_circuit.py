"""Circuit breakers on their own (fake clock), and as the failover loop sees them."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import pytest

from resillm.circuit import CircuitBreaker, CircuitRegistry, CircuitState
from resillm.config import (
    CircuitBreakerConfig,
    ModelConfig,
    ResilienceConfig,
    RetryConfig,
    TargetConfig,
)
from resillm.context import RequestContext
from resillm.errors import CircuitOpen, UpstreamStatusError
from resillm.failover import Failover
from resillm.targets import Route, Target


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker_config(
    *,
    failure_threshold: int = 3,
    success_threshold: int = 2,
    open_timeout: float = 10.0,
    half_open_max_requests: int = 1,
) -> CircuitBreakerConfig:
    return CircuitBreakerConfig(
        failure_threshold=failure_threshold,
        success_threshold=success_threshold,
        open_timeout=open_timeout,
        half_open_max_requests=half_open_max_requests,
    )


def opened(breaker: CircuitBreaker) -> CircuitBreaker:
    for _ in range(breaker.config.failure_threshold):
        breaker.failure()
    assert breaker.state is CircuitState.OPEN
    return breaker


# --- the breaker on its own --------------------------------------------------------------


def test_circuit_starts_closed() -> None:
    breaker = CircuitBreaker(breaker_config(), FakeClock())
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 0
    assert breaker.probes == 0
    assert breaker.retry_in() == 0.0
    assert breaker.allow()
    assert breaker.allow()  # closed: no probe accounting, no limit
    assert breaker.probes == 0


def test_circuit_opens_after_failure_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(breaker_config(failure_threshold=3), FakeClock())
    breaker.failure()
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 2
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()


def test_circuit_success_resets_the_consecutive_failure_count() -> None:
    breaker = CircuitBreaker(breaker_config(failure_threshold=3), FakeClock())
    breaker.failure()
    breaker.failure()
    breaker.success()
    assert breaker.failures == 0
    breaker.failure()
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 2
    breaker.failure()
    assert breaker.state is CircuitState.OPEN


def test_circuit_release_while_closed_changes_nothing() -> None:
    breaker = CircuitBreaker(breaker_config(failure_threshold=2), FakeClock())
    breaker.failure()
    breaker.release()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 1
    breaker.failure()
    assert breaker.state is CircuitState.OPEN


def test_open_circuit_rejects_until_open_timeout_then_goes_half_open() -> None:
    clock = FakeClock()
    breaker = opened(CircuitBreaker(breaker_config(open_timeout=10.0), clock))
    clock.advance(9.99)
    assert not breaker.allow()
    assert breaker.state is CircuitState.OPEN
    clock.advance(0.01)
    assert breaker.allow()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.probes == 1


def test_retry_in_counts_down_while_open() -> None:
    clock = FakeClock()
    breaker = opened(CircuitBreaker(breaker_config(open_timeout=10.0), clock))
    assert breaker.retry_in() == pytest.approx(10.0)
    clock.advance(4.0)
    assert breaker.retry_in() == pytest.approx(6.0)
    clock.advance(5.5)
    assert breaker.retry_in() == pytest.approx(0.5)
    clock.advance(100.0)
    assert breaker.retry_in() == 0.0  # never negative
    assert breaker.allow()
    assert breaker.retry_in() == 0.0  # half-open


def test_circuit_closes_after_success_threshold_half_open_successes() -> None:
    clock = FakeClock()
    breaker = opened(CircuitBreaker(breaker_config(success_threshold=2), clock))
    clock.advance(10.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.probes == 0
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 0
    # closed again: it takes the full threshold to open it
    breaker.failure()
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED


def test_circuit_reopens_on_half_open_failure() -> None:
    clock = FakeClock()
    breaker = opened(CircuitBreaker(breaker_config(success_threshold=2), clock))
    clock.advance(10.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    assert breaker.probes == 0
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10.0)  # a fresh open period
    clock.advance(10.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.HALF_OPEN  # successes started over


def test_half_open_admits_only_max_probes_and_release_frees_a_slot() -> None:
    clock = FakeClock()
    breaker = opened(CircuitBreaker(breaker_config(half_open_max_requests=2), clock))
    clock.advance(10.0)
    assert breaker.allow()
    assert breaker.allow()
    assert breaker.probes == 2
    assert not breaker.allow()
    breaker.release()
    assert breaker.probes == 1
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_half_open_success_below_threshold_frees_its_probe_slot() -> None:
    clock = FakeClock()
    breaker = opened(
        CircuitBreaker(breaker_config(half_open_max_requests=1, success_threshold=3), clock)
    )
    clock.advance(10.0)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.success()
    assert breaker.allow()


# --- the registry ------------------------------------------------------------------------


def test_registry_returns_one_breaker_per_target_id() -> None:
    registry = CircuitRegistry(breaker_config(), FakeClock())
    a = registry.get("p/a")
    assert registry.get("p/a") is a
    b = registry.get("p/b")
    assert b is not a
    assert dict(registry.items()) == {"p/a": a, "p/b": b}


def test_registry_configure_changes_thresholds_without_resetting_state() -> None:
    clock = FakeClock()
    registry = CircuitRegistry(breaker_config(failure_threshold=5, open_timeout=10.0), clock)
    failing = registry.get("p/failing")
    for _ in range(2):
        failing.failure()
    tripped = opened(registry.get("p/tripped"))

    registry.configure(breaker_config(failure_threshold=3, open_timeout=60.0))

    assert registry.get("p/failing") is failing
    assert registry.get("p/tripped") is tripped
    assert failing.state is CircuitState.CLOSED
    assert failing.failures == 2
    failing.failure()  # the new threshold of 3 applies to the kept count
    assert failing.state is CircuitState.OPEN
    assert tripped.state is CircuitState.OPEN
    assert tripped.retry_in() == pytest.approx(60.0)  # the new open_timeout applies
    assert registry.get("p/new").config.failure_threshold == 3


# --- through the failover loop -----------------------------------------------------------


@dataclass
class FakeUpstream:
    provider: str
    model: str


def make_target(name: str, breaker: CircuitBreaker) -> Target:
    upstream: Any = FakeUpstream(name, f"{name}-model")
    return Target(f"{name}/{name}-model", upstream, breaker, 1.0)


def make_route(*targets: Target) -> Route:
    model = ModelConfig(targets=[TargetConfig(provider=t.provider, model=t.model) for t in targets])
    return Route("chat", model, list(targets))


def failover(max_attempts: int = 1) -> Failover:
    retry = RetryConfig(
        max_attempts=max_attempts, initial_backoff=0.001, max_backoff=0.001, jitter="none"
    )
    return Failover(ResilienceConfig(retry=retry))


def ctx() -> RequestContext:
    return RequestContext("req-1", "/v1/chat/completions")


def unavailable(target: Target) -> UpstreamStatusError:
    return UpstreamStatusError(503, "overloaded", provider=target.provider, model=target.model)


@pytest.mark.anyio
async def test_open_circuit_is_skipped_without_calling_its_target() -> None:
    clock = FakeClock()
    a = make_target("a", opened(CircuitBreaker(breaker_config(), clock)))
    b = make_target("b", CircuitBreaker(breaker_config(), clock))
    calls: list[str] = []

    async def attempt(target: Target, seconds_left: float) -> str:
        calls.append(target.provider)
        return f"answer from {target.provider}"

    context = ctx()
    target, result = await failover().run(context, make_route(a, b), attempt)
    assert target is b
    assert result == "answer from b"
    assert calls == ["b"]
    assert context.attempts == 1
    assert context.fallbacks == 1
    assert a.circuit.state is CircuitState.OPEN


@pytest.mark.anyio
async def test_failures_through_failover_open_the_circuit_and_later_requests_skip_it() -> None:
    clock = FakeClock()
    a = make_target("a", CircuitBreaker(breaker_config(failure_threshold=2), clock))
    b = make_target("b", CircuitBreaker(breaker_config(), clock))
    calls: list[str] = []

    async def attempt(target: Target, seconds_left: float) -> str:
        calls.append(target.provider)
        if target is a:
            raise unavailable(target)
        return "ok"

    route = make_route(a, b)
    for _ in range(2):
        await failover().run(ctx(), route, attempt)
    assert a.circuit.state is CircuitState.OPEN
    calls.clear()
    target, _ = await failover().run(ctx(), route, attempt)
    assert target is b
    assert calls == ["b"]


@pytest.mark.anyio
async def test_client_errors_do_not_count_against_the_circuit() -> None:
    clock = FakeClock()
    a = make_target("a", CircuitBreaker(breaker_config(failure_threshold=1), clock))

    async def attempt(target: Target, seconds_left: float) -> str:
        raise UpstreamStatusError(400, "bad temperature", provider="a", model="a-model")

    for _ in range(3):
        with pytest.raises(UpstreamStatusError):
            await failover().run(ctx(), make_route(a), attempt)
    assert a.circuit.state is CircuitState.CLOSED
    assert a.circuit.failures == 0


@pytest.mark.anyio
async def test_every_circuit_open_raises_circuit_open_503_with_retry_after() -> None:
    clock = FakeClock()
    a = make_target("a", opened(CircuitBreaker(breaker_config(open_timeout=10.0), clock)))
    clock.advance(2.5)
    b = make_target("b", opened(CircuitBreaker(breaker_config(open_timeout=30.0), clock)))
    calls: list[str] = []

    async def attempt(target: Target, seconds_left: float) -> str:
        calls.append(target.provider)
        return "ok"

    context = ctx()
    with pytest.raises(CircuitOpen) as info:
        await failover().run(context, make_route(a, b), attempt)
    assert calls == []
    assert context.attempts == 0
    assert info.value.status == 503
    assert info.value.code == "circuit_open"
    # the soonest circuit to half-open: a, in 7.5 s, rounded up
    assert info.value.headers["Retry-After"] == str(math.ceil(7.5))


@pytest.mark.anyio
async def test_half_open_probe_failure_through_failover_reopens_the_circuit() -> None:
    clock = FakeClock()
    a = make_target("a", opened(CircuitBreaker(breaker_config(), clock)))
    b = make_target("b", CircuitBreaker(breaker_config(), clock))
    clock.advance(10.0)

    async def attempt(target: Target, seconds_left: float) -> str:
        if target is a:
            raise unavailable(target)
        return "ok"

    target, _ = await failover().run(ctx(), make_route(a, b), attempt)
    assert target is b
    assert a.circuit.state is CircuitState.OPEN
    assert a.circuit.probes == 0


@pytest.mark.anyio
async def test_half_open_probe_ending_in_a_client_error_frees_its_slot() -> None:
    clock = FakeClock()
    a = make_target("a", opened(CircuitBreaker(breaker_config(), clock)))
    clock.advance(10.0)

    async def attempt(target: Target, seconds_left: float) -> str:
        raise UpstreamStatusError(400, "bad request", provider="a", model="a-model")

    with pytest.raises(UpstreamStatusError):
        await failover().run(ctx(), make_route(a), attempt)
    assert a.circuit.state is CircuitState.HALF_OPEN
    assert a.circuit.probes == 0
    assert a.circuit.allow()


@pytest.mark.anyio
async def test_cancelled_half_open_probe_frees_its_slot() -> None:
    clock = FakeClock()
    a = make_target("a", opened(CircuitBreaker(breaker_config(), clock)))
    clock.advance(10.0)
    started = asyncio.Event()

    async def attempt(target: Target, seconds_left: float) -> str:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never answers")

    task = asyncio.create_task(failover().run(ctx(), make_route(a), attempt))
    await started.wait()
    assert a.circuit.probes == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.circuit.probes == 0
    assert a.circuit.state is CircuitState.HALF_OPEN


@pytest.mark.anyio
async def test_concurrent_requests_let_exactly_one_probe_through_a_half_open_circuit() -> None:
    clock = FakeClock()
    config = breaker_config(half_open_max_requests=1, success_threshold=1)
    a = make_target("a", opened(CircuitBreaker(config, clock)))
    b = make_target("b", CircuitBreaker(breaker_config(), clock))
    clock.advance(10.0)
    route = make_route(a, b)
    probe_may_answer = asyncio.Event()
    in_flight = {"a": 0, "b": 0}
    calls = {"a": 0, "b": 0}
    others_answered = asyncio.Event()

    async def attempt(target: Target, seconds_left: float) -> str:
        calls[target.provider] += 1
        if calls["b"] == 19:
            others_answered.set()
        in_flight[target.provider] += 1
        try:
            if target is a:
                await probe_may_answer.wait()
            else:
                await asyncio.sleep(0)
            return target.provider
        finally:
            in_flight[target.provider] -= 1

    tasks = [asyncio.create_task(failover().run(ctx(), route, attempt)) for _ in range(20)]
    try:
        # every request but the probe is answered by b while the probe is in flight (a
        # second probe would keep b from ever answering 19)
        async with asyncio.timeout(2.0):
            await others_answered.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        assert sum(task.done() for task in tasks) == 19
        assert calls == {"a": 1, "b": 19}
        assert in_flight["a"] == 1
        assert a.circuit.state is CircuitState.HALF_OPEN
        assert a.circuit.probes == 1
    finally:
        probe_may_answer.set()
        results = await asyncio.gather(*tasks)
    assert sorted(target.provider for target, _ in results) == ["a"] + ["b"] * 19
    assert a.circuit.state is CircuitState.CLOSED


@pytest.mark.anyio
async def test_concurrent_requests_on_a_sole_half_open_target_get_circuit_open() -> None:
    clock = FakeClock()
    a = make_target("a", opened(CircuitBreaker(breaker_config(half_open_max_requests=1), clock)))
    clock.advance(10.0)
    route = make_route(a)
    probe_may_answer = asyncio.Event()
    probe_started = asyncio.Event()
    calls = 0

    async def attempt(target: Target, seconds_left: float) -> str:
        nonlocal calls
        calls += 1
        probe_started.set()
        await probe_may_answer.wait()
        return "probe answer"

    probe = asyncio.create_task(failover().run(ctx(), route, attempt))
    await probe_started.wait()
    others = [asyncio.create_task(failover().run(ctx(), route, attempt)) for _ in range(10)]
    try:
        async with asyncio.timeout(2.0):  # a second probe would wait with the first
            rejected = await asyncio.gather(*others, return_exceptions=True)
    finally:
        probe_may_answer.set()
        await asyncio.gather(*others, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(error, CircuitOpen) for error in rejected)
    assert all(error.status == 503 for error in rejected if isinstance(error, CircuitOpen))
    assert all(
        error.headers["Retry-After"] == "1" for error in rejected if isinstance(error, CircuitOpen)
    )
    target, result = await probe
    assert (target, result) == (a, "probe answer")
    assert calls == 1
