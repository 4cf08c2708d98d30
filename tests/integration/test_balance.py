"""Load balancing through the real gateway: strategies pick targets, resilience still holds."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import openai
import pytest

from resillm.mock_upstream import MockUpstream
from tests.conftest import run_gateway

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hi"}]


def two_providers(upstream: MockUpstream, strategy: str, **per: dict[str, Any]) -> dict[str, Any]:
    """Alias `chat` over providers `a` and `b` (same mock server, different headers)."""
    base = {"type": "openai_compatible", "base_url": upstream.url + "/v1"}
    return {
        "providers": {name: {**base, **per.get(name, {})} for name in ("a", "b")},
        "models": {
            "chat": {
                "strategy": strategy,
                "targets": [{"provider": "a", "model": "ma"}, {"provider": "b", "model": "mb"}],
            }
        },
        "resilience": {"retry": {"initial_backoff": "5ms", "max_backoff": "20ms"}},
    }


async def providers_of(url: str, n: int, *, concurrency: int = 1) -> list[str]:
    """Who answered each of ``n`` requests."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> str:
            async with semaphore:
                raw = await sdk.chat.completions.with_raw_response.create(
                    model="chat",
                    messages=HELLO,  # type: ignore[arg-type]
                )
                return raw.headers["x-resillm-provider"]

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_round_robin_alternates(upstream: MockUpstream) -> None:
    async with run_gateway(two_providers(upstream, "round_robin")) as gw:
        answered = await providers_of(gw.url, 6)
    assert answered == ["a", "b", "a", "b", "a", "b"]


async def test_weighted_two_to_one(upstream: MockUpstream) -> None:
    config = two_providers(upstream, "weighted")
    config["models"]["chat"]["targets"][0]["weight"] = 2
    async with run_gateway(config) as gw:
        answered = await providers_of(gw.url, 30)
    assert Counter(answered) == {"a": 20, "b": 10}
    assert "bb" not in "".join(answered)


async def test_least_latency_moves_to_the_faster_upstream(upstream: MockUpstream) -> None:
    config = two_providers(upstream, "least_latency", a={"headers": {"x-mock-latency": "0.15"}})
    async with run_gateway(config) as gw:
        answered = await providers_of(gw.url, 12)
    # Each is measured first; then the fast one takes the traffic.
    assert answered[2:].count("b") == 10


async def test_least_busy_spreads_concurrent_load(upstream: MockUpstream) -> None:
    slow = {"headers": {"x-mock-latency": "0.2"}}
    config = two_providers(upstream, "least_busy", a=slow, b=slow)
    async with run_gateway(config) as gw:
        answered = await providers_of(gw.url, 8, concurrency=8)
    assert Counter(answered) == {"a": 4, "b": 4}  # priority order would send all 8 to a


async def test_cost_picks_the_cheaper_model() -> None:
    config = {
        "providers": {"m": {"type": "mock"}, "n": {"type": "mock"}},
        "models": {
            "chat": {
                "strategy": "cost",
                "targets": [
                    {"provider": "m", "model": "gpt-4o"},
                    {"provider": "n", "model": "gpt-4o-mini"},
                ],
            }
        },
    }
    async with run_gateway(config) as gw:
        answered = await providers_of(gw.url, 3)
    assert answered == ["n", "n", "n"]


async def test_the_chosen_target_failing_falls_back_in_strategy_order(
    upstream: MockUpstream,
) -> None:
    config = two_providers(upstream, "round_robin", a={"headers": {"x-mock-fail-status": "500"}})
    config["resilience"]["retry"]["max_attempts"] = 1
    config["resilience"]["circuit_breaker"] = {"failure_threshold": 100}
    async with run_gateway(config) as gw:
        answered = await providers_of(gw.url, 4)
    # Every request is answered: when round robin starts at `a`, it falls back to `b`.
    assert answered == ["b", "b", "b", "b"]
    assert upstream.stats.by_model["ma"] == 2  # `a` was first for every other request


async def test_least_latency_comes_back_when_the_slow_one_recovers(
    upstream: MockUpstream, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resillm.balance
    from resillm import create_app
    from tests.conftest import serve_asgi
    from tests.integration.test_reload import write

    monkeypatch.setattr(resillm.balance, "STALE_AFTER_S", 0.3)  # re-measure quickly
    slow = {"headers": {"x-mock-latency": "0.1"}}
    path = tmp_path / "resillm.yaml"
    config = two_providers(upstream, "least_latency", a=slow)
    write(path, config)
    gateway = create_app(path)
    async with serve_asgi(gateway, config) as url:
        first = await providers_of(url, 8)
        assert first[2:].count("b") >= 5  # a is slow: b takes the traffic (a is re-probed)
        # a recovers and b slows down (a reload keeps the latency figures per target).
        write(path, two_providers(upstream, "least_latency", b=slow))
        assert (await gateway.reload()).applied
        answered: list[str] = []
        while len(answered) < 80 and not (len(answered) >= 10 and answered[-10:].count("a") >= 8):
            answered += await providers_of(url, 1)
            await asyncio.sleep(0.02)
    # Measured again, a has the traffic back; b, now stale, is only probed now and then.
    assert answered[-10:].count("a") >= 8, answered
