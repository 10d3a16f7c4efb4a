"""The heap keeper hands freed memory back once RSS passes what one unit holds."""

from __future__ import annotations

import gc

from workers.runtime import heap
from workers.runtime.heap import MIB, WARMUP_UNITS, HeapKeeper, rss


def test_freed_heap_memory_goes_back_once_rss_passes_the_ceiling() -> None:
    trim = heap._malloc_trim()
    assert trim is not None, "these machines run glibc"
    # In a full run this process holds what earlier tests freed (their models): handed
    # back first, or the keeper's first trim below would also return that, and the
    # memory the test then adds would fit under a ceiling measured with it.
    gc.collect()
    trim(0)
    keeper = HeapKeeper()
    for _ in range(WARMUP_UNITS + 2):  # warm-up sets the ceiling; nothing grew
        assert not keeper.after_unit()
    # 256 MiB (or a fifth of what this test process holds by now, models of earlier
    # tests included, whichever is more: past the ceiling's headroom either way) in
    # 64 KiB blocks (under glibc's mmap threshold: from the heap), then a small block
    # above them, then the blocks freed: the heap cannot shrink from its top, so the
    # memory stays resident, as the holes torch leaves do.
    count = max(4096, rss() // 5 // (64 * 1024))
    blocks = [bytearray(64 * 1024) for _ in range(count)]
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    pinned = bytearray(1024)
    grown = rss()
    del blocks
    kept = rss()
    assert kept > grown - 64 * MIB, "the freed blocks should have stayed resident"
    assert keeper.after_unit()
    assert rss() < kept - 128 * MIB
    assert keeper.trims == 1
    assert not keeper.after_unit()  # no trim without new growth
    assert keeper.trims == 1
    # Work that needs more than the ceiling right after a trim raises the ceiling
    # instead of trimming after every unit.
    needed = [bytearray(64 * 1024) for _ in range(count)]
    for block in needed:
        block[::4096] = b"x" * len(block[::4096])
    assert keeper.after_unit()  # the first time over: a trim (it may be growth)
    assert not keeper.after_unit()  # still over right after it: the work needs it
    assert keeper.ceiling > rss()
    assert not keeper.after_unit()
    assert keeper.trims == 2
    del pinned, needed


def test_objects_alive_after_a_model_load_are_kept_out_of_the_collector(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After a unit that loaded a model, what is alive is frozen (full collections no
    longer walk it) and what was garbage is collected, not frozen; a unit that changed
    no model freezes nothing more."""
    import weakref

    from test_dense import batch

    from shared.control.settings import Settings
    from shared.inputs.models import DEFAULT_DENSE_MODEL
    from workers.inference import dense
    from workers.inference.engine import Inference
    from workers.runtime.context import WorkerBoot, WorkerContext
    from workers.runtime.middleware import CollectorFreezing, UnitRun

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    inference = Inference()
    context = WorkerContext(WorkerBoot(Settings(broker_url=None)), None, inference)  # type: ignore[arg-type]
    unit = UnitRun(context, None, "dense", "b000000", None, batch())  # type: ignore[arg-type]

    def frozen(thing: object) -> bool:  # the collector's generations no longer hold it
        return not any(o is thing for o in gc.get_objects())

    gc.unfreeze()
    try:
        with CollectorFreezing().around(unit):
            dense.encode_batch(inference, batch(), [DEFAULT_DENSE_MODEL], dtype="fp32")
            kept = Cycle()
            garbage = Cycle()
            gone = weakref.ref(garbage)
            del garbage
        assert gc.get_freeze_count() > 10_000  # the model, the libraries
        assert frozen(kept) and frozen(inference.models)
        assert gone() is None  # the cycle was collected before the freeze, not kept
        with CollectorFreezing().around(unit):
            dense.encode_batch(inference, batch(), [DEFAULT_DENSE_MODEL], dtype="fp32")
            later = Cycle()
        assert not frozen(later)  # loaded once: nothing frozen again
    finally:
        gc.unfreeze()
