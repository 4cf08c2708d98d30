"""Histogram observations and the in-flight gauge wait in plain Python until a scrape: what
a scrape shows must be exactly what aioprometheus would have counted one call at a time."""

from __future__ import annotations

import random

import pytest
from aioprometheus.collectors import Histogram, Registry
from aioprometheus.renderer import render

from resillm.metrics import LATENCY_BUCKETS_S, MAX_PENDING, Metrics


def scrape(metrics: Metrics) -> str:
    content, _ = metrics.render([])
    return content.decode()


def samples(name: str, text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(name))


def test_batched_histograms_render_as_observed_one_by_one() -> None:
    rng = random.Random(3)
    values = [rng.choice(LATENCY_BUCKETS_S) for _ in range(200)]  # exactly on a bound
    values += [rng.uniform(0, 700) for _ in range(500)]  # 700: past the last bound (+Inf)
    values += [rng.expovariate(20) for _ in range(500)] + [0.0]
    label_sets = [(("model", "a"), ("provider", "p")), (("model", "b"), ("provider", "q"))]
    metrics = Metrics()
    reference = Histogram(
        "resillm_request_duration_seconds", "Whole request time, streams to their end.",
        registry=Registry(), buckets=LATENCY_BUCKETS_S,
    )  # fmt: skip
    for n, value in enumerate(values):
        labels = label_sets[n % 2]
        metrics.observe(metrics.request_duration, labels, value)
        reference.observe(dict(labels), value)
        if n == 600:
            scrape(metrics)  # a scrape between observations: the rest add to the same sets
    registry = Registry()
    registry.register(reference)
    expected, _ = render(registry, [])
    name = "resillm_request_duration_seconds"
    got, want = samples(name, scrape(metrics)), samples(name, expected.decode())
    assert [s for s in got if "_sum" not in s] == [s for s in want if "_sum" not in s]
    sums = [
        (float(a.split()[-1]), float(b.split()[-1]))
        for a, b in zip(got, want, strict=True)
        if "_sum" in a
    ]
    assert len(sums) == 2  # the same sums, but for float rounding (added in another order)
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in sums)
    [count] = [s for s in got if s.startswith(f'{name}_count{{model="a"')]
    assert float(count.split()[-1]) == 601  # every other one of the 1,201 values


def test_many_label_sets_are_flushed_before_they_pile_up() -> None:
    metrics = Metrics()
    for n in range(MAX_PENDING + 10):
        metrics.observe(metrics.ttft, (("model", f"m{n}"), ("provider", "p")), 0.2)
    assert len(metrics._observed) <= MAX_PENDING
    text = scrape(metrics)
    counts = samples("resillm_time_to_first_token_seconds_count", text)
    assert len(counts) == MAX_PENDING + 10  # every label set, flushed early or at the scrape
    assert all(float(line.split()[-1]) == 1 for line in counts)


def test_the_inflight_gauge_shows_the_requests_being_served_at_the_scrape() -> None:
    metrics = Metrics()
    assert "resillm_inflight_requests 0" in scrape(metrics)
    metrics.inflight_now += 3
    assert "resillm_inflight_requests 3" in scrape(metrics)
    metrics.inflight_now -= 3
    assert "resillm_inflight_requests 0" in scrape(metrics)
