"""Retry decisions, backoff, and how the failover loop retries one target (SPEC section 5)."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from multidict import CIMultiDict

import resillm.failover as failover_module
from providers.http import parse_retry_after
from resillm.circuit import CircuitBreaker, CircuitState
from resillm.config import (
    CircuitBreakerConfig,
    ModelConfig,
    ResilienceConfig,
    RetryConfig,
    TargetConfig,
    TimeoutsConfig,
)
from resillm.context import RequestContext
from resillm.errors import (
    AllTargetsFailed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from resillm.failover import Failover
from resillm.retry import Backoff, Next, counts_against_target, decide, is_context_length
from resillm.targets import Route, Target

RETRYABLE = [408, 409, 429, 500, 502, 503, 504, 529]
WRONG_TARGET = [401, 403, 404]
ANTHROPIC_TOO_LONG = "prompt is too long: 210345 tokens > 200000 maximum"


def status(
    http_status: int, message: str = "upstream said no", **kwargs: Any
) -> UpstreamStatusError:
    return UpstreamStatusError(http_status, message, provider="p", model="m", **kwargs)


def context_length_errors() -> list[UpstreamStatusError]:
    return [
        status(
            400,
            "This model's maximum context length is 8192 tokens.",
            code="context_length_exceeded",
            error_type="invalid_request_error",
        ),
        status(400, ANTHROPIC_TOO_LONG, error_type="invalid_request_error"),
    ]


def client_errors() -> list[UpstreamStatusError]:
    return [
        status(400, "temperature must be at most 2", error_type="invalid_request_error"),
        status(422, "messages: field required"),
        status(
            400,
            "Your request was rejected by the safety system.",
            code="content_policy_violation",
            error_type="invalid_request_error",
        ),
    ]


# --- decide ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", RETRYABLE)
@pytest.mark.parametrize("others_left", [True, False])
def test_retryable_statuses_are_retried_on_the_same_target(code: int, others_left: bool) -> None:
    assert decide(status(code), others_left=others_left) is Next.RETRY


@pytest.mark.parametrize("code", WRONG_TARGET)
def test_key_or_model_errors_fall_back_to_the_next_target(code: int) -> None:
    assert decide(status(code), others_left=True) is Next.FALLBACK
    assert decide(status(code), others_left=False) is Next.FALLBACK


@pytest.mark.parametrize("error", client_errors(), ids=["400", "422", "content_policy"])
def test_client_errors_go_back_to_the_client(error: UpstreamStatusError) -> None:
    assert decide(error, others_left=True) is Next.CLIENT
    assert not is_context_length(error)


@pytest.mark.parametrize("error", context_length_errors(), ids=["openai_code", "anthropic"])
def test_context_length_errors_fall_back(error: UpstreamStatusError) -> None:
    assert is_context_length(error)
    assert decide(error, others_left=True) is Next.FALLBACK
    assert decide(error, others_left=False) is Next.FALLBACK


def test_timeout_falls_back_unless_it_is_the_last_target() -> None:
    timeout = UpstreamTimeout("no first token", provider="p", model="m")
    assert decide(timeout, others_left=True) is Next.FALLBACK
    assert decide(timeout, others_left=False) is Next.RETRY


def test_connection_errors_are_retried() -> None:
    error = UpstreamConnectError("connection reset", provider="p", model="m")
    assert decide(error, others_left=True) is Next.RETRY


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (status(503), True),
        (status(429), True),
        (status(401), True),
        (UpstreamTimeout("slow", provider="p", model="m"), True),
        (UpstreamConnectError("refused", provider="p", model="m"), True),
        (status(400), False),
        (status(422), False),
        (context_length_errors()[0], False),
        (client_errors()[2], False),
    ],
    ids=["503", "429", "401", "timeout", "connect", "400", "422", "ctx_len", "policy"],
)
def test_only_upstream_failures_count_against_the_target(
    error: UpstreamError, counts: bool
) -> None:
    assert counts_against_target(error) is counts


# --- Backoff -----------------------------------------------------------------------------


def retry_config(**overrides: Any) -> RetryConfig:
    values: dict[str, Any] = {
        "max_attempts": 3,
        "initial_backoff": 0.001,
        "max_backoff": 0.01,
        "multiplier": 2.0,
        "jitter": "none",
    }
    values.update(overrides)
    return RetryConfig(**values)


def test_backoff_grows_exponentially_up_to_max_backoff_without_jitter() -> None:
    backoff = Backoff(retry_config(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0))
    delays = [backoff.delay(n) for n in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_uses_the_configured_multiplier() -> None:
    backoff = Backoff(retry_config(initial_backoff=0.5, max_backoff=100.0, multiplier=3.0))
    assert [backoff.delay(n) for n in range(4)] == pytest.approx([0.5, 1.5, 4.5, 13.5])


def test_backoff_does_not_overflow_after_many_retries() -> None:
    backoff = Backoff(retry_config(initial_backoff=0.1, max_backoff=8.0))
    assert backoff.delay(10_000) == 8.0


def ceilings() -> Iterator[tuple[int, float]]:
    for n in range(6):
        yield n, min(1.0, 0.1 * 2.0**n)


def test_full_jitter_varies_between_zero_and_the_ceiling() -> None:
    backoff = Backoff(
        retry_config(initial_backoff=0.1, max_backoff=1.0, jitter="full"), random.Random(1)
    )
    for n, ceiling in ceilings():
        values = [backoff.delay(n) for _ in range(200)]
        assert all(0.0 <= v <= ceiling for v in values)
        assert len(set(values)) > 100
        assert min(values) < ceiling * 0.25  # spread over the whole range
        assert max(values) > ceiling * 0.75


def test_equal_jitter_varies_between_half_the_ceiling_and_the_ceiling() -> None:
    backoff = Backoff(
        retry_config(initial_backoff=0.1, max_backoff=1.0, jitter="equal"), random.Random(2)
    )
    for n, ceiling in ceilings():
        values = [backoff.delay(n) for _ in range(200)]
        assert all(ceiling / 2 <= v <= ceiling for v in values)
        assert len(set(values)) > 100
        assert min(values) < ceiling * 0.6
        assert max(values) > ceiling * 0.9


def test_jitter_comes_from_the_injected_rng() -> None:
    config = retry_config(initial_backoff=0.1, max_backoff=1.0, jitter="full")
    first = Backoff(config, random.Random(7))
    second = Backoff(config, random.Random(7))
    assert [first.delay(3) for _ in range(5)] == [second.delay(3) for _ in range(5)]


def test_wait_before_retry_uses_the_backoff_when_no_retry_after() -> None:
    backoff = Backoff(retry_config(initial_backoff=0.1, max_backoff=1.0))
    assert backoff.wait_before_retry(0, status(503)) == pytest.approx(0.1)
    assert backoff.wait_before_retry(2, status(503)) == pytest.approx(0.4)
    connect = UpstreamConnectError("reset", provider="p", model="m")
    assert backoff.wait_before_retry(1, connect) == pytest.approx(0.2)


def test_wait_before_retry_honours_retry_after_up_to_max_backoff() -> None:
    backoff = Backoff(retry_config(initial_backoff=0.1, max_backoff=5.0, jitter="full"))
    assert backoff.wait_before_retry(0, status(429, retry_after_s=3.0)) == 3.0
    assert backoff.wait_before_retry(4, status(503, retry_after_s=0.0)) == 0.0
    assert backoff.wait_before_retry(0, status(429, retry_after_s=5.0)) == 5.0
    assert backoff.wait_before_retry(0, status(429, retry_after_s=5.01)) is None


def test_retry_after_seconds_header_reaches_the_backoff() -> None:
    asked = parse_retry_after(CIMultiDict({"Retry-After": "2"}))
    backoff = Backoff(retry_config(max_backoff=5.0))
    assert backoff.wait_before_retry(0, status(429, retry_after_s=asked)) == 2.0


def test_retry_after_http_date_header_reaches_the_backoff() -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    asked = parse_retry_after(CIMultiDict({"Retry-After": when}))
    assert asked is not None
    assert 1.0 < asked <= 3.0  # the date has whole seconds
    error = status(429, retry_after_s=asked)
    assert Backoff(retry_config(max_backoff=5.0)).wait_before_retry(0, error) == asked
    assert Backoff(retry_config(max_backoff=1.0)).wait_before_retry(0, error) is None


# --- the failover loop retrying ----------------------------------------------------------


@dataclass
class FakeUpstream:
    provider: str
    model: str


class SleepRecorder:
    """Stands in for ``asyncio`` inside ``resillm.failover``: records every sleep, waits none."""

    def __init__(self, real_sleep: Callable[[float], Any]) -> None:
        self.sleeps: list[float] = []
        self._real_sleep = real_sleep

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self._real_sleep(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorder = SleepRecorder(asyncio.sleep)
    monkeypatch.setattr(failover_module, "asyncio", recorder)
    return recorder.sleeps


def make_target(name: str, failure_threshold: int = 100) -> Target:
    upstream: Any = FakeUpstream(name, f"{name}-model")
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=failure_threshold))
    return Target(f"{name}/{name}-model", upstream, breaker, 1.0)


def make_route(*targets: Target) -> Route:
    model = ModelConfig(targets=[TargetConfig(provider=t.provider, model=t.model) for t in targets])
    return Route("chat", model, list(targets))


def make_failover(request_s: float = 30.0, **retry: Any) -> Failover:
    config = ResilienceConfig(
        retry=retry_config(**retry), timeouts=TimeoutsConfig(request=request_s)
    )
    return Failover(config)


def new_ctx() -> RequestContext:
    return RequestContext("req-1", "/v1/chat/completions")


class Script:
    """An attempt callable: per target, a list of errors to raise before answering."""

    def __init__(self, **plans: list[UpstreamError | None]) -> None:
        self.plans = {name: list(plan) for name, plan in plans.items()}
        self.calls: list[str] = []

    async def __call__(self, target: Target, seconds_left: float) -> str:
        self.calls.append(target.provider)
        plan = self.plans.get(target.provider, [])
        step = plan.pop(0) if plan else None
        if step is not None:
            raise step
        return f"answer from {target.provider}"


@pytest.mark.anyio
async def test_success_is_not_retried(sleeps: list[float]) -> None:
    a = make_target("a")
    script = Script()
    ctx = new_ctx()
    target, result = await make_failover().run(ctx, make_route(a), script)
    assert (target, result) == (a, "answer from a")
    assert script.calls == ["a"]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (1, 0, 0)
    assert sleeps == []


@pytest.mark.anyio
@pytest.mark.parametrize("code", RETRYABLE)
async def test_retryable_status_is_retried_on_the_same_target(
    code: int, sleeps: list[float]
) -> None:
    a, b = make_target("a"), make_target("b")
    script = Script(a=[status(code)])
    ctx = new_ctx()
    target, _ = await make_failover(initial_backoff=0.001).run(ctx, make_route(a, b), script)
    assert target is a
    assert script.calls == ["a", "a"]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (2, 1, 0)
    assert sleeps == [pytest.approx(0.001)]


@pytest.mark.anyio
async def test_connection_error_is_retried_on_the_same_target(sleeps: list[float]) -> None:
    a, b = make_target("a"), make_target("b")
    script = Script(a=[UpstreamConnectError("reset", provider="a", model="a-model")])
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, make_route(a, b), script)
    assert target is a
    assert script.calls == ["a", "a"]
    assert ctx.retries == 1


@pytest.mark.anyio
@pytest.mark.parametrize("code", WRONG_TARGET)
async def test_key_or_model_error_moves_to_the_next_target_without_retry(
    code: int, sleeps: list[float]
) -> None:
    a, b = make_target("a"), make_target("b")
    script = Script(a=[status(code), status(code), status(code)])
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b"]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (2, 0, 1)
    assert sleeps == []


@pytest.mark.anyio
@pytest.mark.parametrize("index", range(3), ids=["400", "422", "content_policy"])
async def test_client_error_goes_back_to_the_client_after_one_attempt(
    index: int, sleeps: list[float]
) -> None:
    error = client_errors()[index]
    a, b = make_target("a", failure_threshold=1), make_target("b")
    script = Script(a=[error])
    ctx = new_ctx()
    with pytest.raises(UpstreamStatusError) as info:
        await make_failover().run(ctx, make_route(a, b), script)
    assert info.value is error
    assert info.value.status == error.status
    assert info.value.message == error.message
    assert info.value.detail().message == error.message
    assert info.value.detail().code == error.code
    assert script.calls == ["a"]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (1, 0, 0)
    assert sleeps == []
    assert a.circuit.state is CircuitState.CLOSED


@pytest.mark.anyio
@pytest.mark.parametrize("index", range(2), ids=["openai_code", "anthropic"])
async def test_context_length_error_moves_on_and_is_never_resent(
    index: int, sleeps: list[float]
) -> None:
    error = context_length_errors()[index]
    a, b = make_target("a"), make_target("b")
    script = Script(a=[error, error, error])
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b"]
    assert ctx.retries == 0
    assert a.circuit.failures == 0  # the request's size is not the target's fault


@pytest.mark.anyio
async def test_context_length_error_no_target_could_take_goes_back_as_the_upstream_said(
    sleeps: list[float],
) -> None:
    first, last = context_length_errors()
    a, b = make_target("a"), make_target("b")
    script = Script(a=[first, first], b=[last, last])
    with pytest.raises(UpstreamStatusError) as info:
        await make_failover().run(new_ctx(), make_route(a, b), script)
    assert info.value is last
    assert info.value.status == 400
    assert info.value.message == ANTHROPIC_TOO_LONG
    assert script.calls == ["a", "b"]


@pytest.mark.anyio
@pytest.mark.parametrize("max_attempts", [1, 2, 4])
async def test_retries_stop_at_max_attempts(max_attempts: int, sleeps: list[float]) -> None:
    a = make_target("a")
    script = Script(a=[status(503)] * 10)
    ctx = new_ctx()
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover(max_attempts=max_attempts).run(ctx, make_route(a), script)
    assert script.calls == ["a"] * max_attempts
    assert ctx.attempts == max_attempts
    assert ctx.retries == max_attempts - 1
    assert len(info.value.failures) == max_attempts
    assert len(sleeps) == max_attempts - 1


@pytest.mark.anyio
async def test_backoff_sleeps_grow_exponentially_and_are_capped(sleeps: list[float]) -> None:
    a = make_target("a")
    script = Script(a=[status(500)] * 4)
    failover = make_failover(
        max_attempts=5, initial_backoff=0.001, max_backoff=0.005, multiplier=2.0
    )
    await failover.run(new_ctx(), make_route(a), script)
    assert script.calls == ["a"] * 5
    assert sleeps == pytest.approx([0.001, 0.002, 0.004, 0.005])


@pytest.mark.anyio
async def test_retry_after_is_honoured_for_the_wait(sleeps: list[float]) -> None:
    a = make_target("a")
    script = Script(a=[status(429, retry_after_s=0.75), status(503, retry_after_s=0.0)])
    failover = make_failover(max_attempts=3, initial_backoff=0.001, max_backoff=1.0)
    target, _ = await failover.run(new_ctx(), make_route(a), script)
    assert target is a
    assert sleeps == [0.75, 0.0]


@pytest.mark.anyio
async def test_retry_after_longer_than_max_backoff_gives_up_the_target(
    sleeps: list[float],
) -> None:
    a, b = make_target("a"), make_target("b")
    script = Script(a=[status(429, retry_after_s=30.0)] * 3)
    ctx = new_ctx()
    target, _ = await make_failover(max_backoff=1.0).run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b"]
    assert (ctx.retries, ctx.fallbacks) == (0, 1)
    assert sleeps == []


@pytest.mark.anyio
async def test_backoff_that_would_outlive_the_deadline_is_not_slept(
    sleeps: list[float],
) -> None:
    a, b = make_target("a"), make_target("b")
    script = Script(a=[status(503)] * 3)
    failover = make_failover(request_s=2.0, initial_backoff=5.0, max_backoff=10.0)
    target, _ = await failover.run(new_ctx(), make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b"]
    assert sleeps == []


@pytest.mark.anyio
async def test_cancellation_during_backoff_stops_the_retries() -> None:
    a = make_target("a")
    script = Script(a=[status(503)] * 10)
    ctx = new_ctx()
    failover = make_failover(max_attempts=10, initial_backoff=10.0, max_backoff=10.0)
    attempted = asyncio.Event()

    async def attempt(target: Target, seconds_left: float) -> str:
        attempted.set()
        return await script(target, seconds_left)

    task = asyncio.create_task(failover.run(ctx, make_route(a), attempt))
    await attempted.wait()
    for _ in range(3):
        await asyncio.sleep(0)  # into the 10 s backoff sleep
    assert ctx.retries == 1
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.02)
    assert script.calls == ["a"]
    assert ctx.attempts == 1


@pytest.mark.anyio
async def test_timeout_moves_to_the_next_target_at_once(sleeps: list[float]) -> None:
    a, b = make_target("a"), make_target("b")
    script = Script(a=[UpstreamTimeout("no first token", provider="a", model="a-model")])
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b"]
    assert (ctx.retries, ctx.fallbacks) == (0, 1)
    assert sleeps == []


@pytest.mark.anyio
async def test_timeout_on_the_last_target_is_retried(sleeps: list[float]) -> None:
    a, b = make_target("a"), make_target("b")
    a_slow = UpstreamTimeout("no first token", provider="a", model="a-model")
    b_slow = UpstreamTimeout("no first token", provider="b", model="b-model")
    script = Script(a=[a_slow] * 5, b=[b_slow, b_slow])
    ctx = new_ctx()
    target, _ = await make_failover(max_attempts=3).run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b", "b", "b"]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (4, 2, 1)


@pytest.mark.anyio
async def test_no_backoff_sleep_before_falling_back_from_a_circuit_just_opened(
    sleeps: list[float],
) -> None:
    a, b = make_target("a", failure_threshold=1), make_target("b")
    script = Script(a=[status(503)] * 3)
    ctx = new_ctx()
    target, _ = await make_failover(max_attempts=3).run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == ["a", "b"]
    assert a.circuit.state is CircuitState.OPEN
    assert sleeps == []  # the retry the open circuit will refuse is not waited for
    assert ctx.retries == 0  # and not counted: it never happened
