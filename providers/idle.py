"""One timer per event loop for every open stream's ``stream_idle`` limit.

``asyncio.timeout`` around each read would make and cancel a timer per chunk, and hold one
per stream while it waits. Here a stream notes its deadline when it starts waiting for data
and forgets it when data comes; one timer, set for the earliest deadline, tells each stream
still waiting past its own. Deadlines only move later as data arrives, so the timer is
seldom moved: at one chunk a second on a thousand streams it fires about once per
``stream_idle``, and nothing is made or cancelled per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Protocol

logger = logging.getLogger("resillm.providers")
# A deadline this close is due: the loop's timers may fire a little early.
_RESOLUTION_S = 0.001


class Idler(Protocol):
    def idle_expired(self) -> None:
        """Called once the deadline passed while it was still waiting."""


class IdleWatch:
    # Not holding its loop: the loop is the key it is kept under, weakly.
    __slots__ = ("_deadlines", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._deadlines: dict[Idler, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def waiting(self, idler: Idler, seconds: float) -> None:
        """``idler`` waits from now, for at most ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        self._deadlines[idler] = deadline
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._fire)
            self._timer_at = deadline

    def done(self, idler: Idler) -> None:
        """``idler`` stopped waiting (data came, or it was cancelled)."""
        self._deadlines.pop(idler, None)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        loop = asyncio.get_running_loop()
        now = loop.time() + _RESOLUTION_S
        deadlines = self._deadlines
        expired = [i for i, deadline in deadlines.items() if deadline <= now]
        for idler in expired:
            del deadlines[idler]
        if deadlines:  # set again before anyone is told
            self._timer_at = min(deadlines.values())
            self._timer = loop.call_at(self._timer_at, self._fire)
        for idler in expired:
            try:
                idler.idle_expired()
            except Exception:  # one stream's failure must not leave the others untold
                logger.exception("stream idle limit: could not end a silent stream")


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdleWatch] = (
    weakref.WeakKeyDictionary()
)


def idle_watch() -> IdleWatch:
    """The running loop's watch."""
    loop = asyncio.get_running_loop()
    watch = _WATCHES.get(loop)
    if watch is None:
        watch = _WATCHES[loop] = IdleWatch()
    return watch
