"""Keep what lives as long as the process out of the garbage collector's full passes.

After start-up a gateway holds some 50,000 objects that stay until it stops: modules,
classes, the config, the metrics, the runtime. Every full collection walks all of them
(tens of milliseconds, a few times a minute under load, in the middle of requests), though
none can ever be garbage. ``gc.freeze()`` moves them to a generation no collection
visits. The hot path itself leaves no cycles behind (``test_memory_mechanisms.py``), so
what the collector still has to look at is a request's worth of young objects.

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


class HeapFreezer:
    def __init__(self) -> None:
        self._later: asyncio.TimerHandle | None = None

    def freeze(self) -> None:
        """Collect what start-up left over, then freeze everything alive now."""
        self._later = None
        gc.collect()
        gc.freeze()

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
