"""The response cache: keys, the store behind them, and the requests in flight.

**The key** is the alias plus every field of the request body that can change the answer,
canonical: the decoded body is re-encoded with sorted keys and no whitespace, so key order
and formatting never matter, then hashed (BLAKE2b, 160 bits). :data:`IGNORED_FIELDS` lists
what is left out because it does not change the answer; a field set to ``null`` counts as
absent, and ``n: 1`` as no ``n``. Which client key sent the request is not part of the key: the same
question to the same alias gets the same answer, whoever asks.

:class:`ResponseCache` belongs to the gateway, so stored answers and the requests in flight
outlive config reloads; ``configure`` applies new cache settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import msgspec

from resillm.cache_answer import (
    CachedAnswer,
    CachedBody,
    Stored,
    answer_decoder,
    answer_encoder,
    readable,
)
from resillm.cache_store import CacheStore, CacheUnavailable, MemoryCacheStore, RedisCacheStore
from resillm.config import CacheConfig

logger = logging.getLogger("resillm.cache")

# Fields that do not change the answer: who asks (user, safety_identifier), how it is
# delivered (stream, stream_options), what OpenAI does with it afterwards (metadata, store,
# service_tier), and a hint for the provider's own prompt cache (prompt_cache_key).
IGNORED_FIELDS = frozenset(
    {
        "user",
        "stream",
        "stream_options",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
KEY_VERSION = b"v2"  # bump when the key or the stored answer changes shape
SWEEP_INTERVAL_S = 60.0
BODY_OVERHEAD = 100  # a CachedBody kept in memory, besides its strings' lengths: objects
_key_encoder = msgspec.json.Encoder(order="sorted")

Result = Literal["hit", "miss", "error"]


def cache_key(alias: str, raw: Mapping[str, Any]) -> str:
    """The cache key of a chat completion request for ``alias`` (its decoded JSON body)."""
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        if name in IGNORED_FIELDS or value is None or (name == "n" and value == 1):
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # temperature 1 and 1.0 ask the same
        fields[name] = value
    fields["model"] = alias
    # BLAKE2b: as sound as SHA-256 for a key, and about 40% fewer instructions a request
    # (it does not go through OpenSSL's digest machinery).
    canonical = KEY_VERSION + _key_encoder.encode(fields)
    return hashlib.blake2b(canonical, digest_size=20).hexdigest()


class Lookup(NamedTuple):
    answer: CachedAnswer | None
    result: Result  # "error": the store could not answer, the request went on without it


MISSED = Lookup(None, "miss")


class Flight:
    """One leading request in flight. The future its waiters await is made when the first
    one comes: most requests lead a flight no one joins, and pay for no future."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: asyncio.Future[Stored | None] | None = None


class Flights:
    """Requests in flight by key: the first leads, identical ones arriving meanwhile wait
    for the answer it lands (``None`` when it failed: a failure is never shared)."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def current(self, key: str) -> asyncio.Future[Stored | None] | None:
        """What to wait on for the answer of the flight in progress for ``key``, if any."""
        flight = self._flights.get(key)
        if flight is None:
            return None
        if flight.waiters is None:
            flight.waiters = asyncio.get_running_loop().create_future()
        return flight.waiters

    def lead(self, key: str) -> Flight | None:
        """Take the lead for ``key``; ``None`` when another request already has it."""
        if key in self._flights:
            return None
        flight = self._flights[key] = Flight()
        return flight

    def land(self, key: str, flight: Flight, answer: Stored | None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        waiters = flight.waiters
        if waiters is not None and not waiters.done():
            waiters.set_result(answer)


class ResponseCache:
    """The gateway's cache: the configured store, the TTL, and the requests in flight."""

    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.memory = MemoryCacheStore(
            max_entries=config.max_size, max_bytes=config.max_bytes, clock=clock
        )
        self.redis: RedisCacheStore | None = None
        self.flights = Flights()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def store(self) -> CacheStore:
        return self.redis if self.redis is not None else self.memory

    async def start(self) -> None:
        await self.configure(self.config)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def configure(self, config: CacheConfig) -> None:
        """Apply (new) settings: bounds, TTL, backend. The memory store keeps its answers
        unless the cache was turned off or moved to Redis."""
        self.config = config
        self.memory.resize(max_entries=config.max_size, max_bytes=config.max_bytes)
        if not config.enabled or config.backend != "memory":
            self.memory.clear()
        wanted = config.enabled and config.backend == "redis"
        redis = self.redis
        if redis is not None and (
            not wanted or (redis.url, redis.timeout_s) != (config.redis_url, config.redis_timeout)
        ):
            self.redis = None
            await redis.aclose()  # a request still holding it fails over to a miss
        if wanted and self.redis is None:
            self.redis = RedisCacheStore(config.redis_url, timeout_s=config.redis_timeout)

    async def stop(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        redis, self.redis = self.redis, None
        if redis is not None:
            await redis.aclose()
        self.memory.clear()

    async def get(self, key: str) -> Lookup:
        found = self.get_now(key)
        if found is not None:
            return found
        try:
            value = await self.store.get(key)
        except CacheUnavailable:
            return Lookup(None, "error")
        return self._found(key, value)

    def get_now(self, key: str) -> Lookup | None:
        """:meth:`get` with no coroutine when the store is the memory one; ``None`` when it
        is remote (then :meth:`get`)."""
        if self.redis is not None:
            return None
        value = self.memory.get_now(key)
        return MISSED if value is None else self._found(key, value)

    def _found(self, key: str, value: bytes | CachedBody | None) -> Lookup:
        if value is None:
            return Lookup(None, "miss")
        if isinstance(value, CachedBody):
            stored: Stored = value  # kept in memory as it was: nothing to decode
        else:
            try:
                stored = answer_decoder.decode(value)
            except msgspec.DecodeError:  # written by another version: treat as absent
                logger.debug("cache: unreadable entry %s ignored", key)
                return Lookup(None, "miss")
        answer = readable(stored)
        return Lookup(None, "miss") if answer is None else Lookup(answer, "hit")

    async def put(self, key: str, answer: Stored) -> None:
        """Store ``answer``; a store that is down is logged by the store and skipped."""
        if self.put_now(key, answer):
            return
        with contextlib.suppress(CacheUnavailable):
            await self.store.set(key, answer_encoder.encode(answer), self.config.ttl)

    def put_now(self, key: str, answer: Stored) -> bool:
        """:meth:`put` with no coroutine when the store is the memory one; False when it is
        remote (then :meth:`put`).

        The memory store keeps a JSON answer's body as the object it is (the bytes the
        client was sent, shared, not copied into an encoding: most stored answers are never
        asked for again); a stream's assembled answer is encoded, compact and sized."""
        if self.redis is not None:
            return False
        if type(answer) is CachedBody:
            size = len(answer.body) + len(answer.model) + len(answer.provider) + BODY_OVERHEAD
            self.memory.set_now(key, answer, self.config.ttl, size)
        else:
            self.memory.set_now(key, answer_encoder.encode(answer), self.config.ttl)
        return True

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self.config.ttl))
            self.memory.purge_expired()
