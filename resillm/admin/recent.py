"""The last ``admin.recent_requests`` finished ``/v1`` requests, for the admin page.

The access-log layer hands over each request's access-log fields (the dict it logs, bodies
included and already redacted when ``logging.log_responses`` is on); :meth:`append` stamps
it and puts it in a bounded deque. Nothing else happens per request. The ring belongs to
the gateway, so it survives reloads; a reload that changes the size keeps the newest.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from resillm.redact import scrub_secrets

Clock = Callable[[], float]
Fields = dict[str, Any]


class RecentRequests:
    __slots__ = ("_clock", "_items")

    def __init__(self, size: int = 200, clock: Clock = time.time) -> None:
        self._clock = clock
        self._items: deque[tuple[float, Fields]] = deque(maxlen=size)

    @property
    def size(self) -> int:
        return self._items.maxlen or 0

    def append(self, fields: Fields) -> None:
        """One finished request (the per-request path: one append)."""
        self._items.append((self._clock(), fields))

    def resize(self, size: int) -> None:
        if size != self.size:
            self._items = deque(self._items, maxlen=size)

    def clear(self) -> None:
        self._items.clear()

    def newest(self, limit: int | None = None, secrets: Iterable[str] = ()) -> list[Fields]:
        """Newest first, each with its finish time as ``ts`` (ISO 8601 UTC), and every
        configured secret scrubbed from its strings (an upstream's error message may quote
        what it was sent)."""
        items = list(self._items)
        items.reverse()
        if limit is not None:
            items = items[: max(0, limit)]
        known = tuple(secrets)
        return [{"ts": _iso(ts), **_scrubbed(fields, known)} for ts, fields in items]


def _iso(epoch: float) -> str:
    whole = int(epoch)
    millis = int((epoch - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _scrubbed(value: Any, secrets: tuple[str, ...]) -> Any:
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub_secrets(value, secrets)
    if isinstance(value, dict):
        return {k: _scrubbed(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, secrets) for v in value]
    return value
