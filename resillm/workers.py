"""Several worker processes on one listening socket, and what each of them keeps alone.

``resillm serve --workers N`` binds the socket once and starts N processes (spawned, not
forked: each builds its own event loop, HTTP session and gateway from ``$RESILLM_CONFIG``)
that accept on it. Everything a gateway keeps in memory is then per worker: circuits,
latency and in-flight figures, the memory cache, the memory budget store and the admin
page's recent requests. Only the Redis stores (``budget.store: redis``,
``cache.backend: redis``) are shared. :func:`per_worker_problems` says what that means for
a given config.

This supervisor replaces hypercorn's own multi-process runner, which stops every worker
with SIGTERM as soon as the first one has exited (cutting the streams still running in the
others), leaves its workers to die on a SIGTERM of their own (systemd signals every process
of a unit) and restarts them all on SIGHUP. Here, each worker runs hypercorn's
``worker_serve`` with its own signal handling:

- SIGTERM or SIGINT (to a worker, or to the supervisor, which passes SIGTERM on): stop
  accepting, let requests and streams finish up to ``server.graceful_timeout``, then the
  gateway's shutdown (budget snapshot, HTTP pool closed). The supervisor closes its copy
  of the socket at once, so new connections are refused rather than queued, and waits for
  every worker; one that is still there ``STOP_MARGIN_S`` after the grace period is killed.
- SIGHUP (to the supervisor, passed on): each worker reloads its config, as one process does.
- A worker that dies on its own is replaced, unless it died while starting (within
  ``MIN_UPTIME_S``): then the others are stopped and ``serve`` exits 1.
- A worker whose supervisor is gone stops, as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from resillm.config import Config

logger = logging.getLogger("resillm.workers")

MIN_UPTIME_S = 5.0  # a worker that exits sooner failed to start: no respawn loop
STOP_MARGIN_S = 10.0  # after graceful_timeout: lifespan shutdown, the last budget snapshot
POLL_S = 0.5
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- what is per worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerProblems:
    errors: list[str]
    warnings: list[str]


def per_worker_problems(config: Config, workers: int) -> WorkerProblems:
    """What running ``config`` in ``workers`` processes would get wrong.

    An error: budget limits on the memory store. Every worker would enforce the whole limit
    on its own spend (N workers could spend N times the limit) and overwrite the others'
    spend in the one ``snapshot_path``. Warnings: state that merely gets less useful.
    """
    from resillm.budget import has_limits  # aiohttp and more: not for `resillm version`

    if workers <= 1:
        return WorkerProblems([], [])
    errors: list[str] = []
    warnings: list[str] = []
    if config.budget.store == "memory" and has_limits(config):
        errors.append(
            f"{workers} workers with budget limits and budget.store: memory: each worker "
            "would enforce the whole limit on its own spend and overwrite the others' in "
            f"{config.budget.snapshot_path}; use budget.store: redis, or one worker"
        )
    if config.cache.enabled and config.cache.backend == "memory":
        warnings.append(
            "cache.backend: memory with several workers: each worker caches on its own, so "
            "an answer is a hit only on the worker that stored it; use cache.backend: redis"
        )
    return WorkerProblems(errors, warnings)


# -- the supervisor -------------------------------------------------------------------------


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    started_at: float


class Supervisor:
    """Starts ``workers`` processes on ``hyper``'s socket and keeps them until stopped."""

    def __init__(self, hyper: Any, workers: int, graceful_timeout: float) -> None:
        self.hyper = hyper
        self.workers = workers
        self.graceful_timeout = graceful_timeout
        self.context = multiprocessing.get_context("spawn")
        self.sockets: Any = None
        self.running: list[_Worker] = []
        self.stopping_since: float | None = None
        self.failed = False

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _SIGNALS}
        self.sockets = self.hyper.create_sockets()
        try:
            for slot in range(self.workers):
                if self.stopping_since is None:
                    self._spawn(slot)
            self._supervise()
        finally:
            self._close_sockets()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.failed else 0

    def _spawn(self, slot: int) -> None:
        process = self.context.Process(
            target=worker_main,
            args=(self.hyper, self.sockets, slot),
            name=f"resillm-worker-{slot}",
        )
        # Held back while the worker is being started (the spawned interpreter unblocks
        # SIGTERM and SIGINT again: the worker blocks them first thing, see worker_main).
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            process.start()
            self.running.append(_Worker(slot, process, time.monotonic()))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _supervise(self) -> None:
        while self.running:
            ended = wait([w.process.sentinel for w in self.running], timeout=POLL_S)
            for worker in [w for w in self.running if w.process.sentinel in ended]:
                worker.process.join()
                self.running.remove(worker)
                self._ended(worker)
            if self.stopping_since is not None:
                overdue = time.monotonic() - self.stopping_since
                if overdue > self.graceful_timeout + STOP_MARGIN_S:
                    self._kill_all()

    def _ended(self, worker: _Worker) -> None:
        code = worker.process.exitcode
        if self.stopping_since is not None:
            # A worker still starting when the stop came may die of the SIGTERM itself: the
            # spawned interpreter does not keep the blocked mask until worker_main runs. It
            # had nothing in flight yet, so that is a clean stop too.
            starting = time.monotonic() - worker.started_at < MIN_UPTIME_S
            if code != 0 and not (starting and code == -signal.SIGTERM):
                self.failed = True
                logger.error("worker %d exited with %s while stopping", worker.slot, code)
            return
        uptime = time.monotonic() - worker.started_at
        if uptime < MIN_UPTIME_S:
            logger.error(
                "worker %d exited with %s %.1fs after its start: stopping",
                worker.slot,
                code,
                uptime,
            )
            self.failed = True
            self.stop()
            return
        logger.error("worker %d exited with %s: starting a new one", worker.slot, code)
        self._spawn(worker.slot)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._signal_all(signal.SIGHUP)
        else:
            self.stop()

    def stop(self) -> None:
        """Stop accepting here and ask every worker to drain and stop."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self._close_sockets()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for worker in self.running:
            pid = worker.process.pid
            if pid is not None and worker.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):  # just exited: the loop sees it
                    os.kill(pid, signum)

    def _kill_all(self) -> None:
        for worker in self.running:
            if worker.process.exitcode is None:
                logger.error(
                    "worker %d still running %.0fs after the grace period: killed",
                    worker.slot,
                    STOP_MARGIN_S,
                )
                worker.process.kill()
        self.failed = True

    def _close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, None
        if sockets is None:
            return
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets):
            sock.close()


# -- one worker -----------------------------------------------------------------------------


def worker_main(hyper: Any, sockets: Any, slot: int) -> None:
    """A worker process: build the gateway from ``$RESILLM_CONFIG`` and serve ``sockets``."""
    # Until the loop's handlers are in place, a stop signal waits (serve_worker unblocks).
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    from resillm.server import run_loop, worker_app

    gateway = worker_app()
    if slot == 0:
        for warning in per_worker_problems(gateway.config, hyper.workers).warnings:
            logger.warning(warning)
    run_loop(lambda: serve_worker(gateway, hyper, sockets))


def quiet_cancelled_connections(loop: asyncio.AbstractEventLoop) -> None:
    """Connections still open when the grace period ends are cancelled; on Python < 3.12
    asyncio then reports each as an "Exception in callback" with a traceback. Nothing is
    wrong by then: keep such reports out of the log, pass every other one on."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.CancelledError):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


async def serve_worker(app: Any, hyper: Any, sockets: Any) -> None:
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.utils import wrap_app

    loop = asyncio.get_running_loop()
    quiet_cancelled_connections(loop)
    stopping = asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def reload() -> None:
        task = loop.create_task(app.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def stop() -> None:
        # Once stopping, a repeated SIGTERM must not kill the worker mid-drain or, once
        # the loop is closed and its handlers gone, during its teardown: keep it pending.
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked by the supervisor at spawn
    parent = multiprocessing.parent_process()
    if parent is not None:  # readable once the supervisor is gone, however it ended
        loop.add_reader(parent.sentinel, stop)
    await worker_serve(
        wrap_app(app.asgi, hyper.wsgi_max_body_size, "asgi"),
        hyper,
        sockets=sockets,
        shutdown_trigger=stopping.wait,
    )


def workers_fit(config: Config, workers: int) -> bool:
    """For ``serve``, before it binds: print the errors of :func:`per_worker_problems` and
    return ``False`` when there are any. (The first worker logs the warnings.)"""
    problems = per_worker_problems(config, workers)
    for error in problems.errors:
        print(f"resillm serve: {error}", file=sys.stderr)
    return not problems.errors
