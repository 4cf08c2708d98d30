"""`resillm serve` freezes what start-up left alive, so full collections skip it; a reload
unfreezes (the old runtime may be garbage) and freezes again later."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from resillm import gc_freeze
from resillm.app import create_app
from resillm.gc_freeze import HeapFreezer
from resillm.server import served_gateway

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # the rest of the test run collects as usual
    gc.set_threshold(*thresholds)


async def test_freezing_moves_what_lives_now_out_of_the_collections() -> None:
    freezer = HeapFreezer()
    freezer.freeze()
    assert gc.get_freeze_count() > 1000


def test_young_collections_are_spaced_out_while_served_and_restored_at_stop() -> None:
    before = gc.get_threshold()
    freezer = HeapFreezer()
    freezer.freeze()
    freezer.freeze()  # a refreeze after a reload keeps what was there first to restore
    assert gc.get_threshold() == (gc_freeze.GEN0_THRESHOLD, *before[1:])
    freezer.stop()
    assert gc.get_threshold() == before


async def test_a_reload_unfreezes_then_freezes_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gc_freeze, "REFREEZE_AFTER_S", 0.05)
    freezer = HeapFreezer()
    freezer.freeze()
    freezer.reloaded()
    assert gc.get_freeze_count() == 0  # the old runtime's cycles can be collected now
    await asyncio.sleep(0.2)
    assert gc.get_freeze_count() > 1000


async def test_stopping_cancels_a_pending_refreeze(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_freeze, "REFREEZE_AFTER_S", 0.05)
    freezer = HeapFreezer()
    freezer.reloaded()
    freezer.stop()
    await asyncio.sleep(0.2)
    assert gc.get_freeze_count() == 0


def test_the_served_gateway_freezes_and_a_mounted_one_does_not(tmp_path: Path) -> None:
    config = tmp_path / "resillm.yaml"
    config.write_text(
        "providers: {m: {type: mock}}\nmodels: {chat: {targets: [{provider: m, model: m}]}}\n"
    )
    gateway = create_app(config, watch=False)
    assert gateway.freezer is None  # a host's process: its collector is left alone
    served = served_gateway(gateway.config, str(config))
    assert isinstance(served.freezer, HeapFreezer)  # `resillm serve` and its workers
