"""The worker supervisor's decisions when a worker ends (no processes: a stand-in each)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from resillm.workers import MIN_UPTIME_S, Supervisor, _Worker


class StandIn:
    """What the supervisor reads of a ``multiprocessing`` process."""

    def __init__(self, exitcode: int | None, pid: int = 4242) -> None:
        self.exitcode = exitcode
        self.pid = pid
        self.killed = False

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> tuple[Supervisor, list[Any]]:
    calls: list[Any] = []
    sup = Supervisor(hyper=None, workers=2, graceful_timeout=30.0)
    monkeypatch.setattr(sup, "_spawn", lambda slot: calls.append(("spawn", slot)))
    monkeypatch.setattr(sup, "_signal_all", lambda signum: calls.append(("signal", signum)))
    monkeypatch.setattr(sup, "_close_sockets", lambda: calls.append(("close",)))
    return sup, calls


def ended(sup: Supervisor, exitcode: int, *, age_s: float, slot: int = 1) -> None:
    started = time.monotonic() - age_s
    sup._ended(_Worker(slot, StandIn(exitcode), started))


def test_a_worker_that_dies_after_its_start_is_replaced(supervisor: Any) -> None:
    sup, calls = supervisor
    ended(sup, -9, age_s=MIN_UPTIME_S + 60)
    assert calls == [("spawn", 1)]
    assert not sup.failed and sup.stopping_since is None


def test_a_worker_that_dies_while_starting_stops_the_rest(supervisor: Any) -> None:
    sup, calls = supervisor
    ended(sup, 1, age_s=0.5)
    assert calls == [("close",), ("signal", signal.SIGTERM)]  # no respawn loop
    assert sup.failed and sup.stopping_since is not None


def test_while_stopping_workers_are_not_replaced_and_a_bad_exit_is_an_error(
    supervisor: Any,
) -> None:
    sup, calls = supervisor
    sup.stop()
    ended(sup, 0, age_s=60, slot=0)
    assert not sup.failed
    ended(sup, -15, age_s=60, slot=1)
    assert sup.failed
    assert ("spawn", 0) not in calls and ("spawn", 1) not in calls


def test_stop_closes_the_socket_once_and_signals_every_time(supervisor: Any) -> None:
    sup, calls = supervisor
    sup.stop()
    first = sup.stopping_since
    sup.stop()  # a second SIGTERM, or SIGINT from the terminal as well
    assert sup.stopping_since == first
    assert calls == [("close",), ("signal", signal.SIGTERM), ("signal", signal.SIGTERM)]


def test_sighup_is_passed_on_and_stops_nothing(supervisor: Any) -> None:
    sup, calls = supervisor
    sup._on_signal(signal.SIGHUP, None)
    assert calls == [("signal", signal.SIGHUP)] and sup.stopping_since is None


def test_workers_still_running_past_the_grace_period_are_killed() -> None:
    sup = Supervisor(hyper=None, workers=2, graceful_timeout=1.0)
    running, gone = StandIn(None), StandIn(0)
    sup.running = [_Worker(0, running, 0.0), _Worker(1, gone, 0.0)]
    sup._kill_all()
    assert running.killed and not gone.killed and sup.failed


def test_a_worker_killed_by_the_stop_while_still_starting_is_a_clean_stop(
    supervisor: Any,
) -> None:
    # The spawned interpreter unblocks SIGTERM before the worker's own code runs: a stop in
    # that first moment kills it, with nothing in flight.
    sup, _calls = supervisor
    sup.stop()
    ended(sup, -15, age_s=0.5, slot=0)
    assert not sup.failed
