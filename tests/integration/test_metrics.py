"""Prometheus metrics after real traffic through the gateway (SPEC section 7).

Each test scrapes ``/metrics`` before and after its traffic and checks that every counter
moved by exactly what the traffic explains: names, types and labels as dashboards use them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from resillm.mock_upstream import MockUpstream
from tests.conftest import run_gateway

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Count me."}]
SPEC_METRICS = {
    "resillm_requests_total": "counter",
    "resillm_request_duration_seconds": "histogram",
    "resillm_time_to_first_token_seconds": "histogram",
    "resillm_upstream_attempts_total": "counter",
    "resillm_retries_total": "counter",
    "resillm_fallbacks_total": "counter",
    "resillm_circuit_state": "gauge",
    "resillm_tokens_total": "counter",
    "resillm_cost_usd_total": "counter",
    "resillm_cache_requests_total": "counter",
    "resillm_budget_spent_usd": "gauge",
    "resillm_config_reloads_total": "counter",
    "resillm_inflight_requests": "gauge",
}
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
BAD = "bad/bad-model"
GOOD = "good/good-model"


@dataclass
class Scrape:
    """One ``/metrics`` page, parsed from the Prometheus text format."""

    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                scrape.types[name] = kind
            elif line and not line.startswith("#"):
                match = _SAMPLE_RE.match(line)
                assert match, f"not a sample line: {line!r}"
                name, labels, value = match.groups()
                key = frozenset(_LABEL_RE.findall(labels or ""))
                assert (name, key) not in scrape.samples, f"duplicate sample {line!r}"
                scrape.samples[(name, key)] = float(value)
        return scrape

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


class Gateway:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def scrape(self) -> Scrape:
        async with self.session.get(self.url + "/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            return Scrape.parse(await response.text())

    async def chat(self, *, stream: bool = False, **extra: Any) -> tuple[int, Any]:
        body = {"model": "chat", "messages": HELLO, "stream": stream, **extra}
        async with self.session.post(self.url + "/v1/chat/completions", json=body) as response:
            if stream and response.status == 200:
                return response.status, await response.read()
            return response.status, await response.json(content_type=None)


def provider(mock: MockUpstream, **faults: str) -> dict[str, Any]:
    headers = {f"x-mock-{name.replace('_', '-')}": value for name, value in faults.items()}
    return {"type": "openai_compatible", "base_url": mock.url + "/v1", "headers": headers}


def config_for(
    mock: MockUpstream,
    *,
    bad: dict[str, str] | None = None,
    only_bad: bool = False,
    circuit_breaker: dict[str, Any] | None = None,
    pricing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Alias ``chat``: ``bad/bad-model`` (with ``bad`` faults) then ``good/good-model``;
    ``good`` alone without ``bad``; ``bad`` alone with ``only_bad``."""
    providers: dict[str, Any] = {"good": provider(mock)}
    targets = [{"provider": "good", "model": "good-model"}]
    if bad is not None:
        providers["bad"] = provider(mock, **bad)
        targets = [{"provider": "bad", "model": "bad-model"}, *([] if only_bad else targets)]
        if only_bad:
            del providers["good"]
    model: dict[str, Any] = {"targets": targets}
    if pricing is not None:
        model["pricing"] = pricing
    return {
        "providers": providers,
        "models": {"chat": model},
        "resilience": {
            "retry": {
                "max_attempts": 2,
                "initial_backoff": "1ms",
                "max_backoff": "5ms",
                "jitter": "none",
            },
            "circuit_breaker": circuit_breaker or {},
            "stream_recovery": False,
        },
        "logging": {"level": "error"},
    }


@asynccontextmanager
async def gateway(config: dict[str, Any]) -> AsyncIterator[Gateway]:
    async with run_gateway(config) as server, aiohttp.ClientSession() as session:
        yield Gateway(server.url, session)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def test_every_spec_metric_is_exported_with_its_type(upstream: MockUpstream) -> None:
    async with gateway(config_for(upstream)) as gw:
        assert (await gw.chat())[0] == 200
        assert (await gw.chat(stream=True))[0] == 200
        scrape = await gw.scrape()
    for name, kind in SPEC_METRICS.items():
        assert scrape.types.get(name) == kind, name
    assert scrape.value("resillm_inflight_requests") == 0
    assert scrape.value("resillm_circuit_state", target=GOOD) == 0
    buckets = [labels for labels in scrape.labelsets("resillm_request_duration_seconds_bucket")]
    assert {b["le"] for b in buckets} >= {"0.005", "1.0", "60.0", "600.0", "+Inf"}
    for labels in scrape.labelsets("resillm_requests_total"):
        assert set(labels) == {"model", "provider", "status"}
    for labels in scrape.labelsets("resillm_upstream_attempts_total"):
        assert set(labels) == {"provider", "model", "outcome"}
    for labels in scrape.labelsets("resillm_tokens_total"):
        assert set(labels) == {"model", "provider", "kind"}


async def test_success_counts_once_with_its_tokens(upstream: MockUpstream) -> None:
    async with gateway(config_for(upstream)) as gw:
        before = await gw.scrape()
        status, body = await gw.chat()
        after = await gw.scrape()
    assert status == 200
    usage = body["usage"]
    by_target = {"model": "chat", "provider": "good"}
    assert delta(before, after, "resillm_requests_total", **by_target, status="200") == 1
    assert delta(before, after, "resillm_request_duration_seconds_count", **by_target) == 1
    attempts = "resillm_upstream_attempts_total"
    assert (
        delta(before, after, attempts, provider="good", model="good-model", outcome="success") == 1
    )
    assert after.labelsets(attempts) == [
        {"provider": "good", "model": "good-model", "outcome": "success"}
    ]  # no other outcome was counted
    tokens = "resillm_tokens_total"
    assert delta(before, after, tokens, **by_target, kind="prompt") == usage["prompt_tokens"]
    assert (
        delta(before, after, tokens, **by_target, kind="completion") == usage["completion_tokens"]
    )
    assert after.labelsets("resillm_retries_total") == []
    assert after.labelsets("resillm_fallbacks_total") == []
    assert delta(before, after, "resillm_time_to_first_token_seconds_count", **by_target) == 0
    assert after.value("resillm_inflight_requests") == 0


async def test_retry_counts_the_failed_attempt_and_the_retry(upstream: MockUpstream) -> None:
    async with gateway(config_for(upstream, bad={"fail_first": "1"}, only_bad=True)) as gw:
        before = await gw.scrape()
        assert (await gw.chat())[0] == 200
        after = await gw.scrape()
    bad = {"provider": "bad", "model": "bad-model"}
    attempts = "resillm_upstream_attempts_total"
    assert delta(before, after, attempts, **bad, outcome="server_error") == 1
    assert delta(before, after, attempts, **bad, outcome="success") == 1
    assert delta(before, after, "resillm_retries_total", **bad) == 1
    requests = "resillm_requests_total"
    assert delta(before, after, requests, model="chat", provider="bad", status="200") == 1
    assert after.labelsets("resillm_fallbacks_total") == []


async def test_fallback_counts_the_move_between_targets(upstream: MockUpstream) -> None:
    async with gateway(config_for(upstream, bad={"fail_status": "503"})) as gw:
        before = await gw.scrape()
        assert (await gw.chat())[0] == 200
        after = await gw.scrape()
    attempts = "resillm_upstream_attempts_total"
    bad = {"provider": "bad", "model": "bad-model"}
    assert delta(before, after, attempts, **bad, outcome="server_error") == 2  # max_attempts
    assert delta(before, after, "resillm_retries_total", **bad) == 1
    good = {"provider": "good", "model": "good-model"}
    assert delta(before, after, attempts, **good, outcome="success") == 1
    fallbacks = "resillm_fallbacks_total"
    assert delta(before, after, fallbacks, model="chat", from_target=BAD, to_target=GOOD) == 1
    assert after.labelsets(fallbacks) == [{"model": "chat", "from_target": BAD, "to_target": GOOD}]
    assert (
        delta(before, after, "resillm_requests_total", model="chat", provider="good", status="200")
        == 1
    )


async def test_open_circuit_answers_503_without_an_attempt_and_gauge_says_2(
    upstream: MockUpstream,
) -> None:
    config = config_for(
        upstream,
        bad={"fail_status": "500"},
        only_bad=True,
        circuit_breaker={"failure_threshold": 2, "open_timeout": "60s"},
    )
    async with gateway(config) as gw:
        assert (await gw.scrape()).value("resillm_circuit_state", target=BAD) == 0
        status, _ = await gw.chat()
        assert status == 502  # two failures: the circuit opens
        before = await gw.scrape()
        sent = upstream.stats.requests
        status, body = await gw.chat()
        after = await gw.scrape()
    assert status == 503 and body["error"]["code"] == "circuit_open"
    assert upstream.stats.requests == sent
    assert after.value("resillm_circuit_state", target=BAD) == 2
    requests = "resillm_requests_total"
    assert delta(before, after, requests, model="chat", provider="none", status="503") == 1
    assert before.value(requests, model="chat", provider="none", status="502") == 1
    attempts = "resillm_upstream_attempts_total"
    assert before.value(attempts, provider="bad", model="bad-model", outcome="server_error") == 2
    assert (
        delta(before, after, attempts, provider="bad", model="bad-model", outcome="server_error")
        == 0
    )


async def test_stream_counts_time_to_first_token_and_tokens(upstream: MockUpstream) -> None:
    async with gateway(config_for(upstream)) as gw:
        before = await gw.scrape()
        status, body = await gw.chat(stream=True, stream_options={"include_usage": True})
        after = await gw.scrape()
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    by_target = {"model": "chat", "provider": "good"}
    assert delta(before, after, "resillm_time_to_first_token_seconds_count", **by_target) == 1
    assert delta(before, after, "resillm_requests_total", **by_target, status="200") == 1
    tokens = "resillm_tokens_total"
    assert delta(before, after, tokens, **by_target, kind="completion") == 8
    assert delta(before, after, tokens, **by_target, kind="prompt") > 0
    assert after.value("resillm_inflight_requests") == 0


async def test_plain_400_counts_one_client_error_and_no_retry(upstream: MockUpstream) -> None:
    config = config_for(upstream, bad={"fault": "content-policy"}, only_bad=True)
    async with gateway(config) as gw:
        before = await gw.scrape()
        status, _ = await gw.chat()
        after = await gw.scrape()
    assert status == 400
    bad = {"provider": "bad", "model": "bad-model"}
    attempts = "resillm_upstream_attempts_total"
    assert delta(before, after, attempts, **bad, outcome="client_error") == 1
    assert after.labelsets("resillm_retries_total") == []
    assert (
        delta(before, after, "resillm_requests_total", model="chat", provider="none", status="400")
        == 1
    )
    assert after.value("resillm_circuit_state", target=BAD) == 0  # the request's fault


async def test_cost_is_counted_from_usage_and_pricing(upstream: MockUpstream) -> None:
    pricing = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    async with gateway(config_for(upstream, pricing=pricing)) as gw:
        before = await gw.scrape()
        status, body = await gw.chat()
        after = await gw.scrape()
    assert status == 200
    usage = body["usage"]
    expected = (usage["prompt_tokens"] * 3.0 + usage["completion_tokens"] * 15.0) / 1e6
    cost = delta(before, after, "resillm_cost_usd_total", model="chat", provider="good")
    assert cost == pytest.approx(expected, rel=1e-6)


async def test_inflight_returns_to_zero_when_the_client_leaves_mid_stream(
    upstream: MockUpstream,
) -> None:
    config = config_for(upstream)
    config["providers"]["good"]["headers"] = {"x-mock-chunks": "50", "x-mock-chunk-delay": "0.05"}
    async with gateway(config) as gw:
        body = {"model": "chat", "messages": HELLO, "stream": True}
        async with aiohttp.ClientSession() as client:
            response = await client.post(gw.url + "/v1/chat/completions", json=body)
            assert response.status == 200
            await response.content.readline()  # the stream has started
            assert (await gw.scrape()).value("resillm_inflight_requests") == 1
            response.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 5.0
        while True:
            scrape = await gw.scrape()
            if scrape.value("resillm_inflight_requests") == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    assert scrape.value("resillm_inflight_requests") == 0
    assert scrape.value("resillm_requests_total", model="chat", provider="good", status="499") == 1


async def test_upstream_connections_gauge_shows_the_pool_active_then_idle(
    upstream: MockUpstream,
) -> None:
    config = config_for(upstream)
    config["providers"]["good"]["headers"] = {"x-mock-chunks": "50", "x-mock-chunk-delay": "0.05"}
    connections = "resillm_upstream_connections"

    def pool(scrape: Scrape) -> tuple[float, float]:
        return scrape.value(connections, state="active"), scrape.value(connections, state="idle")

    async with gateway(config) as gw:
        scrape = await gw.scrape()
        assert scrape.types.get(connections) == "gauge"
        assert pool(scrape) == (0, 0)
        body = {"model": "chat", "messages": HELLO, "stream": True}
        async with aiohttp.ClientSession() as client:
            async with client.post(gw.url + "/v1/chat/completions", json=body) as response:
                await response.content.readline()  # the stream has started: one in use
                assert pool(await gw.scrape()) == (1, 0)
                await response.read()
        assert pool(await gw.scrape()) == (0, 1)  # it ended well: kept for reuse
        async with aiohttp.ClientSession() as client:
            response = await client.post(gw.url + "/v1/chat/completions", json=body)
            await response.content.readline()
            response.close()  # the client leaves mid-stream: the upstream connection is closed
        deadline = time.monotonic() + 5.0
        while True:
            scrape = await gw.scrape()
            if pool(scrape) == (0, 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    assert pool(scrape) == (0, 0)
