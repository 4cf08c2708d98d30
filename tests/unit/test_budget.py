"""The budget tracker on the memory store: windows, the >= rule, reservations, snapshots."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from resillm.budget import Admission, BudgetTracker
from resillm.budget_store import (
    MemoryBudgetStore,
    Meter,
    Reserved,
    Settled,
    SnapshotFile,
    StoreUnavailable,
    Totals,
    Window,
)
from resillm.config import ClientKeyConfig, Config
from resillm.config_loader import config_from_dict
from resillm.errors import BudgetExceeded, BudgetUnavailable
from resillm.metrics import Metrics
from resillm.pricing import to_nano_usd

pytestmark = pytest.mark.anyio
CENT = to_nano_usd(0.01)


def at(text: str) -> float:
    """Epoch seconds of a UTC ``YYYY-MM-DDTHH:MM:SS``."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


class FakeClock:
    def __init__(self, start: str) -> None:
        self.now = at(start)

    def __call__(self) -> float:
        return self.now

    def set(self, text: str) -> None:
        self.now = at(text)


def config(tmp_path: Path | None = None, keys: list[Any] | None = None, **budget: Any) -> Config:
    if tmp_path is not None:
        budget.setdefault("snapshot_path", str(tmp_path / "budget.json"))
    return config_from_dict(
        {
            "providers": {"m": {"type": "mock"}},
            "models": {"chat": {"targets": [{"provider": "m", "model": "m"}]}},
            "auth": {"keys": keys or []},
            "budget": budget,
        }
    )


def tracker(cfg: Config, clock: FakeClock, **kwargs: Any) -> BudgetTracker:
    return BudgetTracker(cfg, clock=clock, **kwargs)


async def spend(budget: BudgetTracker, cost: int, key: ClientKeyConfig | None = None) -> None:
    admission = await budget.admit(key, cost)
    await budget.settle(admission, cost)


def test_windows_are_utc_hours_and_days() -> None:
    now = at("2026-01-01T13:59:59")
    hour, day = Window.containing("hour", now), Window.containing("day", now)
    assert (hour.start, hour.end) == (at("2026-01-01T13:00:00"), at("2026-01-01T14:00:00"))
    assert (day.start, day.end) == (at("2026-01-01T00:00:00"), at("2026-01-02T00:00:00"))
    assert hour.id == "h2026-01-01T13" and day.id == "d2026-01-01"
    assert Window.containing("hour", at("2026-01-01T14:00:00")).id == "h2026-01-01T14"


async def test_a_window_is_over_budget_when_spent_reaches_the_limit() -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    budget = tracker(config(hourly_limit=0.03), clock)
    for _ in range(3):
        await spend(budget, CENT)
    # spent == limit: over (the one >= rule), even for a request that would cost nothing.
    with pytest.raises(BudgetExceeded) as caught:
        await budget.admit(None, 0)
    assert caught.value.status == 429
    assert caught.value.type == caught.value.code == "budget_exceeded"
    assert caught.value.headers["Retry-After"] == str(50 * 60)  # until 14:00
    assert "global hourly budget ($0.03" in caught.value.message


async def test_reservations_hold_back_concurrent_requests() -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    budget = tracker(config(hourly_limit=0.05), clock)
    estimate = to_nano_usd(0.011)
    admitted = []
    for _ in range(5):  # 0, .011, .022, .033, .044 reserved: each still under .05
        admitted.append(await budget.admit(None, estimate))
    with pytest.raises(BudgetExceeded):
        await budget.admit(None, estimate)  # .055 reserved >= .05
    for admission in admitted:
        await budget.settle(admission, CENT)
    status = await budget.status(None)
    # Overshoot is bounded by one request's estimate; here the real costs were under it.
    assert status.current_hour.spent == 0.05
    assert status.current_hour.remaining == 0.0


async def test_a_settlement_without_usage_releases_the_reservation() -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    budget = tracker(config(hourly_limit=0.02), clock)
    admission = await budget.admit(None, to_nano_usd(0.015))
    assert (await budget.status(None)).current_hour.remaining == 0.005
    await budget.settle(admission, None)  # an error before any usage
    status = await budget.status(None)
    assert (status.current_hour.spent, status.current_hour.remaining) == (0.0, 0.02)
    assert status.requests_left_estimate is None  # no priced request yet


async def test_the_hour_rolls_over_and_the_day_keeps_counting() -> None:
    clock = FakeClock("2026-01-01T13:59:00")
    budget = tracker(config(hourly_limit=0.02, daily_limit=0.05), clock)
    await spend(budget, CENT)
    await spend(budget, CENT)
    with pytest.raises(BudgetExceeded):
        await budget.admit(None, 0)
    clock.set("2026-01-01T14:00:00")
    status = await budget.status(None)
    assert status.current_hour.spent == 0.0
    assert status.current_hour.resets_at == "2026-01-01T15:00:00Z"
    assert status.current_day.spent == 0.02
    await spend(budget, CENT)
    await spend(budget, CENT)
    clock.set("2026-01-01T15:30:00")
    await spend(budget, CENT)  # the day is now at its limit
    with pytest.raises(BudgetExceeded) as caught:
        await budget.admit(None, 0)
    assert caught.value.headers["Retry-After"] == str(8 * 3600 + 30 * 60)  # until midnight
    assert "daily" in caught.value.message
    clock.set("2026-01-02T00:00:00")
    status = await budget.status(None)
    assert (status.current_hour.spent, status.current_day.spent) == (0.0, 0.0)
    assert status.current_day.resets_at == "2026-01-03T00:00:00Z"
    await budget.admit(None, 0)


async def test_a_request_that_straddles_the_hour_is_charged_to_the_new_hour() -> None:
    clock = FakeClock("2026-01-01T13:59:59")
    budget = tracker(config(hourly_limit=0.05), clock)
    admission = await budget.admit(None, to_nano_usd(0.02))
    clock.set("2026-01-01T14:00:01")
    await budget.settle(admission, CENT)
    status = await budget.status(None)
    assert (status.current_hour.spent, status.current_hour.remaining) == (0.01, 0.04)


async def test_warn_mode_admits_over_budget_requests_with_a_warning() -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    budget = tracker(config(hourly_limit=0.01, action="warn"), clock)
    first = await budget.admit(None, CENT)
    assert first.warning is None
    await budget.settle(first, CENT)
    second = await budget.admit(None, CENT)
    assert second.warning is not None
    assert second.warning.startswith("over budget: global hourly budget ($0.01")
    await budget.settle(second, CENT)
    assert (await budget.status(None)).current_hour.spent == 0.02


async def test_key_budgets_are_enforced_per_key_and_count_globally() -> None:
    keys = [
        {"name": "a", "key": "ka", "budget": {"hourly_limit": 0.02}},
        {"name": "b", "key": "kb"},
    ]
    cfg = config(keys=keys, daily_limit=1.0)
    a, b = cfg.auth.keys
    budget = tracker(cfg, FakeClock("2026-01-01T13:10:00"))
    await spend(budget, CENT, a)
    await spend(budget, CENT, a)
    with pytest.raises(BudgetExceeded) as caught:
        await budget.admit(a, 0)
    assert "key 'a' hourly budget" in caught.value.message
    await spend(budget, CENT, b)
    await spend(budget, CENT, None)
    status_a, status_b = await budget.status(a), await budget.status(b)
    assert status_a.current_day.spent == 0.04  # the global windows count every key
    assert status_a.key is not None
    assert (status_a.key.current_hour.spent, status_a.key.current_hour.limit) == (0.02, 0.02)
    assert status_a.key.current_day.limit is None
    assert status_b.key is None


async def test_a_reload_applies_new_limits_to_the_same_spend() -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    budget = tracker(config(hourly_limit=0.02), clock)
    await spend(budget, CENT)
    await spend(budget, CENT)
    with pytest.raises(BudgetExceeded):
        await budget.admit(None, 0)
    budget.configure(config(hourly_limit=0.03))
    await spend(budget, CENT)
    assert (await budget.status(None)).current_hour.spent == 0.03


async def test_status_reports_the_spec_shape_and_requests_left() -> None:
    budget = tracker(config(hourly_limit=1.0), FakeClock("2026-01-01T13:10:00"))
    await spend(budget, CENT)
    await spend(budget, 3 * CENT)
    status = msgspec.to_builtins(await budget.status(None))
    assert status == {
        "current_hour": {
            "spent": 0.04,
            "limit": 1.0,
            "remaining": 0.96,
            "resets_at": "2026-01-01T14:00:00Z",
        },
        "current_day": {
            "spent": 0.04,
            "limit": None,
            "remaining": None,
            "resets_at": "2026-01-02T00:00:00Z",
        },
        "requests_left_estimate": 48,  # $0.96 left at $0.02 a request
        "key": None,
    }


async def test_no_limits_means_no_estimate() -> None:
    budget = tracker(config(), FakeClock("2026-01-01T13:10:00"))
    await spend(budget, CENT)
    assert (await budget.status(None)).requests_left_estimate is None


async def test_the_spend_gauge_follows_the_global_windows() -> None:
    metrics = Metrics()
    budget = tracker(config(hourly_limit=1.0), FakeClock("2026-01-01T13:10:00"), metrics=metrics)
    await spend(budget, 2 * CENT)
    text = metrics.render([])[0].decode()  # a scrape brings the gauge up to date
    assert 'resillm_budget_spent_usd{window="hour"} 0.02' in text
    assert metrics.budget_spent.get({"window": "hour"}) == 0.02
    assert metrics.budget_spent.get({"window": "day"}) == 0.02


# -- snapshots ---------------------------------------------------------------------------


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def test_spend_survives_a_restart_through_the_snapshot(tmp_path: Path) -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    cfg = config(tmp_path, hourly_limit=0.05, daily_limit=1.0)
    first = tracker(cfg, clock)
    await first.start()
    await spend(first, 2 * CENT)
    await first.stop()
    assert listing(tmp_path) == ["budget.json"]  # no temp file left
    second = tracker(cfg, clock)
    await second.start()
    status = await second.status(None)
    assert (status.current_hour.spent, status.current_day.spent) == (0.02, 0.02)
    await second.stop()
    # An hour later the hour window is gone from the snapshot; the day is still there.
    clock.set("2026-01-01T14:10:00")
    third = tracker(cfg, clock)
    await third.start()
    status = await third.status(None)
    assert (status.current_hour.spent, status.current_day.spent) == (0.0, 0.02)
    await third.stop()


async def test_the_snapshot_is_written_every_interval(tmp_path: Path) -> None:
    clock = FakeClock("2026-01-01T13:10:00")
    cfg = config(tmp_path, hourly_limit=1.0, snapshot_interval="20ms")
    budget = tracker(cfg, clock)
    await budget.start()
    try:
        await spend(budget, CENT)
        path = tmp_path / "budget.json"
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        # A crash now loses nothing: a fresh tracker reads the periodic snapshot.
        restored = MemoryBudgetStore()
        restored.restore(path.read_bytes(), clock())
        hour = Meter("global", Window.containing("hour", clock()), None)
        assert await restored.totals([hour]) == [Totals(CENT, 0, 1)]
    finally:
        await budget.stop()


async def test_without_any_limit_nothing_is_written(tmp_path: Path) -> None:
    budget = tracker(config(tmp_path), FakeClock("2026-01-01T13:10:00"))
    await budget.start()
    await spend(budget, CENT)
    await budget.stop()
    assert listing(tmp_path) == []


async def test_an_unreadable_snapshot_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "budget.json").write_text("{not json")
    budget = tracker(config(tmp_path, hourly_limit=1.0), FakeClock("2026-01-01T13:10:00"))
    with caplog.at_level(logging.ERROR, logger="resillm.budget"):
        await budget.start()
    await budget.stop()
    names = listing(tmp_path)
    assert names[0].startswith("budget.json.corrupt-")
    assert "unreadable" in caplog.text


def test_snapshot_writes_replace_the_file_atomically(tmp_path: Path) -> None:
    file = SnapshotFile(tmp_path / "sub" / "budget.json")
    file.write(b"one")
    file.write(b"two")
    assert file.read() == b"two"
    assert os.listdir(tmp_path / "sub") == ["budget.json"]
    assert SnapshotFile(tmp_path / "missing.json").read() is None


# -- alerts ------------------------------------------------------------------------------


async def test_thresholds_cross_once_per_window() -> None:
    store = MemoryBudgetStore()
    hour = Window.containing("hour", at("2026-01-01T13:10:00"))
    meter = Meter("global", hour, 10 * CENT)
    fired = []
    for _ in range(12):
        settled = await store.settle([], 0, [meter], CENT, counted=True, thresholds=[0.5, 1.0])
        fired += [(c.threshold, c.spent) for c in settled.crossings]
    assert fired == [(0.5, 5 * CENT), (1.0, 10 * CENT)]
    next_hour = Meter("global", Window.containing("hour", at("2026-01-01T14:10:00")), 10 * CENT)
    settled = await store.settle([], 0, [next_hour], 6 * CENT, counted=True, thresholds=[0.5])
    assert [c.threshold for c in settled.crossings] == [0.5]


# -- the store down ----------------------------------------------------------------------


class DownStore:
    async def reserve(self, meters: Any, amount: int, *, force: bool) -> Reserved:
        raise StoreUnavailable("connection refused")

    async def settle(self, *args: Any, **kwargs: Any) -> Settled:
        raise StoreUnavailable("connection refused")

    async def totals(self, meters: Any) -> list[Totals]:
        raise StoreUnavailable("connection refused")

    async def aclose(self) -> None:
        return None


async def test_store_down_fail_closed_rejects_with_503() -> None:
    metrics = Metrics()
    budget = tracker(
        config(store="memory", redis_failure="closed", hourly_limit=1.0),
        FakeClock("2026-01-01T13:10:00"),
        metrics=metrics,
        store=DownStore(),
    )
    with pytest.raises(BudgetUnavailable) as caught:
        await budget.admit(None, CENT)
    assert caught.value.status == 503
    with pytest.raises(BudgetUnavailable):
        await budget.status(None)
    assert metrics.budget_store_errors.get({"operation": "reserve", "policy": "closed"}) == 1


async def test_with_no_limit_anywhere_admission_needs_no_store() -> None:
    # Nothing is enforced, so an unreachable store blocks nothing (and costs no round trip).
    budget = tracker(
        config(store="memory", redis_failure="closed"),
        FakeClock("2026-01-01T13:10:00"),
        store=DownStore(),
    )
    admission = await budget.admit(None, CENT)
    assert admission.amount == 0 and admission.over == ()


async def test_store_down_fail_open_admits_loudly(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    budget = tracker(
        config(redis_failure="open", hourly_limit=0.01),
        FakeClock("2026-01-01T13:10:00"),
        metrics=metrics,
        store=DownStore(),
    )
    with caplog.at_level(logging.ERROR, logger="resillm.budget"):
        admission = await budget.admit(None, CENT)
        await budget.settle(admission, CENT)
        await budget.admit(None, CENT)
    assert admission == Admission(None, (), 0, ())
    assert metrics.budget_store_errors.get({"operation": "reserve", "policy": "open"}) == 2
    assert metrics.budget_store_errors.get({"operation": "settle", "policy": "open"}) == 1
    assert "UNMETERED" in caplog.text
    # Loud, not a flood: one line per outage (and every STORE_ERROR_LOG_EVERY_S).
    assert sum("UNMETERED" in r.getMessage() for r in caplog.records) == 1
