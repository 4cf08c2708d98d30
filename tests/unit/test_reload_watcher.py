"""The config watcher sees every way a config file gets replaced, once per real change."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from resillm.reload import ConfigWatcher

pytestmark = pytest.mark.anyio


class Calls:
    def __init__(self) -> None:
        self.contents: list[str] = []
        self.event = asyncio.Event()

    def handler(self, path: Path) -> Callable[[], Awaitable[None]]:
        async def on_change() -> None:
            self.contents.append(path.read_text())
            self.event.set()

        return on_change

    async def next(self, timeout: float = 5.0) -> str:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return self.contents[-1]


async def watching(path: Path, calls: Calls) -> ConfigWatcher:
    watcher = ConfigWatcher(path, calls.handler(path), debounce_s=0.05)
    watcher.start()
    await asyncio.sleep(0.1)  # let the observer settle
    return watcher


async def test_an_edit_in_place_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text("a: 1\n")
    calls = Calls()
    watcher = await watching(path, calls)
    try:
        with path.open("w") as handle:
            handle.write("a: 2\n")
        assert await calls.next() == "a: 2\n"
    finally:
        await watcher.stop()


async def test_a_replace_by_rename_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text("a: 1\n")
    calls = Calls()
    watcher = await watching(path, calls)
    try:
        temp = tmp_path / ".resillm.yaml.swp"
        temp.write_text("a: 3\n")
        os.replace(temp, path)  # what editors do
        assert await calls.next() == "a: 3\n"
    finally:
        await watcher.stop()


async def test_a_kubernetes_style_symlink_swap_is_seen(tmp_path: Path) -> None:
    # ConfigMap volume: resillm.yaml -> ..data/resillm.yaml, ..data -> ..2026_01 (a dir).
    first, second = tmp_path / "..2026_01", tmp_path / "..2026_02"
    first.mkdir()
    second.mkdir()
    (first / "resillm.yaml").write_text("a: 1\n")
    (second / "resillm.yaml").write_text("a: 4\n")
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "resillm.yaml"
    path.symlink_to("..data/resillm.yaml")
    calls = Calls()
    watcher = await watching(path, calls)
    try:
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap
        assert await calls.next() == "a: 4\n"
    finally:
        await watcher.stop()


async def test_a_touch_without_a_change_calls_nothing(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text("a: 1\n")
    calls = Calls()
    watcher = await watching(path, calls)
    try:
        path.write_text("a: 1\n")
        (tmp_path / "unrelated.txt").write_text("x")
        with pytest.raises(TimeoutError):
            await calls.next(timeout=0.5)
        assert calls.contents == []
    finally:
        await watcher.stop()


async def test_a_burst_of_writes_is_one_reload_of_the_last_content(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text("a: 0\n")
    calls = Calls()
    watcher = await watching(path, calls)
    try:
        for n in range(1, 6):
            path.write_text(f"a: {n}\n")
        assert await calls.next() == "a: 5\n"
        with pytest.raises(TimeoutError):
            await calls.next(timeout=0.4)
        assert calls.contents == ["a: 5\n"]
    finally:
        await watcher.stop()


async def test_a_busy_neighbour_file_never_wakes_the_watcher(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text("a: 1\n")
    calls = Calls()
    watcher = await watching(path, calls)
    armed = 0
    original = watcher._arm

    def counting_arm() -> None:
        nonlocal armed
        armed += 1
        original()

    watcher._arm = counting_arm  # type: ignore[method-assign]
    try:
        with (tmp_path / "gateway.log").open("a") as log:
            for n in range(50):  # a log file written next to the config
                log.write(f"line {n}\n")
                log.flush()
        await asyncio.sleep(0.3)
        assert armed == 0
    finally:
        await watcher.stop()
