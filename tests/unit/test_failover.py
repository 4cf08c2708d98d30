"""The failover loop over an alias's chain: fallbacks, final errors, alias fallbacks, deadline."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from providers.base import Provider
from providers.mock import MockProvider
from resillm.circuit import CircuitBreaker, CircuitRegistry
from resillm.config import (
    CircuitBreakerConfig,
    MockProviderConfig,
    ModelConfig,
    ResilienceConfig,
    RetryConfig,
    TargetConfig,
    TimeoutsConfig,
)
from resillm.config_loader import config_from_dict
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
from resillm.failover import Failover
from resillm.targets import Route, Target, build_routes


@dataclass
class FakeUpstream:
    provider: str
    model: str


def make_target(name: str, breaker: CircuitBreaker | None = None) -> Target:
    upstream: Any = FakeUpstream(name, f"{name}-model")
    circuit = breaker or CircuitBreaker(CircuitBreakerConfig(failure_threshold=100))
    return Target(f"{name}/{name}-model", upstream, circuit, 1.0)


def make_route(*targets: Target) -> Route:
    model = ModelConfig(targets=[TargetConfig(provider=t.provider, model=t.model) for t in targets])
    return Route("chat", model, list(targets))


def make_failover(max_attempts: int = 2, request_s: float = 30.0) -> Failover:
    retry = RetryConfig(
        max_attempts=max_attempts, initial_backoff=0.001, max_backoff=0.004, jitter="none"
    )
    return Failover(ResilienceConfig(retry=retry, timeouts=TimeoutsConfig(request=request_s)))


def new_ctx() -> RequestContext:
    return RequestContext("req-1", "/v1/chat/completions")


def failed(target: Target, http_status: int, **kwargs: Any) -> UpstreamStatusError:
    return UpstreamStatusError(
        http_status,
        f"{target.provider} said {http_status}",
        provider=target.provider,
        model=target.model,
        **kwargs,
    )


def timed_out(target: Target) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"{target.provider} sent nothing", provider=target.provider, model=target.model
    )


class Script:
    """An attempt callable: per target id, the errors to raise before answering."""

    def __init__(self, plans: dict[str, list[UpstreamError]] | None = None) -> None:
        self.plans = {key: list(plan) for key, plan in (plans or {}).items()}
        self.calls: list[str] = []
        self.seconds_left: list[float] = []

    async def __call__(self, target: Target, seconds_left: float) -> str:
        self.calls.append(target.id)
        self.seconds_left.append(seconds_left)
        plan = self.plans.get(target.id, [])
        if plan:
            raise plan.pop(0)
        return f"answer from {target.id}"


def attempts_json(error: GatewayError) -> list[dict[str, Any]]:
    body = json.loads(error.body())
    attempts: list[dict[str, Any]] = body["error"]["attempts"]
    return attempts


# --- success and fallback ----------------------------------------------------------------


@pytest.mark.anyio
async def test_primary_success_uses_no_fallback() -> None:
    a, b = make_target("a"), make_target("b")
    script = Script()
    ctx = new_ctx()
    target, result = await make_failover(request_s=30.0).run(ctx, make_route(a, b), script)
    assert target is a
    assert result == "answer from a/a-model"
    assert script.calls == ["a/a-model"]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (1, 0, 0)
    assert 29.0 < script.seconds_left[0] <= 30.0  # the attempt is told the time left


@pytest.mark.anyio
async def test_primary_failure_falls_back_and_returns_the_answering_target() -> None:
    a, b = make_target("a"), make_target("b")
    script = Script({a.id: [failed(a, 503), failed(a, 500)]})
    ctx = new_ctx()
    target, result = await make_failover(max_attempts=2).run(ctx, make_route(a, b), script)
    assert target is b
    assert result == "answer from b/b-model"
    assert script.calls == [a.id, a.id, b.id]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (3, 1, 1)


@pytest.mark.anyio
async def test_targets_with_open_circuits_are_skipped() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, open_timeout=60.0))
    breaker.failure()
    a, b, c = make_target("a", breaker), make_target("b"), make_target("c")
    script = Script({b.id: [failed(b, 401)]})
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, make_route(a, b, c), script)
    assert target is c
    assert script.calls == [b.id, c.id]
    assert ctx.attempts == 2


@pytest.mark.anyio
async def test_attempts_retries_and_fallbacks_are_counted_across_targets() -> None:
    a, b, c = make_target("a"), make_target("b"), make_target("c")
    script = Script(
        {
            a.id: [failed(a, 503), failed(a, 502), failed(a, 529)],
            b.id: [failed(b, 429), failed(b, 404)],
        }
    )
    ctx = new_ctx()
    target, _ = await make_failover(max_attempts=3).run(ctx, make_route(a, b, c), script)
    assert target is c
    assert script.calls == [a.id] * 3 + [b.id] * 2 + [c.id]
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (6, 3, 2)


# --- when everything fails ---------------------------------------------------------------


@pytest.mark.anyio
async def test_all_targets_failing_for_mixed_reasons_is_a_502_listing_each_attempt() -> None:
    a, b, c = make_target("a"), make_target("b"), make_target("c")
    script = Script(
        {
            a.id: [failed(a, 503), failed(a, 500)],
            b.id: [failed(b, 401)],
            c.id: [timed_out(c), timed_out(c)],
        }
    )
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover(max_attempts=2).run(new_ctx(), make_route(a, b, c), script)
    error = info.value
    assert error.status == 502
    assert error.code == "upstream_error"
    assert attempts_json(error) == [
        {"provider": "a", "model": "a-model", "status": 503, "message": "a said 503"},
        {"provider": "a", "model": "a-model", "status": 500, "message": "a said 500"},
        {"provider": "b", "model": "b-model", "status": 401, "message": "b said 401"},
        {"provider": "c", "model": "c-model", "status": None, "message": "c sent nothing"},
        {"provider": "c", "model": "c-model", "status": None, "message": "c sent nothing"},
    ]


@pytest.mark.anyio
async def test_all_targets_rate_limited_is_a_429_with_retry_after() -> None:
    a, b = make_target("a"), make_target("b")
    # both ask for longer than max_backoff, so each is given up after one attempt
    script = Script(
        {
            a.id: [failed(a, 429, retry_after_s=5.0)],
            b.id: [failed(b, 429, retry_after_s=2.2)],
        }
    )
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover().run(new_ctx(), make_route(a, b), script)
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "3"
    assert [entry["status"] for entry in attempts_json(info.value)] == [429, 429]
    assert script.calls == [a.id, b.id]


@pytest.mark.anyio
async def test_all_targets_rate_limited_without_retry_after_has_no_header() -> None:
    a, b = make_target("a"), make_target("b")
    script = Script({a.id: [failed(a, 429)] * 2, b.id: [failed(b, 429)] * 2})
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover().run(new_ctx(), make_route(a, b), script)
    assert info.value.status == 429
    assert "Retry-After" not in info.value.headers


@pytest.mark.anyio
async def test_all_targets_timed_out_is_a_504() -> None:
    a, b = make_target("a"), make_target("b")
    script = Script({a.id: [timed_out(a)] * 2, b.id: [timed_out(b)] * 2})
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover(max_attempts=2).run(new_ctx(), make_route(a, b), script)
    assert info.value.status == 504
    assert script.calls == [a.id, b.id, b.id]
    assert len(attempts_json(info.value)) == 3


@pytest.mark.anyio
async def test_every_circuit_open_is_a_503_circuit_open_with_retry_after() -> None:
    config = CircuitBreakerConfig(failure_threshold=1, open_timeout=42.0)
    a, b = make_target("a", CircuitBreaker(config)), make_target("b", CircuitBreaker(config))
    a.circuit.failure()
    b.circuit.failure()
    script = Script()
    ctx = new_ctx()
    with pytest.raises(CircuitOpen) as info:
        await make_failover().run(ctx, make_route(a, b), script)
    assert info.value.status == 503
    assert info.value.code == "circuit_open"
    assert 1 <= int(info.value.headers["Retry-After"]) <= 42
    assert script.calls == []
    assert ctx.attempts == 0


@pytest.mark.anyio
async def test_some_failed_and_the_rest_open_is_all_targets_failed_not_circuit_open() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1))
    breaker.failure()
    a, b = make_target("a"), make_target("b", breaker)
    script = Script({a.id: [failed(a, 503)] * 2})
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover().run(new_ctx(), make_route(a, b), script)
    assert info.value.status == 502
    assert script.calls == [a.id, a.id]


# --- alias-level fallbacks ---------------------------------------------------------------


def routes_for(models: dict[str, Any]) -> tuple[dict[str, Route], CircuitRegistry]:
    config = config_from_dict(
        {"providers": {"m": {"type": "mock"}, "n": {"type": "mock"}}, "models": models}
    )
    providers: dict[str, Provider] = {}
    for name, provider_config in config.providers.items():
        assert isinstance(provider_config, MockProviderConfig)
        providers[name] = MockProvider(name, provider_config)
    circuits = CircuitRegistry(config.resilience.circuit_breaker)
    return build_routes(config, providers, circuits), circuits


def test_chain_is_own_targets_then_the_fallback_alias_targets() -> None:
    routes, circuits = routes_for(
        {
            "big": {
                "targets": [
                    {"provider": "m", "model": "big-1"},
                    {"provider": "n", "model": "big-2"},
                ],
                "fallbacks": ["small"],
            },
            "small": {"targets": [{"provider": "m", "model": "small-1"}]},
        }
    )
    assert [t.id for t in routes["big"].targets] == ["m/big-1", "n/big-2"]
    assert [t.id for t in routes["big"].chain] == ["m/big-1", "n/big-2", "m/small-1"]
    assert [t.id for t in routes["small"].chain] == ["m/small-1"]
    # one circuit per target, shared by every route that reaches it
    assert routes["big"].chain[2] is routes["small"].targets[0]
    assert routes["big"].chain[2].circuit is circuits.get("m/small-1")


def test_mutual_fallbacks_give_finite_chains_with_each_target_once() -> None:
    routes, _ = routes_for(
        {
            "a": {
                "targets": [{"provider": "m", "model": "a1"}, {"provider": "m", "model": "shared"}],
                "fallbacks": ["b"],
            },
            "b": {
                "targets": [{"provider": "n", "model": "b1"}, {"provider": "m", "model": "shared"}],
                "fallbacks": ["a", "c"],
            },
            "c": {"targets": [{"provider": "n", "model": "c1"}], "fallbacks": ["a", "b"]},
        }
    )
    assert [t.id for t in routes["a"].chain] == ["m/a1", "m/shared", "n/b1", "n/c1"]
    assert [t.id for t in routes["b"].chain] == ["n/b1", "m/shared", "m/a1", "n/c1"]
    assert [t.id for t in routes["c"].chain] == ["n/c1", "m/a1", "m/shared", "n/b1"]
    for route in routes.values():
        ids = [t.id for t in route.chain]
        assert len(ids) == len(set(ids))


def test_a_target_with_its_own_key_is_a_separate_target() -> None:
    routes, _ = routes_for(
        {
            "a": {
                "targets": [
                    {"provider": "m", "model": "x"},
                    {"provider": "m", "model": "x", "api_key": "sk-second-key-123456"},
                ]
            }
        }
    )
    first, second = routes["a"].chain
    assert first.id == "m/x"
    assert second.id.startswith("m/x#")
    assert "sk-second" not in second.id
    assert first.circuit is not second.circuit


@pytest.mark.anyio
async def test_failover_walks_into_the_fallback_alias_and_stops_at_the_chain_end() -> None:
    routes, _ = routes_for(
        {
            "a": {"targets": [{"provider": "m", "model": "a1"}], "fallbacks": ["b"]},
            "b": {"targets": [{"provider": "n", "model": "b1"}], "fallbacks": ["a"]},
        }
    )
    route = routes["a"]
    a1, b1 = route.chain

    script = Script({a1.id: [failed(a1, 503)] * 2})
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, route, script)
    assert target is b1
    assert ctx.fallbacks == 1

    script = Script({a1.id: [failed(a1, 503)] * 2, b1.id: [failed(b1, 500)] * 2})
    with pytest.raises(AllTargetsFailed):
        await make_failover().run(new_ctx(), route, script)
    assert script.calls == [a1.id, a1.id, b1.id, b1.id]


# --- the request deadline ----------------------------------------------------------------


@pytest.mark.anyio
async def test_attempt_that_uses_up_the_deadline_ends_the_request_with_504() -> None:
    a, b = make_target("a"), make_target("b")
    calls: list[str] = []

    async def attempt(target: Target, seconds_left: float) -> str:
        # the router's attempts bound themselves by the time left
        calls.append(target.id)
        try:
            async with asyncio.timeout(seconds_left):
                await asyncio.Event().wait()
        except TimeoutError:
            raise timed_out(target) from None
        raise AssertionError("never answers")

    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await make_failover(request_s=0.2).run(new_ctx(), make_route(a, b), attempt)
    assert time.monotonic() - started < 1.0
    assert info.value.status == 504
    assert calls == [a.id]  # no time was left for b


@pytest.mark.anyio
async def test_hanging_attempt_cannot_outlive_the_request_deadline() -> None:
    a, b = make_target("a"), make_target("b")
    calls: list[str] = []

    async def attempt(target: Target, seconds_left: float) -> str:
        calls.append(target.id)
        await asyncio.Event().wait()  # never answers, ignores seconds_left
        raise AssertionError("never answers")

    with pytest.raises(GatewayError) as info:
        async with asyncio.timeout(1.0):  # guard: fail instead of hanging the suite
            await make_failover(request_s=0.2).run(new_ctx(), make_route(a, b), attempt)
    assert info.value.status == 504
    assert calls == [a.id]  # the deadline is spent: b is not started


# --- the loop's overrides ----------------------------------------------------------------


@pytest.mark.anyio
async def test_run_can_be_given_its_own_chain_and_max_attempts() -> None:
    a, b, c = make_target("a"), make_target("b"), make_target("c")
    script = Script({c.id: [failed(c, 503)] * 5})
    ctx = new_ctx()
    with pytest.raises(AllTargetsFailed):
        await make_failover(max_attempts=2).run(
            ctx, make_route(a, b), script, chain=[c], max_attempts=4
        )
    assert script.calls == [c.id] * 4
    assert ctx.retries == 3


@pytest.mark.anyio
async def test_run_with_a_spent_deadline_makes_no_attempt_and_is_a_504() -> None:
    a = make_target("a")
    script = Script()
    deadline = asyncio.get_running_loop().time() - 0.001
    with pytest.raises(AllTargetsFailed) as info:
        await make_failover().run(new_ctx(), make_route(a), script, deadline=deadline)
    assert info.value.status == 504
    assert script.calls == []


# --- a target whose API cannot express the request ---------------------------------------


@pytest.mark.anyio
async def test_a_request_one_target_cannot_express_goes_to_the_next_target() -> None:
    a, b = make_target("a"), make_target("b")
    cannot = InvalidRequest("this provider does not support n > 1", param="n")
    script = Script({a.id: [cannot]})  # type: ignore[list-item]
    ctx = new_ctx()
    target, _ = await make_failover().run(ctx, make_route(a, b), script)
    assert target is b
    assert script.calls == [a.id, b.id]  # not retried on a: it would refuse again
    assert a.circuit.failures == 0  # nothing went wrong upstream


@pytest.mark.anyio
async def test_a_request_no_target_can_express_is_that_400() -> None:
    a = make_target("a")
    cannot = InvalidRequest("this provider does not support n > 1", param="n")
    with pytest.raises(InvalidRequest) as raised:
        await make_failover().run(new_ctx(), make_route(a), Script({a.id: [cannot]}))  # type: ignore[list-item]
    assert raised.value is cannot
    assert raised.value.status == 400
