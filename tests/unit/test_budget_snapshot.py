"""The snapshot file's failure paths, deterministic: no gateway, no timing."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

import resillm.budget_store
from resillm.budget_store import MemoryBudgetStore, SnapshotFile, SnapshotKeeper

pytestmark = pytest.mark.anyio


def failing(call: str, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def fault(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, fault)


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_snapshot_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    file = SnapshotFile(tmp_path / "budget.json")
    file.write(b"good")
    with monkeypatch.context() as patch:
        failing(call, errno.ENOSPC, patch)
        with pytest.raises(OSError, match="No space left"):
            file.write(b"newer")
    assert os.listdir(tmp_path) == ["budget.json"]
    assert file.read() == b"good"


async def test_failed_snapshots_are_counted_each_time_and_logged_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[str] = []
    keeper = SnapshotKeeper(on_error=errors.append)
    store = MemoryBudgetStore()
    path = str(tmp_path / "budget.json")
    with caplog.at_level(logging.WARNING, logger="resillm.budget"):
        with monkeypatch.context() as patch:
            failing("fsync", errno.ENOSPC, patch)
            for _ in range(3):
                await keeper.save(store, path, 0.0)
                assert store.dirty  # written at the next interval
            patch.setattr(resillm.budget_store, "SNAPSHOT_ERROR_LOG_EVERY_S", 0.0)
            await keeper.save(store, path, 0.0)
        await keeper.save(store, path, 0.0)
    assert errors == ["snapshot"] * 4
    assert not store.dirty
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # the start, one reminder, the end
    assert "failed (No space left on device): spend is kept in memory" in lines[0]
    assert lines[2].endswith("written again")
