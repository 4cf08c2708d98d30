"""The Redis budget store: windows shared by every gateway instance, exactly.

Each window is a hash (``spent``, ``reserved``, ``requests``, ``alert:T``) that expires an
hour after its window ends; reserve and settle are one Lua script each, in integer
nano-dollars, so the ``spent + reserved >= limit`` check and the reservation it guards are
atomic across instances, and a threshold alert is claimed by exactly one of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from resillm.budget_store import (
    KEEP_AFTER_END_S,
    Crossing,
    Meter,
    Reserved,
    Settled,
    StoreUnavailable,
    Totals,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

# KEYS: one hash per meter. ARGV: amount, force, then (limit or "", ttl) per meter.
_RESERVE_LUA = """
local amount = tonumber(ARGV[1])
local force = ARGV[2] == '1'
local over = {}
for i = 1, #KEYS do
  local limit = ARGV[1 + 2 * i]
  if limit ~= '' then
    local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
    if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) >= tonumber(limit) then
      over[#over + 1] = i
    end
  end
end
if #over > 0 and not force then return {0, over} end
for i = 1, #KEYS do
  if amount > 0 then redis.call('HINCRBY', KEYS[i], 'reserved', amount) end
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2 + 2 * i]))
end
return {1, over}
"""

# KEYS: the r hashes reserved in, then the hashes charged. ARGV: r, amount, cost, counted,
# k, k thresholds, then (limit or "", ttl) per charged hash. Returns the charged hashes'
# spend and the (hash, threshold) index pairs that fired, flat.
_SETTLE_LUA = """
local r = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local counted = ARGV[4] == '1'
local k = tonumber(ARGV[5])
for i = 1, r do
  if amount > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('HINCRBY', KEYS[i], 'reserved', -amount) < 0 then
      redis.call('HSET', KEYS[i], 'reserved', 0)
    end
  end
end
local spent_out = {}
local fired = {}
for j = 1, #KEYS - r do
  local key = KEYS[r + j]
  local base = 5 + k + 2 * (j - 1)
  local limit = ARGV[base + 1]
  local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
  if cost > 0 then spent = redis.call('HINCRBY', key, 'spent', cost) end
  if counted then redis.call('HINCRBY', key, 'requests', 1) end
  redis.call('EXPIRE', key, tonumber(ARGV[base + 2]))
  spent_out[j] = spent
  if limit ~= '' and cost > 0 then
    for t = 1, k do
      local threshold = ARGV[5 + t]
      if spent >= tonumber(threshold) * tonumber(limit)
          and redis.call('HSETNX', key, 'alert:' .. threshold, 1) == 1 then
        fired[#fired + 1] = j
        fired[#fired + 1] = t
      end
    end
  end
end
return {spent_out, fired}
"""

KEY_PREFIX = "{resillm-budget}:"  # one hash tag: every key of a script in one cluster slot
# After a failure the store is not tried again for this long: a dead Redis costs requests
# nothing while the policy answers for it.
DOWN_FOR_S = 1.0


class RedisBudgetStore:
    """Windows as Redis hashes (``spent``, ``reserved``, ``requests``, ``alert:T``) that
    expire an hour after their window; every operation is one Lua script or transaction.

    Each call is bounded by ``timeout`` (socket and overall), with no retry loop: a Redis
    that is down or unreachable raises :class:`StoreUnavailable` within about twice the
    timeout, and for :data:`DOWN_FOR_S` afterwards at once.
    """

    def __init__(
        self, url: str, *, timeout_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.timeout_s = timeout_s
        self.clock = clock
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),  # one reconnect: a connection the server dropped
            health_check_interval=0,
        )
        self._reserve = self.client.register_script(_RESERVE_LUA)
        self._settle = self.client.register_script(_SETTLE_LUA)
        self._down_until = 0.0

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        from redis.exceptions import RedisError

        if time.monotonic() < self._down_until:
            raise StoreUnavailable("redis is unavailable (recent failure)")
        try:
            async with asyncio.timeout(self.timeout_s * 2 + 0.1):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + DOWN_FOR_S
            raise StoreUnavailable(f"redis is unavailable: {exc or type(exc).__name__}") from exc

    def _ttl(self, meter: Meter) -> int:
        return max(1, int(meter.window.end + KEEP_AFTER_END_S - self.clock()))

    async def reserve(self, meters: Sequence[Meter], amount: int, *, force: bool) -> Reserved:
        args: list[str | int] = [amount, int(force)]
        for meter in meters:
            args += [_limit_arg(meter), self._ttl(meter)]
        keys = [KEY_PREFIX + m.key for m in meters]
        admitted, over = await self._run(lambda: self._reserve(keys=keys, args=args))
        return Reserved(bool(admitted), [meters[int(i) - 1] for i in over])

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
        args: list[str | int] = [len(reserved_in), amount, cost, int(counted), len(thresholds)]
        args += [repr(float(t)) for t in thresholds]
        for meter in charge:
            args += [_limit_arg(meter), self._ttl(meter)]
        keys = [KEY_PREFIX + m.key for m in (*reserved_in, *charge)]
        spent, fired = await self._run(lambda: self._settle(keys=keys, args=args))
        spent = [int(s) for s in spent]
        crossings = [
            Crossing(charge[int(j) - 1], thresholds[int(t) - 1], spent[int(j) - 1])
            for j, t in zip(fired[::2], fired[1::2], strict=True)
        ]
        return Settled(spent, crossings)

    async def totals(self, meters: Sequence[Meter]) -> list[Totals]:
        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                for meter in meters:
                    pipe.hmget(KEY_PREFIX + meter.key, ["spent", "reserved", "requests"])
                return await pipe.execute()

        rows = await self._run(read)
        return [Totals(*(int(v or 0) for v in row)) for row in rows]

    async def aclose(self) -> None:
        await self.client.aclose()


def _limit_arg(meter: Meter) -> str:
    return "" if meter.limit is None else str(meter.limit)
