"""The stream idle limit: one timer for every open stream, told only of those still waiting
past their deadline, and nothing made per chunk."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from providers.idle import IdleWatch, idle_watch

pytestmark = pytest.mark.anyio


class Stream:
    def __init__(self) -> None:
        self.expired = asyncio.Event()

    def idle_expired(self) -> None:
        self.expired.set()


def live_timers() -> int:
    loop: Any = asyncio.get_running_loop()
    return len([handle for handle in loop._scheduled if not handle.cancelled()])


async def test_a_stream_still_waiting_past_its_deadline_is_told() -> None:
    watch, stream = IdleWatch(), Stream()
    watch.waiting(stream, 0.05)
    await asyncio.wait_for(stream.expired.wait(), 1)


async def test_a_stream_whose_data_came_is_not_told() -> None:
    watch, quiet, busy = IdleWatch(), Stream(), Stream()
    watch.waiting(quiet, 0.1)
    watch.waiting(busy, 0.1)
    watch.done(busy)  # its chunk arrived
    await asyncio.wait_for(quiet.expired.wait(), 1)
    assert not busy.expired.is_set()


async def test_data_arriving_moves_the_deadline_later() -> None:
    watch, stream = IdleWatch(), Stream()
    for _ in range(6):  # a chunk every 0.03 s against a 0.08 s limit: never idle
        watch.waiting(stream, 0.08)
        await asyncio.sleep(0.03)
        watch.done(stream)
    assert not stream.expired.is_set()
    watch.waiting(stream, 0.08)  # then silence
    await asyncio.wait_for(stream.expired.wait(), 1)


async def test_one_timer_for_every_stream_and_none_made_per_chunk() -> None:
    before = live_timers()
    watch = IdleWatch()
    streams = [Stream() for _ in range(50)]
    for stream in streams:
        watch.waiting(stream, 30)
    assert live_timers() - before == 1
    loop: Any = asyncio.get_running_loop()
    scheduled = len(loop._scheduled)
    for _ in range(3):  # chunks arrive on every stream: deadlines move later, no new timer
        for stream in streams:
            watch.done(stream)
            watch.waiting(stream, 30)
    assert len(loop._scheduled) == scheduled


async def test_each_loop_has_its_own_watch() -> None:
    assert idle_watch() is idle_watch()
    other = await asyncio.to_thread(lambda: asyncio.run(_watch_of_a_new_loop()))
    assert other is not idle_watch()


async def _watch_of_a_new_loop() -> IdleWatch:
    return idle_watch()


async def test_one_stream_failing_to_end_leaves_the_others_told() -> None:
    class Broken:
        def idle_expired(self) -> None:
            raise RuntimeError("already closed")

    watch, stream, later = IdleWatch(), Stream(), Stream()
    watch.waiting(Broken(), 0.02)
    watch.waiting(stream, 0.02)
    watch.waiting(later, 0.1)  # the timer must be set again for this one
    await asyncio.wait_for(stream.expired.wait(), 1)
    await asyncio.wait_for(later.expired.wait(), 1)
