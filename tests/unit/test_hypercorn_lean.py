"""hypercorn's per-request queue and per-connection event, replaced by lighter ones that must
behave as the originals do where hypercorn relies on them."""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from resillm.hypercorn_lean import IdleTimer, LeanEvent, Mailbox, lighten_hypercorn

pytestmark = pytest.mark.anyio


async def test_items_come_out_in_order() -> None:
    mailbox = Mailbox(10)
    for n in range(3):
        await mailbox.put(n)
    assert [await mailbox.get() for _ in range(3)] == [0, 1, 2]


async def test_get_waits_for_the_next_item() -> None:
    mailbox = Mailbox(10)
    getter = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await mailbox.put("body")
    assert await getter == "body"


async def test_put_waits_while_full_and_resumes_when_one_is_taken() -> None:
    mailbox = Mailbox(2)  # hypercorn's backpressure on a body the app does not read
    await mailbox.put(1)
    await mailbox.put(2)
    putter = asyncio.create_task(mailbox.put(3))
    await asyncio.sleep(0.01)
    assert not putter.done() and mailbox.qsize() == 2
    assert await mailbox.get() == 1
    await asyncio.wait_for(putter, 1)
    assert [await mailbox.get(), await mailbox.get()] == [2, 3]


async def test_waiting_getters_are_served_in_order() -> None:
    mailbox = Mailbox(10)
    first = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    second = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    await mailbox.put("a")
    await mailbox.put("b")
    assert (await first, await second) == ("a", "b")


async def test_a_getter_cancelled_after_its_wake_up_passes_it_on() -> None:
    mailbox = Mailbox(10)
    first = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    second = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    await mailbox.put("only")  # wakes the first getter...
    first.cancel()  # ...which is cancelled before it runs: the item is the second's
    assert await asyncio.wait_for(second, 1) == "only"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_cancelled_getter_leaves_no_waiter_behind() -> None:
    mailbox = Mailbox(10)
    getter = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    await mailbox.put("x")
    assert await asyncio.wait_for(mailbox.get(), 1) == "x"


async def test_a_listener_takes_what_is_queued_then_every_new_item() -> None:
    mailbox = Mailbox(2)
    await mailbox.put("queued")
    await mailbox.put("full")
    putter = asyncio.create_task(mailbox.put("blocked"))
    await asyncio.sleep(0)
    heard: list[str] = []
    mailbox.listen(heard.append)
    await asyncio.wait_for(putter, 1)  # the blocked putter hands its item over too
    await mailbox.put("new")
    assert heard == ["queued", "full", "blocked", "new"]
    mailbox.listen(None)
    await mailbox.put("after")
    assert heard[-1] == "new" and await mailbox.get() == "after"


async def test_the_event_wakes_its_waiter_and_stays_set_until_cleared() -> None:
    event = LeanEvent()
    waiter = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    assert not waiter.done() and not event.is_set()
    await event.set()
    await asyncio.wait_for(waiter, 1)
    assert event.is_set()
    await event.wait()  # set: returns at once
    await event.clear()
    again = asyncio.create_task(event.wait())
    await asyncio.sleep(0.01)
    assert not again.done()
    again.cancel()


def test_they_are_lighter_than_what_they_replace() -> None:
    # The point of them: what hypercorn held per connection (a queue and an event, five
    # deques) against what it holds now. Sizes, not times: deterministic.
    def size(obj: Any) -> int:
        inner = getattr(obj, "__dict__", {}).values() if hasattr(obj, "__dict__") else ()
        return sys.getsizeof(obj) + sum(sys.getsizeof(v) for v in inner)

    queue, event = asyncio.Queue[Any](10), asyncio.Event()
    before = size(queue) + size(queue._finished) + size(event)  # type: ignore[attr-defined]
    mailbox, lean = Mailbox(10), LeanEvent()
    after = sys.getsizeof(mailbox) + sys.getsizeof([]) + sys.getsizeof(lean)
    assert after * 5 < before


def test_hypercorn_uses_them_once_lightened() -> None:
    from hypercorn.asyncio.task_group import TaskGroup
    from hypercorn.asyncio.worker_context import WorkerContext

    lighten_hypercorn()
    lighten_hypercorn()  # twice is once
    assert WorkerContext(None).event_class is LeanEvent
    assert getattr(TaskGroup.spawn_app, "_resillm_mailbox", False)
    from hypercorn.asyncio import tcp_server

    assert tcp_server.AsyncioSingleTask is IdleTimer  # type: ignore[attr-defined]


class IdleServer:
    """What IdleTimer uses of hypercorn's TCPServer: its watch, its context and config,
    and the close it starts."""

    def __init__(self, keep_alive_s: float) -> None:
        self.context = SimpleNamespace(terminated=LeanEvent())
        self.config = SimpleNamespace(keep_alive_timeout=keep_alive_s)
        self.closes = 0
        self.group = SimpleNamespace(
            _task_group=SimpleNamespace(create_task=asyncio.get_running_loop().create_task)
        )

    async def _idle_timeout(self) -> None:
        raise AssertionError("the timer stands in for this task: it must not run")

    async def _initiate_server_close(self) -> None:
        self.closes += 1


async def test_an_idle_connection_is_closed_once_after_keep_alive_timeout() -> None:
    server, timer = IdleServer(0.05), IdleTimer()
    await timer.restart(server.group, server._idle_timeout)
    await timer.restart(server.group, server._idle_timeout)  # restarted: one watch still
    await asyncio.sleep(0.02)
    assert server.closes == 0
    await asyncio.sleep(0.1)
    assert server.closes == 1


async def test_a_request_stops_the_watch_and_leaves_nothing_behind() -> None:
    server, timer = IdleServer(0.05), IdleTimer()
    await timer.restart(server.group, server._idle_timeout)
    await timer.stop()
    await asyncio.sleep(0.1)  # past its keep-alive timeout: it is busy, not idle
    assert server.closes == 0
    await server.context.terminated.set()
    await asyncio.sleep(0.01)
    assert server.closes == 0


async def test_many_connections_share_one_watch_and_keep_nothing_when_busy() -> None:
    first = IdleServer(60.0)
    context = first.context  # one worker: every connection has its context
    servers = [first] + [IdleServer(60.0) for _ in range(99)]
    timers = [IdleTimer() for _ in servers]
    for _ in range(3):  # idle, busy, idle...: what keep-alive connections do per request
        for server, timer in zip(servers, timers, strict=True):
            server.context = context
            await timer.restart(server.group, server._idle_timeout)
        for timer in timers:
            await timer.stop()
    assert len(context.terminated._waiters) == 1  # the worker's one, not one a connection
    assert len(context._resillm_idle_connections) == 0
    assert sum(server.closes for server in servers) == 0


async def test_idle_connections_close_in_turn_each_after_its_own_timeout() -> None:
    early, late = IdleServer(0.3), IdleServer(0.3)
    late.context = early.context
    early_timer, late_timer = IdleTimer(), IdleTimer()
    await early_timer.restart(early.group, early._idle_timeout)
    await asyncio.sleep(0.15)
    await late_timer.restart(late.group, late._idle_timeout)
    await asyncio.sleep(0.2)  # early's deadline (0.3 s) passed, late's (0.45 s) not yet
    assert (early.closes, late.closes) == (1, 0)
    await asyncio.sleep(0.25)
    assert (early.closes, late.closes) == (1, 1)


async def test_a_stopping_worker_closes_idle_connections_at_once() -> None:
    server, timer = IdleServer(60.0), IdleTimer()
    await timer.restart(server.group, server._idle_timeout)
    await server.context.terminated.set()
    await asyncio.sleep(0.01)
    assert server.closes == 1
    await timer.restart(server.group, server._idle_timeout)  # idle again, worker stopping
    await asyncio.sleep(0.01)
    assert server.closes == 2


async def test_any_other_action_runs_as_a_task_and_is_cancelled_on_stop() -> None:
    server, timer = IdleServer(60.0), IdleTimer()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def other() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await timer.restart(server.group, other)
    await asyncio.wait_for(started.wait(), 1)
    await timer.stop()
    assert cancelled.is_set()
