"""What one model batch cost (a span with its figures, the peak memory it took) and what
a whole unit did (:class:`UnitOutcome`).

Every stage runs its model calls inside :func:`model_batch`, so the figures telemetry
exports and the ones the ledger sums come from one place. Peak memory is the device's
where there is one (``torch.cuda.max_memory_allocated``, reset before each batch) and
the process's peak resident set on a CPU (Linux's ``VmHWM``, reset per batch through
``/proc/self/clear_refs``; where that cannot be reset, the process's lifetime peak).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.trace import Status, StatusCode

from shared.control.telemetry import tracer, tracing_on
from shared.records.schemas import (
    BatchKind,
    ChunkBatch,
    DenseShard,
    ModelInfo,
    SparseShard,
    Struct,
)

# Span attribute names, shared by every stage (and read back by the tests).
ATTR_STAGE = "embed_fleet.stage"
ATTR_MODEL = "embed_fleet.model"
ATTR_BATCH_SIZE = "embed_fleet.batch_size"
ATTR_TOKENS = "embed_fleet.tokens"
ATTR_LATENCY = "embed_fleet.latency_s"
ATTR_DEVICE = "embed_fleet.device"
ATTR_PEAK = "embed_fleet.peak_memory_bytes"
ATTR_PEAK_KIND = "embed_fleet.peak_memory_kind"
ATTR_OOM = "embed_fleet.oom_retries"
ATTR_OUT_OF_MEMORY = "embed_fleet.out_of_memory"


def is_cuda(device: str) -> bool:
    """Whether ``device`` is a CUDA device that this process can read peaks of (a test
    may label a CPU model ``cuda``)."""
    if not device.startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def reset_peak(device: str) -> None:
    """Start a new peak-memory window for ``device``."""
    if is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    # 5: reset the peak RSS only. Not Linux, or not allowed: the lifetime peak it is.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def read_peak(device: str) -> int:
    """Bytes at the peak since :func:`reset_peak`."""
    if is_cuda(device):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return _RSS_PEAK.read()


class _RssPeak:
    """The process's peak resident set (Linux's ``VmHWM``), read through one open file
    kept per process: a model batch on a CPU can take a millisecond, and opening
    ``/proc/self/status`` for every one would cost a noticeable part of it."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pid = 0

    def read(self) -> int:
        try:
            if self._fd is None or self._pid != os.getpid():  # none yet, or forked since
                self._fd, self._pid = os.open("/proc/self/status", os.O_RDONLY), os.getpid()
            status = os.pread(self._fd, 8192, 0)
            at = status.index(b"VmHWM:")
            return int(status[at + 6 : status.index(b"kB", at)]) * 1024
        except (OSError, ValueError):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(peak if sys.platform == "darwin" else peak * 1024)


_RSS_PEAK = _RssPeak()


def peak_kind(device: str) -> str:
    return "gpu" if is_cuda(device) else "rss"


@dataclass
class BatchRecord:
    """One model batch, filled in by :func:`model_batch` when it ends."""

    latency_s: float = 0.0
    peak_memory_bytes: int = 0
    out_of_memory: bool = False


@dataclass
class StageFigures:
    """The sums over a unit's model batches that the ledger keeps per stage."""

    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    oom_count: int = 0
    budgets: dict[str, int] = field(default_factory=dict)

    def add(self, record: BatchRecord, device: str) -> None:
        self.peak_memory_bytes = max(self.peak_memory_bytes, record.peak_memory_bytes)
        self.peak_memory_kind = peak_kind(device)
        self.oom_count += int(record.out_of_memory)


@contextmanager
def model_batch(
    stage: str, model: str, device: str, size: int, tokens: int, oom_retries: int = 0
) -> Iterator[BatchRecord]:
    """A span around one model call, with its figures as attributes.

    An out-of-memory error is recorded on the span (``embed_fleet.out_of_memory``) and
    re-raised for the caller's recovery; the span still ends with its latency and peak.
    A GPU's peak is the batch's own (reset before it); a CPU's is the process's since
    its run of batches began (:func:`reset_peak` once per run: resetting an RSS peak
    costs as much as reading one).
    """
    record = BatchRecord()
    if not tracing_on():  # no span to fill: only what the runner reads
        with _measured(record, device):
            yield record
        return
    attributes: dict[str, str | int | float | bool] = {
        ATTR_STAGE: stage,
        ATTR_MODEL: model,
        ATTR_BATCH_SIZE: size,
        ATTR_TOKENS: tokens,
        ATTR_DEVICE: device,
        ATTR_PEAK_KIND: peak_kind(device),
        ATTR_OOM: oom_retries,
    }
    with tracer().start_as_current_span(
        f"{stage}.batch", attributes=attributes, record_exception=False
    ) as span:
        try:
            # A CPU's peak is the process's since the run began: the runner reads it
            # once when the run ends (reading /proc per batch costs ~20 us of a
            # millisecond's batch), and here only for a span that is recorded.
            with _measured(record, device, read_cpu_peak=span.is_recording()):
                yield record
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.set_attribute(ATTR_LATENCY, round(record.latency_s, 6))
            span.set_attribute(ATTR_PEAK, record.peak_memory_bytes)
            span.set_attribute(ATTR_OUT_OF_MEMORY, record.out_of_memory)


@contextmanager
def _measured(record: BatchRecord, device: str, read_cpu_peak: bool = False) -> Iterator[None]:
    """Fill ``record`` in over the block: its latency, its peak (a GPU's own, reset
    before it; a CPU's only when asked), and whether it ran out of memory."""
    cuda = is_cuda(device)
    if cuda:
        reset_peak(device)
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        record.out_of_memory = "OutOfMemoryError" in type(exc).__name__
        raise
    finally:
        record.latency_s = time.perf_counter() - started
        if cuda or read_cpu_peak:
            record.peak_memory_bytes = read_peak(device)


@dataclass(frozen=True)
class UnitPart:
    """One staged batch of a unit that encoded several: the ledger counts each (see
    :class:`~shared.records.schemas.EncodeBatch`).

    Attributes:
        unit: The batch's id.
        items: Its chunks (or queries).
        tokens: Its tokens.
        reused: Its chunks whose vectors an earlier job made (``run --reuse``; of the
            model that took the most).
    """

    unit: str
    items: int
    tokens: int
    reused: int = 0


@dataclass
class UnitOutcome:
    """What a unit did, as its task writes it and the ledger records it.

    Attributes:
        shards: An encode stage's output, one shard per staged batch, which its task
            writes to the job store.
        parts: The staged batches of an encode unit, as the ledger records them (empty:
            the unit is one thing).
        items: What it processed (chunks, queries served, pairs asked).
        device: Where it ran.
        batch_sizes: Sizes of its model batches.
        kind: ``documents`` or ``queries``.
        tokens: Tokens it processed.
        figures: Peak memory, out-of-memory retries and learned budgets.
        models: What it used, for the manifest.
        items_missed: Items its model could not process (rerank: pairs left unscored).
    """

    items: int
    device: str
    shards: list[Struct] = field(default_factory=list)
    parts: list[UnitPart] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    kind: BatchKind = "documents"
    tokens: int = 0
    figures: StageFigures = field(default_factory=StageFigures)
    models: list[ModelInfo] = field(default_factory=list)
    items_missed: int = 0

    @classmethod
    def of_batches(
        cls,
        batches: Sequence[ChunkBatch],
        tokens: Sequence[int],
        shard: Callable[[int, ChunkBatch, slice], Struct],
        **figures: Any,
    ) -> UnitOutcome:
        """The outcome of an encode unit whose rows (``tokens``, one per chunk, in
        batch order) cover ``batches``: ``shard(index, batch, rows)`` writes each staged
        batch's shard from its slice of the rows, and the ledger counts each batch as a
        part. ``figures`` are the other fields (device, batch sizes, models, ...)."""
        shards: list[Struct] = []
        parts: list[UnitPart] = []
        start = 0
        for index, batch in enumerate(batches):
            end = start + len(batch.chunks)
            made = shard(index, batch, slice(start, end))
            shards.append(made)
            reused = made.reused if isinstance(made, DenseShard | SparseShard) else {}
            parts.append(
                UnitPart(
                    batch.batch_id,
                    end - start,
                    sum(tokens[start:end]),
                    max(reused.values(), default=0),
                )
            )
            start = end
        return cls(items=start, shards=shards, parts=parts, tokens=sum(tokens), **figures)

    @property
    def shard(self) -> Struct:
        """The one shard of a unit of one staged batch."""
        assert len(self.shards) == 1, f"a unit of {len(self.shards)} shards"
        return self.shards[0]
