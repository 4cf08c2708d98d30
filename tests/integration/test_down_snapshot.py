"""The memory budget store's snapshot file cannot be written (disk full, no permission, its
directory gone) or read at start (corrupt, a directory, no permission): requests keep
flowing, spend stays counted in memory, the last good snapshot is never truncated, the
failure is logged (not once per attempt) and counted, and the next snapshot after the
cause is gone succeeds.

The disk-full case runs on a real 64 KiB tmpfs when the tests run as root; the other
faults need no privilege (an injected ``OSError`` in this process, or file modes)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from resillm.budget_store import SnapshotFile
from tests.conftest import RunningServer, run_gateway
from tests.integration.down_servers import serve_process
from tests.integration.test_budget import budget_config, budget_of, post

pytestmark = pytest.mark.anyio
INTERVAL_S = 0.1
FAST_S = 1.0
NANO = 1e-9


@asynccontextmanager
async def started(config: dict[str, Any]) -> AsyncIterator[RunningServer]:
    """``run_gateway``, bounded: a gateway that fails to start keeps its socket listening,
    and the fixture's health check would wait on it forever."""
    async with asyncio.timeout(60), run_gateway(config) as gw:
        yield gw


def client() -> aiohttp.ClientSession:
    """A gateway that failed to start may still hold its socket open: never wait forever."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))


def snapshot_config(directory: Path, **budget: Any) -> dict[str, Any]:
    return budget_config(directory, hourly_limit=10.0, snapshot_interval="100ms", **budget)


def saved_spend(path: Path) -> float | None:
    """The global hour's spend in a snapshot file, ``None`` when there is none."""
    try:
        snapshot = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    spent = [w["spent"] for w in snapshot["windows"] if w["key"].startswith("global:h")]
    return round(sum(spent) * NANO, 9)


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def no_temporary_kept(directory: Path) -> bool:
    """Whether a failed write's temporary file was removed: one that stays is seen in
    every look; one being written right now, in one look at most."""
    for _ in range(10):
        if not [p for p in directory.iterdir() if p.name.endswith(".tmp")]:
            return True
        await asyncio.sleep(0.037)
    return False


async def store_errors(url: str, operation: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    found = re.search(
        rf'resillm_budget_store_errors_total{{operation="{operation}",policy="none"}} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


async def timed_posts(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.monotonic()
        assert await post(session, url) == 200
        times.append(time.monotonic() - started)
    return times


def budget_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "resillm.budget" and text in r.getMessage()]


async def run_through_a_write_fault(
    directory: Path,
    caplog: pytest.LogCaptureFixture,
    start_fault: Callable[[], None],
    end_fault: Callable[[], None],
    reason: str,
) -> None:
    """One request, its snapshot; then the fault: three more requests, answered and
    counted in memory while every snapshot fails and the first one stays intact; then
    the cause is gone and the next snapshot holds all four."""
    path = directory / "budget.json"
    caplog.set_level(logging.WARNING, logger="resillm.budget")
    async with started(snapshot_config(directory)) as gw, client() as s:
        assert await post(s, gw.url) == 200
        await wait_until(lambda: saved_spend(path) == 0.01)
        good = path.read_bytes()
        start_fault()
        try:
            times = await timed_posts(s, gw.url, 3)
            await wait_until(lambda: budget_lines(caplog, " failed ("))
            failed_at = time.monotonic()
            await wait_until(lambda: time.monotonic() - failed_at > 5 * INTERVAL_S)
            errors = await store_errors(gw.url, "snapshot")
            assert path.read_bytes() == good  # the last good snapshot, whole
            assert await no_temporary_kept(directory)
            assert (await budget_of(gw.url))["current_hour"]["spent"] == 0.04
        finally:
            end_fault()
        await wait_until(lambda: saved_spend(path) == 0.04)
    assert max(times) < FAST_S, times
    assert errors >= 3  # a failed write every interval, each counted
    (failed,) = budget_lines(caplog, " failed (")  # ... and logged once
    assert reason in failed.getMessage()
    assert "spend is kept in memory" in failed.getMessage()
    assert failed.exc_info is None
    assert len(budget_lines(caplog, "written again")) == 1


# -- disk full on a real tmpfs --------------------------------------------------------------


@contextmanager
def tmpfs(disk: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``disk``: needs root (or CAP_SYS_ADMIN); skipped, with the
    reason, otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the injected faults cover this case")
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        yield disk


def fill(filler: Path) -> None:
    """Write ``filler`` until the disk refuses one more byte."""
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"x" * 1024)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


async def test_a_full_disk_keeps_requests_flowing_and_the_last_snapshot_whole(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filler = small_disk / "filler"

    def disk_full() -> None:
        fill(filler)

    await run_through_a_write_fault(
        small_disk, caplog, disk_full, filler.unlink, "No space left on device"
    )
    assert sorted(p.name for p in small_disk.iterdir()) == ["budget.json"]


# -- the same faults without privileges ------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "code", "reason"),
    [
        ("fsync", errno.ENOSPC, "No space left on device"),  # the temporary is half written
        ("replace", errno.EACCES, "Permission denied"),  # the rename is refused
    ],
)
async def test_an_injected_write_failure_is_survived_the_same_way(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
    code: int,
    reason: str,
) -> None:
    real = getattr(os, call)
    failing = {"on": False}

    def fault(*args: Any, **kwargs: Any) -> Any:
        if failing["on"]:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, fault)
    await run_through_a_write_fault(
        tmp_path,
        caplog,
        lambda: failing.update(on=True),
        lambda: failing.update(on=False),
        reason,
    )


async def test_a_read_only_directory_is_survived_the_same_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        await run_through_a_write_fault(
            tmp_path,
            caplog,
            lambda: tmp_path.chmod(0o555),
            lambda: tmp_path.chmod(0o755),
            "Permission denied",
        )
        return
    # Root writes into any directory whatever its mode; a read-only file system refuses it.
    with tmpfs(tmp_path / "disk", "1m") as disk:

        def remount(mode: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)

        await run_through_a_write_fault(
            disk, caplog, lambda: remount("ro"), lambda: remount("rw"), "Read-only file system"
        )


async def test_a_vanished_directory_is_made_again_or_waited_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleted, the directory is simply made again at the next snapshot; replaced by a
    file, the snapshots fail until the file is gone."""
    directory = tmp_path / "state"
    path = directory / "budget.json"
    caplog.set_level(logging.WARNING, logger="resillm.budget")
    async with started(snapshot_config(directory)) as gw, client() as s:
        assert await post(s, gw.url) == 200
        await wait_until(lambda: saved_spend(path) == 0.01)
        shutil.rmtree(directory)
        assert await post(s, gw.url) == 200
        await wait_until(lambda: saved_spend(path) == 0.02)
        shutil.rmtree(directory)
        directory.write_text("not a directory")
        assert await post(s, gw.url) == 200
        await wait_until(lambda: budget_lines(caplog, " failed ("))
        assert (await budget_of(gw.url))["current_hour"]["spent"] == 0.03
        directory.unlink()
        await wait_until(lambda: saved_spend(path) == 0.03)
    assert len(budget_lines(caplog, " failed (")) == 1
    assert len(budget_lines(caplog, "written again")) == 1


# -- an unreadable snapshot at start ---------------------------------------------------------


def make_corrupt(path: Path) -> None:
    path.write_text('{"version": 1, "saved_at": 0, "windows": [{"key": ')  # cut short


def make_directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "reason", "kept"),
    [
        (make_corrupt, "Input data was truncated", "kept as"),
        (make_directory, "Is a directory", "left where it is"),
    ],
)
async def test_an_unreadable_snapshot_at_start_is_logged_and_spend_starts_from_zero(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[Path], None],
    reason: str,
    kept: str,
) -> None:
    path = tmp_path / "budget.json"
    make(path)
    caplog.set_level(logging.WARNING, logger="resillm.budget")
    async with started(snapshot_config(tmp_path)) as gw, client() as s:
        assert await post(s, gw.url) == 200
        assert (await budget_of(gw.url))["current_hour"]["spent"] == 0.01
        assert await store_errors(gw.url, "restore") == 1
    (line,) = budget_lines(caplog, "is unreadable (")
    assert reason in line.getMessage() and kept in line.getMessage()
    assert "spend starts from 0" in line.getMessage()
    assert line.exc_info is None
    if make is make_corrupt:  # set aside for inspection, and a new snapshot written
        assert len(list(tmp_path.glob("budget.json.corrupt-*"))) == 1
        assert saved_spend(path) == 0.01


async def test_a_snapshot_without_read_permission_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "budget.json"
    path.write_text("{}")
    if os.geteuid() == 0:  # root reads any file: the refusal is injected instead

        def refused(self: SnapshotFile) -> bytes:
            raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

        monkeypatch.setattr(SnapshotFile, "read", refused)
    else:
        path.chmod(0)
    caplog.set_level(logging.WARNING, logger="resillm.budget")
    async with started(snapshot_config(tmp_path)) as gw, client() as s:
        assert await post(s, gw.url) == 200
    (line,) = budget_lines(caplog, "is unreadable (")
    assert "(Permission denied): kept as" in line.getMessage()
    assert len(list(tmp_path.glob("budget.json.corrupt-*"))) == 1  # never overwritten


async def test_serve_starts_with_an_unreadable_snapshot_and_no_traceback(tmp_path: Path) -> None:
    """Before: the gateway did not start, and stderr held two tracebacks."""
    (tmp_path / "budget.json").mkdir()
    config = snapshot_config(tmp_path)
    async with serve_process(config, tmp_path / "resillm.yaml") as served:
        async with client() as session:
            assert await post(session, served.url) == 200
        code, _ = await served.stop()
    records = served.records()  # every line is JSON
    assert code == 0
    assert not [r for r in records if "exception" in r or "Traceback" in r["msg"]], records
    assert any("is unreadable (Is a directory)" in r["msg"] for r in records)
