"""Load-balancing strategies order an alias's targets; health goes first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from resillm.balance import STALE_AFTER_S, Balancer, TargetStats
from resillm.circuit import CircuitBreaker
from resillm.config import CircuitBreakerConfig, ModelConfig, TargetConfig
from resillm.targets import Route, Target


@dataclass
class FakeUpstream:
    provider: str
    model: str


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def target(name: str, weight: float = 1.0) -> Target:
    upstream: Any = FakeUpstream(name, "m")
    circuit = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, open_timeout=60.0))
    return Target(f"{name}/m", upstream, circuit, weight, stats=TargetStats())


def balancer(strategy: str, *targets: Target, clock: Clock | None = None, **kw: Any) -> Balancer:
    config = ModelConfig(
        targets=[TargetConfig(provider=t.provider, model="m") for t in targets],
        strategy=strategy,  # type: ignore[arg-type]
    )
    return Balancer(Route("chat", config, list(targets)), clock=clock or Clock(), **kw)


def firsts(b: Balancer, n: int) -> list[str]:
    return [b.order()[0].provider for _ in range(n)]


def test_priority_keeps_config_order() -> None:
    a, b, c = target("a"), target("b"), target("c")
    assert [t.provider for t in balancer("priority", a, b, c).order()] == ["a", "b", "c"]


def test_round_robin_alternates_exactly() -> None:
    b = balancer("round_robin", target("a"), target("b"), target("c"))
    assert firsts(b, 6) == ["a", "b", "c", "a", "b", "c"]
    # The rest of each order is the fallback chain, every target once.
    assert sorted(t.provider for t in b.order()) == ["a", "b", "c"]


def test_weighted_two_to_one_is_interleaved_and_exact_over_300() -> None:
    b = balancer("weighted", target("a", 2), target("b", 1))
    picks = firsts(b, 300)
    assert picks.count("a") == 200 and picks.count("b") == 100
    # Smooth: never three a's in a row, b never twice in a row.
    run = "".join(picks)
    assert "aaa" not in run and "bb" not in run


def test_weighted_uneven_weights_stay_within_a_few_percent() -> None:
    b = balancer("weighted", target("a", 5), target("b", 3), target("c", 1))
    picks = firsts(b, 900)
    assert abs(picks.count("a") - 500) <= 5
    assert abs(picks.count("b") - 300) <= 5
    assert abs(picks.count("c") - 100) <= 5


def test_least_latency_prefers_the_faster_and_measures_stale_targets_again() -> None:
    clock = Clock()
    fast, slow = target("fast"), target("slow")
    b = balancer("least_latency", slow, fast, clock=clock)
    slow.stats.observe(2.0, clock.now)
    fast.stats.observe(0.1, clock.now)
    assert firsts(b, 3) == ["fast", "fast", "fast"]
    fast.stats.observe(0.1, clock.now + STALE_AFTER_S)  # fast keeps being measured
    clock.now += STALE_AFTER_S + 1  # slow has not been measured for a while
    assert b.order()[0].provider == "slow"  # tried again, to learn if it recovered
    for _ in range(10):  # the EWMA follows the new figures within a few samples
        slow.stats.observe(0.01, clock.now)
    fast.stats.observe(0.1, clock.now)
    assert b.order()[0].provider == "slow"  # it did: it is the fast one now


def test_least_latency_measures_unmeasured_targets_first() -> None:
    a, b_ = target("a"), target("b")
    b = balancer("least_latency", a, b_)
    a.stats.observe(0.05, 1000.0)
    assert b.order()[0].provider == "b"


def test_least_busy_picks_fewest_in_flight() -> None:
    a, b_, c = target("a"), target("b"), target("c")
    a.stats.inflight, b_.stats.inflight, c.stats.inflight = 4, 1, 2
    assert [t.provider for t in balancer("least_busy", a, b_, c).order()] == ["b", "c", "a"]


def test_cost_picks_the_cheapest_and_unknown_prices_go_last() -> None:
    a, b_, c = target("a"), target("b"), target("c")
    prices = {"a": 3.0, "b": None, "c": 1.0}
    b = balancer("cost", a, b_, c, cost_of=lambda t, _p, _c: prices[t.provider])
    assert [t.provider for t in b.order()] == ["c", "a", "b"]


def test_cost_depends_on_the_requests_expected_tokens() -> None:
    # "reader" is cheap to read and dear to write; "writer" the other way round.
    per_token = {"reader": (1.0, 10.0), "writer": (5.0, 2.0)}

    def cost_of(t: Target, prompt: int, completion: int) -> float:
        read, write = per_token[t.provider]
        return read * prompt + write * completion

    b = balancer("cost", target("reader"), target("writer"), cost_of=cost_of)
    assert b.order((10_000, 10))[0].provider == "reader"  # a long prompt, a short answer
    assert b.order((10, 10_000))[0].provider == "writer"  # a short prompt, a long answer


@pytest.mark.parametrize("strategy", ["priority", "round_robin", "least_busy", "least_latency"])
def test_open_circuits_go_last_whatever_the_strategy(strategy: str) -> None:
    a, b_ = target("a"), target("b")
    a.circuit.failure()  # threshold 1: open
    b = balancer(strategy, a, b_)
    assert [[t.provider for t in b.order()] for _ in range(4)] == [["b", "a"]] * 4


def test_a_rate_limited_target_sits_out_until_its_reset() -> None:
    clock = Clock()
    a, b_ = target("a"), target("b")
    a.stats.rate_limited_until = clock.now + 5
    b = balancer("priority", a, b_, clock=clock)
    assert [t.provider for t in b.order()] == ["b"]
    clock.now += 6
    assert [t.provider for t in b.order()] == ["a", "b"]


def test_when_every_target_is_rate_limited_they_are_still_tried() -> None:
    clock = Clock()
    a, b_ = target("a"), target("b")
    a.stats.rate_limited_until = b_.stats.rate_limited_until = clock.now + 5
    assert [t.provider for t in balancer("priority", a, b_, clock=clock).order()] == ["a", "b"]


def test_chain_appends_the_fallback_alias_targets_after_the_ordered_own() -> None:
    a, b_, f = target("a"), target("b"), target("f")
    b = balancer("round_robin", a, b_)
    b.route.chain = [a, b_, f]
    assert [t.provider for t in b.chain()] == ["a", "b", "f"]
    assert [t.provider for t in b.chain()] == ["b", "a", "f"]
