"""Where cached answers live: an in-process LRU, or Redis shared between instances.

Both stores hold opaque bytes under a key, for a TTL. The memory store is bounded twice,
by entries and by bytes, evicting the least recently used; expired entries go when they
are read and on a periodic sweep (storing does not look for them: a full store makes room
by recency, and an expired entry is never served). The Redis store sets the TTL
in Redis (``SET ... PX``) and bounds every call by a short timeout: a Redis that is down
makes it raise :class:`CacheUnavailable` quickly, then at once for a moment, so a dead
Redis never slows requests down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("resillm.cache")
# What one entry costs besides its key and value: the two dict slots and the entry tuple.
ENTRY_OVERHEAD_BYTES = 160
# After a Redis failure the store is not tried again for this long.
DOWN_FOR_S = 1.0
KEY_PREFIX = "resillm:cache:"


class CacheUnavailable(Exception):
    """The store could not answer (Redis down, slow or refusing)."""


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def aclose(self) -> None: ...


class _Entry(NamedTuple):
    value: Any  # bytes, or an object the caller sized (kept as is: never copied or encoded)
    expires_at: float
    size: int


class MemoryCacheStore:
    """An LRU bounded by ``max_entries`` and ``max_bytes``, each entry with a TTL.

    Methods never suspend between reading and writing, so concurrent requests see a
    consistent store. ``clock`` is injectable for tests.
    """

    def __init__(
        self, *, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        # Soonest to expire first. A plain dict (insertion order): it is only walked by the
        # sweep, so it needs none of an OrderedDict's reordering, nor its cost per store.
        self._by_expiry: dict[str, None] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._evict()

    async def get(self, key: str) -> bytes | None:
        value = self.get_now(key)
        return value if value is None or isinstance(value, bytes) else None  # bytes only

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.set_now(key, value, ttl_s)

    def get_now(self, key: str) -> Any:
        """:meth:`get` without a coroutine (the cache layer's path when this is the store):
        the value as stored, ``None`` when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self.clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def set_now(self, key: str, value: Any, ttl_s: float, size: int | None = None) -> None:
        """:meth:`set` without a coroutine. ``value`` may be any object when its ``size``
        (in bytes, for ``max_bytes``) is given: it is kept as it is."""
        size = len(key) + (len(value) if size is None else size) + ENTRY_OVERHEAD_BYTES
        if key in self._entries:
            self._remove(key)
        if size > self.max_bytes:
            return  # it would push out everything else and still not fit
        # Made as the tuple it is: a NamedTuple's own constructor costs ten times as much.
        self._entries[key] = tuple.__new__(_Entry, (value, self.clock() + ttl_s, size))
        # Entries are stored with one TTL, so storage order is expiry order (a reload that
        # changes the TTL only makes the sweep stop a little early).
        self._by_expiry[key] = None
        self.bytes += size
        entries = self._entries
        if len(entries) > self.max_entries and self.bytes <= self.max_bytes:
            # A full store takes one in, one out: the least recently used, inline.
            evicted, entry = entries.popitem(last=False)
            del self._by_expiry[evicted]
            self.bytes -= entry.size
        if len(entries) > self.max_entries or self.bytes > self.max_bytes:
            self._evict()

    def purge_expired(self) -> int:
        """Drop expired entries; how many went."""
        now, expired = self.clock(), []
        for key in self._by_expiry:  # one pass: the dict keeps its removed slots up front
            if self._entries[key].expires_at > now:
                break
            expired.append(key)
        for key in expired:
            self._remove(key)
        return len(expired)

    def clear(self) -> None:
        self._entries.clear()
        self._by_expiry.clear()
        self.bytes = 0

    def _evict(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self.max_entries or self.bytes > self.max_bytes):
            self._remove(next(iter(entries)))  # the least recently used

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        del self._by_expiry[key]
        self.bytes -= entry.size

    async def aclose(self) -> None:
        self.clear()


class RedisCacheStore:
    """Answers in Redis under ``resillm:cache:KEY``, expiring in Redis.

    Every call is bounded by ``timeout_s`` overall, with no retry loop beyond one reconnect.
    The first failure of an episode is logged as a warning, the recovery at info level.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout_s = timeout_s
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),  # one reconnect: a connection the server dropped
            health_check_interval=0,
        )
        self._down_until = 0.0
        self._down = False

    async def _run(self, call: Any) -> Any:
        from redis.exceptions import RedisError

        if time.monotonic() < self._down_until:
            call.close()
            raise CacheUnavailable("redis is unavailable (recent failure)")
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await call
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + DOWN_FOR_S
            reason = str(exc) or type(exc).__name__
            if not self._down:
                self._down = True
                logger.warning(
                    "cache: redis is unavailable (%s); requests go upstream without the cache "
                    "until it is back",
                    reason,
                )
            raise CacheUnavailable(f"redis is unavailable: {reason}") from exc
        if self._down:
            self._down = False
            logger.info("cache: redis is back")
        return result

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._run(self.client.get(KEY_PREFIX + key))
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._run(self.client.set(KEY_PREFIX + key, value, px=ttl_ms))

    async def aclose(self) -> None:
        await self.client.aclose()
