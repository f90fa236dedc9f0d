"""The server freezes its startup heap: the collector's full passes then walk only what requests create."""

from __future__ import annotations

import gc

from app.heap import freeze_startup_heap


def test_the_startup_heap_leaves_the_collectors_generations() -> None:
    gc.unfreeze()
    try:
        freeze_startup_heap()
        # Everything alive now (this test process: pytest, the app's modules) left the generations.
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
