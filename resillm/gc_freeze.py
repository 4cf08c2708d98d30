"""Keep what lives as long as the process out of the garbage collector's full passes.

After start-up a gateway holds some 50,000 objects that stay until it stops: modules,
classes, the config, the metrics, the runtime. Every full collection walks all of them
(tens of milliseconds, a few times a minute under load, in the middle of requests), though
none can ever be garbage. ``gc.freeze()`` moves them to a generation no collection
visits. The hot path itself leaves no cycles behind (``test_memory_mechanisms.py``), so
what the collector still has to look at is a request's worth of young objects.

The youngest generation is collected after 20,000 net new container objects instead of
700: under load a collection every few requests walked objects that were about to be
freed by their reference counts anyway (callgrind: some 8% of a bare request's
instructions under uvicorn). The hot path leaves no cycles, so this holds no more memory
(1,000 held streams: the same peak RSS, 88-90 MB, at 700, 5,000 and 20,000).

A reload replaces the runtime; if the old one holds cycles, a frozen copy of them would
never be collected. So a reload unfreezes (the next full pass may free the old runtime)
and the heap is frozen again once requests that began on the old runtime have had time to
end. Only ``resillm serve`` does this: a host mounting the gateway owns its process's
collector.
"""

from __future__ import annotations

import asyncio
import gc

REFREEZE_AFTER_S = 120.0  # after a reload: longer than all but the longest streams
GEN0_THRESHOLD = 20_000  # net new container objects between young collections (CPython: 700)


class HeapFreezer:
    def __init__(self) -> None:
        self._later: asyncio.TimerHandle | None = None
        self._thresholds: tuple[int, int, int] | None = None  # the collector's, to restore

    def freeze(self) -> None:
        """Collect what start-up left over, then freeze everything alive now; young
        collections from now on come every :data:`GEN0_THRESHOLD` objects."""
        self._later = None
        gc.collect()
        gc.freeze()
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            gc.set_threshold(GEN0_THRESHOLD, *self._thresholds[1:])

    def reloaded(self) -> None:
        """The runtime was replaced: let the old one be collected, freeze again later."""
        gc.unfreeze()
        if self._later is not None:
            self._later.cancel()
        self._later = asyncio.get_running_loop().call_later(REFREEZE_AFTER_S, self.freeze)

    def stop(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
