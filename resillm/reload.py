"""Watch the config file and ask for a reload when its content changes.

Editors save by writing a temporary file and renaming it over the original, and
Kubernetes swaps a ConfigMap by re-pointing a ``..data`` symlink: the file's own inode is
not a reliable thing to watch. So the watcher (watchdog) observes the file's directory,
and any event there schedules one debounced check that re-reads the file through its path
and compares its bytes with the last ones seen. Only a real change calls ``on_change``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

logger = logging.getLogger("resillm.reload")
DEBOUNCE_S = 0.25


def file_digest(path: str | os.PathLike[str]) -> bytes | None:
    """The content's digest, through symlinks; ``None`` while the file is missing."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except OSError:
        return None


class _Forward(FileSystemEventHandler):
    """Passes on only events that can change the config: on the file's own name (written
    in place, or renamed over) and on Kubernetes' ``..data`` / ``..TIMESTAMP`` entries.
    Everything else in the directory (a log file next to the config, say) is ignored, so
    a busy neighbour costs the gateway nothing."""

    def __init__(self, name: str, poke: Callable[[], None]) -> None:
        self._name = name
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads, including our own
        for path in (event.src_path, getattr(event, "dest_path", "")):
            name = os.path.basename(os.fsdecode(path))
            if name == self._name or name.startswith(".."):
                self._poke()
                return


class ConfigWatcher:
    """Calls ``on_change`` on the event loop, at most once per ``debounce_s`` of quiet,
    when the file at ``path`` holds bytes different from the last ones seen."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: Callable[[], Awaitable[object]],
        *,
        debounce_s: float = DEBOUNCE_S,
    ) -> None:
        self.path = os.path.abspath(path)
        self.on_change = on_change
        self.debounce_s = debounce_s
        self._digest = file_digest(self.path)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        handler = _Forward(os.path.basename(self.path), self._poke)
        observer.schedule(handler, os.path.dirname(self.path), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
        if self._task is not None and not self._task.done():
            await self._task

    def seen(self) -> None:
        """The current content has been applied (e.g. by an explicit reload)."""
        self._digest = file_digest(self.path)

    def _poke(self) -> None:
        """From watchdog's thread: (re)start the debounce timer on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.debounce_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._task is not None and not self._task.done():
            self._arm()  # a reload is running: look again once it is done
            return
        digest = file_digest(self.path)
        if digest is None or digest == self._digest:
            return  # gone for a moment (mid-swap), or touched without a change
        self._digest = digest
        assert self._loop is not None
        self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.on_change()
        except Exception:
            logger.exception("config reload failed")
