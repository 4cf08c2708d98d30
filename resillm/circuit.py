"""Circuit breakers, one per target (provider + model + key), with an injectable clock.

closed --failure_threshold consecutive failures--> open --open_timeout--> half-open;
half-open lets ``half_open_max_requests`` probes through at a time; ``success_threshold``
successes close it, one failure opens it again. Every admitted attempt ends in exactly one
of ``success``, ``failure`` or ``release`` (no verdict: the client's own error, or
cancelled), so a probe slot is never leaked. All of it runs on the event loop thread
without awaiting, so concurrent requests cannot both take the last probe slot.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator

from resillm.config import CircuitBreakerConfig

Clock = Callable[[], float]
StateListener = Callable[[str, "CircuitState"], None]


class CircuitState(enum.IntEnum):
    """Values are the ``resillm_circuit_state`` gauge's."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_listener",
        "_opened_at",
        "_state",
        "config",
        "failures",
        "name",
        "probes",
        "successes",
    )

    def __init__(
        self,
        config: CircuitBreakerConfig,
        clock: Clock = time.monotonic,
        *,
        name: str = "",
        listener: StateListener | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.name = name
        self._listener = listener  # told every transition (the resillm_circuit_state gauge)
        self._state = CircuitState.CLOSED
        self.failures = 0  # consecutive, while closed
        self.successes = 0  # while half-open
        self.probes = 0  # half-open attempts in flight
        self._opened_at = 0.0

    @property
    def state(self) -> CircuitState:
        return self._state

    @state.setter
    def state(self, state: CircuitState) -> None:
        if state is not self._state:
            self._state = state
            if self._listener is not None:
                self._listener(self.name, state)

    def allow(self) -> bool:
        """Admit one attempt now? (Takes a probe slot when half-open.)"""
        if self.state is CircuitState.OPEN:
            if self._clock() - self._opened_at < self.config.open_timeout:
                return False
            self.state, self.successes, self.probes = CircuitState.HALF_OPEN, 0, 0
        if self.state is CircuitState.HALF_OPEN:
            if self.probes >= self.config.half_open_max_requests:
                return False
            self.probes += 1
        return True

    def available(self) -> bool:
        """Would ``allow`` admit an attempt now? (Reads only; takes no probe slot.)"""
        if self.state is CircuitState.OPEN:
            return self._clock() - self._opened_at >= self.config.open_timeout
        if self.state is CircuitState.HALF_OPEN:
            return self.probes < self.config.half_open_max_requests
        return True

    def success(self) -> None:
        if self.state is CircuitState.HALF_OPEN:
            self._end_probe()
            self.successes += 1
            if self.successes >= self.config.success_threshold:
                self.state, self.failures = CircuitState.CLOSED, 0
        elif self.state is CircuitState.CLOSED:
            self.failures = 0

    def failure(self) -> None:
        if self.state is CircuitState.HALF_OPEN:
            self._end_probe()
            self._open()
        elif self.state is CircuitState.CLOSED:
            self.failures += 1
            if self.failures >= self.config.failure_threshold:
                self._open()

    def release(self) -> None:
        """The attempt ended without saying anything about the target's health."""
        if self.state is CircuitState.HALF_OPEN:
            self._end_probe()

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_timeout - self._clock())

    def _open(self) -> None:
        self.state, self._opened_at, self.successes, self.probes = (
            CircuitState.OPEN,
            self._clock(),
            0,
            0,
        )

    def _end_probe(self) -> None:
        if self.probes > 0:
            self.probes -= 1


class CircuitRegistry:
    """Every target's breaker by target id; outlives config reloads so state is kept."""

    def __init__(
        self,
        config: CircuitBreakerConfig,
        clock: Clock = time.monotonic,
        listener: StateListener | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._listener = listener
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, target_id: str) -> CircuitBreaker:
        breaker = self._breakers.get(target_id)
        if breaker is None:
            breaker = CircuitBreaker(
                self.config, self._clock, name=target_id, listener=self._listener
            )
            self._breakers[target_id] = breaker
            if self._listener is not None:
                self._listener(target_id, breaker.state)
        return breaker

    def configure(self, config: CircuitBreakerConfig) -> None:
        """New thresholds apply to every breaker from now on; states are kept."""
        self.config = config
        for breaker in self._breakers.values():
            breaker.config = config

    def items(self) -> Iterator[tuple[str, CircuitBreaker]]:
        return iter(self._breakers.items())
