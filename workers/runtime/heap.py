"""Freed memory handed back to the system, so a long-running worker's RSS stays flat.

Why: measured by ``bench/worker_memory.py`` (one process, the dense worker's encode path
on the 144 batches of 10x Cranfield), the highest RSS of the run's second half was 7-9%
above the first half's, and bare sentence-transformers' ``encode`` on the same batches
grew too. With glibc's ``malloc_trim(0)`` after every batch it stayed flat (1.003), 260
to 300 MiB lower: the growth is memory
the allocator keeps after torch frees it (batches of varying shapes leave holes in its
heaps that it does not give back), not objects the worker holds on to.

A trim after every unit cost 17-20% of a CPU worker's throughput (measured: the
trim, then the next batch faulting its pages back in), and more on a GPU worker whose
units take milliseconds. Growth is slow (a few percent over a hundred units), so
:class:`HeapKeeper` trims only when RSS passes a ceiling: ``HEADROOM`` above the highest
RSS of the first ``WARMUP_UNITS`` staged batches (models loaded, the usual shapes seen). After a
trim RSS falls far below the ceiling and takes tens of units to reach it again. If the
unit right after a trim is already over it, the work itself needs more (a model loaded
later): the ceiling rises to that instead of trimming every unit. Where there is no
glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
# Staged batches (or units of other stages) whose highest RSS sets the ceiling. Counted
# in batches, not messages: a GPU stage's message holds up to 64 batches, and a
# warm-up of 16 such messages outlasted a whole 10x Cranfield run (no trim at all
# there, while a 100x run trimmed under a higher ceiling: 1.17x the 10x peak).
WARMUP_UNITS = 16
# Above that before a trim. At 10% a 100x run's peak was 1.12x a 10x run's (a run too
# short to pass the ceiling never trims, a long one rides just under it); at 5% a trim
# comes every few dozen units, still a fraction of a percent of a worker's time.
HEADROOM = 0.05


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def rss() -> int:
    """This process's resident memory now, in bytes (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE


@dataclass
class HeapKeeper:
    """One process's RSS ceiling, checked after every unit (see module doc).

    Attributes:
        units: Staged batches (or units of other stages) seen.
        holds: The highest RSS after a warm-up unit, or after a unit that followed a
            trim and still passed the ceiling: what the work needs.
        after_trim: Whether the last check trimmed.
        trims: Trims done.
    """

    units: int = 0
    holds: int = 0
    after_trim: bool = False
    trims: int = 0

    @property
    def ceiling(self) -> int:
        return int(self.holds * (1 + HEADROOM))

    def after_unit(self, batches: int = 1) -> bool:
        """Check RSS after a unit (of ``batches`` staged batches; 1 for a unit of
        another kind) and trim when it passed the ceiling; whether it did."""
        trim = _malloc_trim()
        if trim is None:
            return False
        now = rss()
        warming = self.units < WARMUP_UNITS
        self.units += max(1, batches)
        trimmed_last, self.after_trim = self.after_trim, False
        if warming:
            self.holds = max(self.holds, now)
            return False
        if now <= self.ceiling:
            return False
        if trimmed_last:
            self.holds = now
            return False
        trim(0)
        self.trims += 1
        self.after_trim = True
        return True
