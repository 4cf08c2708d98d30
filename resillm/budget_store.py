"""Where budget windows live: in memory (snapshotted to a file) or in Redis.

A store keeps, per meter (a scope's hour or day window), the spend settled, the
reservations outstanding and the number of priced requests, all in whole nano-dollars.
Both stores apply the same rule atomically: a meter is over budget when
``spent + reserved >= limit``. The memory store is atomic because its methods never
suspend between reading and writing; the Redis store (:mod:`resillm.budget_redis`) runs
each operation as one Lua script, so any number of gateway instances share the windows
exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import msgspec

WindowKind = Literal["hour", "day"]
_SECONDS: dict[WindowKind, int] = {"hour": 3600, "day": 86400}
# Windows stay readable this long after they end, for late settlements and status reads.
KEEP_AFTER_END_S = 3600
SNAPSHOT_ERROR_LOG_EVERY_S = 60.0  # while snapshots keep failing, one error line this often
logger = logging.getLogger("resillm.budget")


@functools.lru_cache(maxsize=64)
def _window_id(kind: str, start: int) -> str:
    """Formatted once per window, not once per request."""
    moment = dt.datetime.fromtimestamp(start, dt.UTC)
    return moment.strftime("h%Y-%m-%dT%H" if kind == "hour" else "d%Y-%m-%d")


@dataclass(frozen=True)
class Window:
    """One UTC hour or day: ``[start, end)`` in epoch seconds."""

    kind: WindowKind
    start: int

    @property
    def end(self) -> int:
        return self.start + _SECONDS[self.kind]

    @property
    def id(self) -> str:
        return _window_id(self.kind, self.start)

    @staticmethod
    def containing(kind: WindowKind, now: float) -> Window:
        seconds = _SECONDS[kind]
        return Window(kind, int(now // seconds) * seconds)


@dataclass(frozen=True)
class Meter:
    """A scope's window and its limit (``None``: counted, not enforced)."""

    scope: str  # "global" or "key:NAME"
    window: Window
    limit: int | None
    key: str = field(init=False, repr=False, compare=False)  # the store's name for it

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.scope}:{self.window.id}")


class Totals(NamedTuple):
    spent: int
    reserved: int
    requests: int


class Crossing(NamedTuple):
    """A meter's spend reached ``threshold`` of its limit for the first time this window."""

    meter: Meter
    threshold: float
    spent: int


class Reserved(NamedTuple):
    admitted: bool  # reserved (always, when forced)
    over: list[Meter]  # the meters that were over budget before this request


class Settled(NamedTuple):
    spent: list[int]  # each charged meter's spend after this settlement
    crossings: list[Crossing]


class StoreUnavailable(Exception):
    """The store could not be reached in time."""


class BudgetStore(Protocol):
    async def reserve(self, meters: Sequence[Meter], amount: int, *, force: bool) -> Reserved:
        """Atomically: find the meters over budget; unless some are and ``force`` is false,
        add ``amount`` to every meter's reservations."""
        ...

    async def settle(
        self,
        reserved_in: Sequence[Meter],
        amount: int,
        charge: Sequence[Meter],
        cost: int,
        *,
        counted: bool,
        thresholds: Sequence[float],
    ) -> Settled:
        """Atomically: release ``amount`` from ``reserved_in``, add ``cost`` (and one request
        when ``counted``) to ``charge``, and report thresholds crossed for the first time."""
        ...

    async def totals(self, meters: Sequence[Meter]) -> list[Totals]: ...

    async def aclose(self) -> None: ...


def crossed(spent: int, limit: int | None, threshold: float) -> bool:
    return limit is not None and spent >= threshold * limit


# -- memory ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    end: int
    spent: int = 0
    reserved: int = 0
    requests: int = 0
    alerted: set[float] = field(default_factory=set)


class _SavedWindow(msgspec.Struct):
    key: str
    end: int
    spent: int
    requests: int
    alerted: list[float] = []


class _Snapshot(msgspec.Struct):
    version: int
    saved_at: float
    windows: list[_SavedWindow]


SNAPSHOT_VERSION = 1


class MemoryBudgetStore:
    """Windows in a dict. ``snapshot``/``restore`` carry the spend over a restart
    (reservations are not saved: the requests that held them are gone)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._pruned_at = 0
        self.dirty = False

    def _entry(self, meter: Meter) -> _Entry:
        if meter.window.start > self._pruned_at and meter.window.kind == "hour":
            self._prune(meter.window.start)
        entry = self._entries.get(meter.key)
        if entry is None:
            entry = self._entries[meter.key] = _Entry(meter.window.end)
        return entry

    def _prune(self, now: int) -> None:
        self._pruned_at = now
        old = [k for k, e in self._entries.items() if e.end + KEEP_AFTER_END_S <= now]
        for key in old:
            del self._entries[key]

    async def reserve(self, meters: Sequence[Meter], amount: int, *, force: bool) -> Reserved:
        entries = [self._entry(m) for m in meters]
        over = [
            m
            for m, e in zip(meters, entries, strict=True)
            if m.limit is not None and e.spent + e.reserved >= m.limit
        ]
        if over and not force:
            return Reserved(False, over)
        for entry in entries:
            entry.reserved += amount
        return Reserved(True, over)

    async def settle(
        self,
        reserved_in: Sequence[Meter],
        amount: int,
        charge: Sequence[Meter],
        cost: int,
        *,
        counted: bool,
        thresholds: Sequence[float],
    ) -> Settled:
        for meter in reserved_in:
            held = self._entries.get(meter.key)
            if held is not None:
                held.reserved = max(0, held.reserved - amount)
        spent: list[int] = []
        crossings: list[Crossing] = []
        for meter in charge:
            entry = self._entry(meter)
            entry.spent += cost
            entry.requests += int(counted)
            spent.append(entry.spent)
            if cost <= 0:
                continue
            for threshold in thresholds:
                if threshold not in entry.alerted and crossed(entry.spent, meter.limit, threshold):
                    entry.alerted.add(threshold)
                    crossings.append(Crossing(meter, threshold, entry.spent))
        self.dirty = self.dirty or cost > 0 or counted or bool(crossings)
        return Settled(spent, crossings)

    async def totals(self, meters: Sequence[Meter]) -> list[Totals]:
        entries = [self._entries.get(meter.key) for meter in meters]
        return [Totals(e.spent, e.reserved, e.requests) if e else Totals(0, 0, 0) for e in entries]

    async def aclose(self) -> None:
        return None

    def snapshot(self, now: float) -> bytes:
        self.dirty = False
        windows = [
            _SavedWindow(key, e.end, e.spent, e.requests, sorted(e.alerted))
            for key, e in self._entries.items()
            if e.end > now and (e.spent or e.requests or e.alerted)
        ]
        return msgspec.json.encode(_Snapshot(SNAPSHOT_VERSION, now, windows))

    def restore(self, data: bytes, now: float) -> int:
        """Load a snapshot's windows that are still current; return how many."""
        snapshot = msgspec.json.decode(data, type=_Snapshot)
        if snapshot.version != SNAPSHOT_VERSION:
            raise ValueError(f"unknown snapshot version {snapshot.version}")
        loaded = 0
        for saved in snapshot.windows:
            if saved.end > now:
                self._entries[saved.key] = _Entry(
                    saved.end, saved.spent, 0, saved.requests, set(saved.alerted)
                )
                loaded += 1
        return loaded


class SnapshotFile:
    """Atomic writes: a temporary file in the same directory, fsync, rename, fsync the
    directory. A crash leaves the old snapshot or the new one, never half of either."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def write(self, data: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except OSError:
            # Disk full, no permission: the old snapshot is untouched, and no half-written
            # temporary is left behind to hold the space.
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def set_aside(self) -> Path:
        """Keep an unreadable snapshot for inspection instead of overwriting it."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        os.replace(self.path, aside)
        return aside


class SnapshotKeeper:
    """Loads the memory store's snapshot at start and saves it; neither ever stops the
    gateway or a request.

    An unreadable snapshot (not JSON, an unknown version, no permission, a directory) is
    set aside as ``*.corrupt-TIMESTAMP`` when it is a file, and spend starts from 0, with
    an error logged. A write that fails (disk full, no permission, a directory that cannot
    be made) leaves the last good snapshot as it was and the spend in memory; it is logged
    when failures start, every :data:`SNAPSHOT_ERROR_LOG_EVERY_S` while they last and when
    a write works again, counted through ``on_error``, and tried again at the next interval.
    """

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self.on_error = on_error  # called with "restore" or "snapshot"
        self._failing = False
        self._logged_at = 0.0

    async def load(self, store: MemoryBudgetStore, path: str, now: float) -> None:
        file = SnapshotFile(path)
        try:
            data = await asyncio.to_thread(file.read)
            loaded = 0 if data is None else store.restore(data, now)
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            self.on_error("restore")
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            logger.error(
                "budget snapshot %s is unreadable (%s): %s; spend starts from 0",
                file.path, reason, await self._set_aside(file),
            )  # fmt: skip
            return
        if data is not None:
            logger.info("budget snapshot %s: %d current window(s) loaded", file.path, loaded)

    @staticmethod
    async def _set_aside(file: SnapshotFile) -> str:
        if not file.path.is_file():
            return "left where it is"
        try:
            return f"kept as {await asyncio.to_thread(file.set_aside)}"
        except OSError as exc:
            return f"left where it is (it cannot be renamed: {exc.strerror})"

    async def save(self, store: MemoryBudgetStore, path: str, now: float) -> None:
        file = SnapshotFile(path)
        try:
            await asyncio.to_thread(file.write, store.snapshot(now))
        except OSError as exc:
            store.dirty = True  # tried again at the next interval
            self.on_error("snapshot")
            clock = time.monotonic()
            if not self._failing or clock - self._logged_at >= SNAPSHOT_ERROR_LOG_EVERY_S:
                logger.error(
                    "budget snapshot to %s failed (%s): spend is kept in memory and the last "
                    "snapshot as it was; retrying at each interval",
                    file.path, exc.strerror or exc,
                )  # fmt: skip
                self._failing, self._logged_at = True, clock
            return
        if self._failing:
            self._failing = False
            logger.warning("budget snapshot to %s written again", file.path)
