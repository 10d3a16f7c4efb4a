"""A worker process's reads and writes of several objects at once.

A GPU unit holds several staged batches (:data:`shared.control.pipeline.GPU_UNIT_TOKENS`): it
reads them all before its model runs and writes a shard for each after, and from an S3
store each of those is a round trip of its own. Done one after another they would add
their latencies to the unit's fixed cost; done at once they cost about one. The task
still waits for every write before it returns, so its message is acknowledged only once
its outputs are durable, and a worker killed mid-write leaves the unit to be redelivered.

One small pool per process, built on first use (after the prefork fork: threads do
not survive a fork).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Objects in flight at once: enough to hide a store's latency, few enough not to crowd
# the host's cores (the model runs beside them only between units).
THREADS = 4


class ParallelIO:
    """Runs a call over several items at once, in order, raising the first error."""

    def __init__(self, threads: int = THREADS) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def map(self, call: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[call(item) for item in items]``, the calls running at once; a single item
        runs in the caller's thread."""
        if len(items) <= 1:
            return [call(item) for item in items]
        return list(self._executor().map(call, items))

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="unit-io")
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
