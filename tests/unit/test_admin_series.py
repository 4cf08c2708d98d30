"""The admin charts' ring of one-second buckets, and the recent-requests list."""

from __future__ import annotations

import pytest

from resillm.admin.recent import RecentRequests
from resillm.admin.series import LATENCY_BOUNDS_S, RING_SECONDS, RequestSeries, percentile


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_in_one_second_share_a_bucket() -> None:
    clock = FakeClock(1_000_000.2)
    series = RequestSeries(clock=clock)
    series.record(200, 0.1)
    clock.now = 1_000_000.9
    series.record(502, 0.2, fallbacks=2)
    column = series.window(seconds=1, step=1)[-1]
    assert (column.start, column.requests, column.errors, column.fallbacks) == (1_000_000, 2, 1, 2)


def test_each_second_is_its_own_bucket_and_columns_merge_them() -> None:
    clock = FakeClock(1_000_000.0)
    series = RequestSeries(clock=clock)
    for offset in range(10):
        clock.now = 1_000_000.0 + offset
        for _ in range(offset):
            series.record(200, 0.05)
    per_second = series.window(seconds=10, step=1)
    assert [c.requests for c in per_second] == list(range(10))
    columns = series.window(seconds=10, step=5)
    assert [c.requests for c in columns] == [0 + 1 + 2 + 3 + 4, 5 + 6 + 7 + 8 + 9]
    assert columns[1].requests_per_s == pytest.approx(35 / 5)


def test_errors_are_5xx_and_429_not_client_mistakes() -> None:
    series = RequestSeries(clock=FakeClock())
    for status in (200, 400, 401, 404, 413, 429, 500, 502, 503, 504):
        series.record(status, 0.01)
    column = series.window(seconds=1, step=1)[-1]
    assert (column.requests, column.errors) == (10, 5)


def test_old_buckets_expire_when_the_ring_comes_round() -> None:
    clock = FakeClock(1_000_000.0)
    series = RequestSeries(size=RING_SECONDS, clock=clock)
    series.record(500, 1.0)
    clock.now += RING_SECONDS  # the same slot, a whole ring later
    assert sum(c.requests for c in series.window()) == 0  # out of the window
    series.record(200, 0.01)
    window = series.window()
    assert sum(c.requests for c in window) == 1
    assert sum(c.errors for c in window) == 0  # the slot was cleared, not added to


def test_a_quiet_gap_reads_as_empty_not_as_stale_data() -> None:
    clock = FakeClock(1_000_000.0)
    series = RequestSeries(clock=clock)
    series.record(200, 0.01)
    clock.now += 60
    window = series.window(seconds=120, step=1)
    assert [c.start for c in window if c.requests] == [1_000_000]
    assert window[-1].p50_s is None  # no request in the current second


def test_window_covers_fifteen_minutes_in_columns() -> None:
    series = RequestSeries(clock=FakeClock(1_000_000.0))
    columns = series.window(step=5)
    assert len(columns) == 180
    assert columns[-1].start + 5 == 1_000_001  # the current second is in the last column
    assert columns[0].start == 1_000_001 - 900


def test_percentiles_come_from_the_latency_histogram() -> None:
    series = RequestSeries(clock=FakeClock())
    for _ in range(98):
        series.record(200, 0.100)
    series.record(200, 2.0)
    series.record(200, 2.0)
    column = series.window(seconds=1, step=1)[-1]
    assert column.p50_s == pytest.approx(0.100, rel=0.25)
    assert column.p99_s == pytest.approx(2.0, rel=0.25)


def test_percentile_of_an_empty_histogram_is_none_and_outliers_stay_bounded() -> None:
    assert percentile([0] * (len(LATENCY_BOUNDS_S) + 1), 0.5) is None
    series = RequestSeries(clock=FakeClock())
    series.record(200, 10_000.0)  # beyond the last bound
    p99 = series.window(seconds=1, step=1)[-1].p99_s
    assert p99 is not None and p99 >= LATENCY_BOUNDS_S[-1]


def test_recent_requests_are_bounded_newest_first_and_stamped() -> None:
    clock = FakeClock(1_800_000_000.5)
    recent = RecentRequests(3, clock=clock)
    for i in range(5):
        recent.append({"request_id": f"r{i}", "status": 200})
    items = recent.newest()
    assert [i["request_id"] for i in items] == ["r4", "r3", "r2"]
    assert items[0]["ts"] == "2027-01-15T08:00:00.500Z"
    assert [i["request_id"] for i in recent.newest(limit=1)] == ["r4"]


def test_recent_requests_resize_keeps_the_newest() -> None:
    recent = RecentRequests(5, clock=FakeClock())
    for i in range(5):
        recent.append({"request_id": f"r{i}"})
    recent.resize(2)
    assert recent.size == 2
    assert [i["request_id"] for i in recent.newest()] == ["r4", "r3"]
    recent.resize(0)
    recent.append({"request_id": "dropped"})
    assert recent.newest() == []


def test_recent_requests_scrub_known_secrets_from_every_string() -> None:
    recent = RecentRequests(5, clock=FakeClock())
    recent.append(
        {
            "error": "upstream said: bad key sk-live-0123456789",
            "nested": {"a": ["sk-live-0123456789"]},
        }
    )
    (item,) = recent.newest(secrets=["sk-live-0123456789"])
    assert "sk-live" not in repr(item)
    assert item["error"] == "upstream said: bad key ***"
