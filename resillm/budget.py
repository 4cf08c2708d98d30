"""Budgets (SPEC section 6): UTC hour and day windows, reservations, per-key limits.

One rule everywhere: a window is **over budget when ``spent + reserved >= limit``**. A
request is admitted only when none of its windows (the global hour and day, and its key's
when the key has a budget) is over; it then reserves its estimated cost in every one of
them, and settles with its real cost when it ends. Since admission and reservation are one
atomic step, N concurrent requests can overshoot a limit by at most the last admitted
request's cost (and only by more when a request costs more than its estimate).

The tracker belongs to the gateway, not to one config: spend and reservations outlive a
reload, which only brings new limits, action and alert settings. Amounts are whole
nano-dollars (see :mod:`resillm.pricing`); the clock is injectable (epoch seconds).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import msgspec

from resillm.alerts import AlertDispatcher, BudgetAlert
from resillm.budget_redis import RedisBudgetStore
from resillm.budget_store import (
    BudgetStore,
    Crossing,
    MemoryBudgetStore,
    Meter,
    SnapshotKeeper,
    StoreUnavailable,
    Totals,
    Window,
)
from resillm.config import BudgetConfig, ClientKeyConfig, Config
from resillm.errors import BudgetExceeded, BudgetUnavailable
from resillm.metrics import Metrics
from resillm.pricing import to_nano_usd, to_usd

logger = logging.getLogger("resillm.budget")
Clock = Callable[[], float]
STORE_ERROR_LOG_EVERY_S = 10.0  # while the store stays down, one error line this often


def _iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(meter: Meter) -> str:
    period = "hourly" if meter.window.kind == "hour" else "daily"
    owner = "global" if meter.scope == "global" else f"key '{meter.scope[4:]}'"
    limit = "no limit" if meter.limit is None else f"${to_usd(meter.limit):g}"
    return f"{owner} {period} budget ({limit}, resets {_iso(meter.window.end)})"


class Admission(msgspec.Struct, frozen=True):
    """What admission reserved, to be settled once the request ended (a struct: made in
    C, once a request)."""

    key: ClientKeyConfig | None
    reserved_in: tuple[Meter, ...]
    amount: int
    over: tuple[Meter, ...]  # over budget at admission (let through under action: warn)

    @property
    def warning(self) -> str | None:
        if not self.over:
            return None
        return "over budget: " + "; ".join(describe(m) for m in self.over)


class WindowStatus(msgspec.Struct):
    spent: float
    limit: float | None
    remaining: float | None
    resets_at: str


class KeyBudgetStatus(msgspec.Struct):
    current_hour: WindowStatus
    current_day: WindowStatus


class BudgetStatus(msgspec.Struct):
    current_hour: WindowStatus
    current_day: WindowStatus
    requests_left_estimate: int | None
    key: KeyBudgetStatus | None


def has_limits(config: Config) -> bool:
    """Whether anything is enforced: then the memory store's spend is snapshotted."""
    budget = config.budget
    if budget.hourly_limit is not None or budget.daily_limit is not None:
        return True
    return any(
        k.budget is not None and (k.budget.hourly_limit, k.budget.daily_limit) != (None, None)
        for k in config.auth.keys
    )


def build_store(config: BudgetConfig, clock: Clock) -> BudgetStore:
    if config.store == "redis":
        return RedisBudgetStore(config.redis_url, timeout_s=config.redis_timeout, clock=clock)
    return MemoryBudgetStore()


class BudgetTracker:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock: Clock = time.time,
        store: BudgetStore | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.config = config.budget
        self.persist = has_limits(config)
        self.store = store if store is not None else build_store(config.budget, clock)
        # The memory store never suspends, so settling needs no shield (no extra task).
        self.store_awaits = not isinstance(self.store, MemoryBudgetStore)
        self.alerts = AlertDispatcher(config.budget.alerts)
        self.snapshots = SnapshotKeeper(on_error=self._snapshot_failed)
        self._task: asyncio.Task[None] | None = None
        self._spent_now: dict[str, int] = {}
        if metrics is not None:
            metrics.on_render(self._push_gauge)
        self._store_down_logged_at: float | None = None
        self._meters_hour = -1  # meters() memo: this hour's, by client key name
        self._meters: dict[str | None, tuple[Meter, ...]] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """A reload: new limits, action, snapshot and alert settings on the same windows."""
        old, new = self.config, config.budget
        if (old.store, old.redis_url, old.redis_timeout) != (
            new.store,
            new.redis_url,
            new.redis_timeout,
        ):
            logger.warning("budget.store, redis_url or redis_timeout changed: restart to apply")
            new = msgspec.structs.replace(
                new, store=old.store, redis_url=old.redis_url, redis_timeout=old.redis_timeout
            )
        self.config = new
        self.persist = has_limits(config)
        self.alerts.config = new.alerts
        self._meters_hour = -1  # the limits may have changed

    async def start(self, session: aiohttp.ClientSession | None = None) -> None:
        self.alerts.session = session
        if isinstance(self.store, MemoryBudgetStore) and self.persist:
            await self.load()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._background())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.save()
        await self.alerts.drain()
        await self.store.aclose()

    async def load(self) -> None:
        """An unreadable snapshot is set aside and logged, never an error (SnapshotKeeper)."""
        if isinstance(self.store, MemoryBudgetStore):
            await self.snapshots.load(self.store, self.config.snapshot_path, self.clock())

    async def save(self) -> None:
        """Snapshot the memory store when it changed (and a limit makes it matter); a failed
        write is logged, counted and retried, and never reaches a request."""
        store = self.store
        if isinstance(store, MemoryBudgetStore) and self.persist and store.dirty:
            await self.snapshots.save(store, self.config.snapshot_path, self.clock())

    def _snapshot_failed(self, operation: str) -> None:
        if self.metrics is not None:  # no request policy applies to the snapshot file
            self.metrics.budget_store_errors.inc({"operation": operation, "policy": "none"})

    async def _background(self) -> None:
        while True:
            await asyncio.sleep(self.config.snapshot_interval)
            await self.save()
            await self.refresh_gauge()

    # -- requests -------------------------------------------------------------------------

    def meters(self, key: ClientKeyConfig | None, now: float) -> tuple[Meter, ...]:
        """The windows a request of ``key`` counts in, built once an hour per key."""
        hour = int(now // 3600)
        if hour != self._meters_hour:
            self._meters_hour, self._meters = hour, {}
        name = key.name if key is not None else None
        found = self._meters.get(name)
        if found is None:
            found = self._meters[name] = tuple(self._build_meters(key, now))
        return found

    def _build_meters(self, key: ClientKeyConfig | None, now: float) -> list[Meter]:
        hour, day = Window.containing("hour", now), Window.containing("day", now)
        config = self.config
        meters = [
            Meter("global", hour, _nano(config.hourly_limit)),
            Meter("global", day, _nano(config.daily_limit)),
        ]
        if key is not None and key.budget is not None:
            scope = f"key:{key.name}"
            meters.append(Meter(scope, hour, _nano(key.budget.hourly_limit)))
            meters.append(Meter(scope, day, _nano(key.budget.daily_limit)))
        return meters

    async def admit(self, key: ClientKeyConfig | None, estimate: int) -> Admission:
        """Reserve ``estimate`` or raise :class:`BudgetExceeded` (``action: reject``) or
        :class:`BudgetUnavailable` (store down, ``redis_failure: closed``)."""
        if not self.persist:
            return Admission(key, (), 0, ())  # no limit anywhere: nothing to reserve against
        now = self.clock()
        meters = self.meters(key, now)
        warn = self.config.action == "warn"
        try:
            reserved = await self.store.reserve(meters, estimate, force=warn)
        except StoreUnavailable as exc:
            self._store_failed("reserve", exc)
            if self.config.redis_failure == "closed":
                raise BudgetUnavailable(
                    "the budget store is unavailable and budget.redis_failure is 'closed'"
                ) from None
            return Admission(key, (), 0, ())
        self._store_ok()
        if not reserved.admitted:
            retry_after = max(m.window.end for m in reserved.over) - now
            raise BudgetExceeded(
                "budget exceeded: " + "; ".join(describe(m) for m in reserved.over),
                retry_after,
            )
        return Admission(key, tuple(meters), estimate, tuple(reserved.over))

    async def settle(self, admission: Admission, cost: int | None) -> None:
        """Release the reservation and charge ``cost`` (``None``: no usage, nothing spent)."""
        charge = self.meters(admission.key, self.clock())
        thresholds = self.config.alerts.thresholds if self.alerts.enabled else ()
        try:
            settled = await self.store.settle(
                admission.reserved_in,
                admission.amount,
                charge,
                cost or 0,
                counted=cost is not None,
                thresholds=thresholds,
            )
        except StoreUnavailable as exc:
            self._store_failed("settle", exc)
            if cost:
                logger.error("budget store unavailable: $%g of spend not recorded", to_usd(cost))
            return
        self._store_ok()
        self._set_gauge(charge, settled.spent)
        for crossing in settled.crossings:
            self.alerts.fire(_alert(crossing))

    # -- status ---------------------------------------------------------------------------

    async def status(self, key: ClientKeyConfig | None) -> BudgetStatus:
        now = self.clock()
        meters = self.meters(key, now)
        try:
            totals = await self.store.totals(meters)
        except StoreUnavailable as exc:
            self._store_failed("status", exc)
            raise BudgetUnavailable("the budget store is unavailable") from None
        self._store_ok()
        self._set_gauge(meters[:2], [t.spent for t in totals[:2]])
        windows = [_window_status(m, t) for m, t in zip(meters, totals, strict=True)]
        key_status = KeyBudgetStatus(*windows[2:4]) if len(windows) == 4 else None
        return BudgetStatus(
            current_hour=windows[0],
            current_day=windows[1],
            requests_left_estimate=requests_left(meters, totals),
            key=key_status,
        )

    async def refresh_gauge(self) -> None:
        meters = self.meters(None, self.clock())
        try:
            totals = await self.store.totals(meters)
        except StoreUnavailable as exc:
            self._store_failed("status", exc)
            return
        self._set_gauge(meters, [t.spent for t in totals])

    def _set_gauge(self, meters: Sequence[Meter], spent: Sequence[int]) -> None:
        """Note the global windows' spend; the gauge is set from it at the next scrape."""
        for meter, amount in zip(meters, spent, strict=True):
            if meter.scope == "global":
                self._spent_now[meter.window.kind] = amount

    def _push_gauge(self) -> None:
        if self.metrics is not None:
            for kind, amount in self._spent_now.items():
                self.metrics.budget_spent.set({"window": kind}, to_usd(amount))

    def _store_failed(self, operation: str, exc: StoreUnavailable) -> None:
        policy = self.config.redis_failure
        if self.metrics is not None:
            self.metrics.budget_store_errors.inc({"operation": operation, "policy": policy})
        now = time.monotonic()
        last = self._store_down_logged_at
        if last is None or now - last >= STORE_ERROR_LOG_EVERY_S:
            self._store_down_logged_at = now
            effect = (
                "requests are rejected with 503"
                if policy == "closed"
                else "REQUESTS GO THROUGH UNMETERED"
            )
            logger.error(
                "budget store failed (%s): %s; policy %s: %s", operation, exc, policy, effect
            )

    def _store_ok(self) -> None:
        if self._store_down_logged_at is not None:
            self._store_down_logged_at = None
            logger.warning("budget store is reachable again")


def _nano(usd: float | None) -> int | None:
    return None if usd is None else to_nano_usd(usd)


def _window_status(meter: Meter, totals: Totals) -> WindowStatus:
    limit = meter.limit
    remaining = None if limit is None else max(0, limit - totals.spent - totals.reserved)
    return WindowStatus(
        spent=to_usd(totals.spent),
        limit=None if limit is None else to_usd(limit),
        remaining=None if remaining is None else to_usd(remaining),
        resets_at=_iso(meter.window.end),
    )


def requests_left(meters: Sequence[Meter], totals: Sequence[Totals]) -> int | None:
    """What is left in the tightest window, over today's average cost of a request."""
    left = [
        max(0, m.limit - t.spent - t.reserved)
        for m, t in zip(meters, totals, strict=True)
        if m.limit is not None
    ]
    day = totals[1]  # the global day: the widest sample of what a request costs
    if not left or day.requests == 0 or day.spent == 0:
        return None
    return min(left) * day.requests // day.spent


def _alert(crossing: Crossing) -> BudgetAlert:
    meter = crossing.meter
    is_key = meter.scope.startswith("key:")
    return BudgetAlert(
        scope="key" if is_key else "global",
        key=meter.scope[4:] if is_key else None,
        window=meter.window.kind,
        window_start=_iso(meter.window.start),
        resets_at=_iso(meter.window.end),
        threshold=crossing.threshold,
        spent=to_usd(crossing.spent),
        limit=to_usd(meter.limit or 0),
    )
