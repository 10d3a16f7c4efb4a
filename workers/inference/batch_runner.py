"""BatchRunner: the one loop that runs a model over a unit's items in token-budget batches.

Dense encoding, SPLADE and the CrossEncoder executor all hand their items to a
:class:`BatchRunner` and give it a call that runs the model on one group of item
indices. The runner owns everything around that call, the same way for every stage:

- **Batching** (:func:`token_budget_batches`, TEI's rule): items sorted longest first
  and cut so that ``len(batch) * longest item`` stays within a padded-token budget, the
  longest item rounded up to :func:`pad_multiple` for the model's device and dtype (a
  batch's tensors are that wide).
- **Out of memory** (``torch.cuda.OutOfMemoryError``): the budget halves, the CUDA cache
  is emptied, and the batches not yet run are cut again. A single item that runs out of
  memory alone goes down the fallback chain and leaves the budget as it is: no batch size
  failed there, that item did, and a unit retried because of it must not halve the
  worker's budget on every try. After ``grow_after`` good batches in a row the budget
  doubles, back up to its ceiling but not to a size that failed, until ``FORGET_AFTER``
  such runs say the memory is there again.
- **Time limit** (optional, main thread only): a model call over the limit is interrupted
  by ``SIGALRM``; the batch is split in two, and a half that is still too slow goes down
  the fallback chain. Off the main thread a slow call is counted but kept.
- **Fallback chain**: a CPU copy of the model, when the stage has one and runs
  elsewhere; then the stage's :class:`ItemFallback` (sparse: metadata weights; rerank:
  leave unreranked); a stage without one (dense) fails the unit with
  :class:`BatchTooLarge`.
- **Figures**: every model call runs inside a batch span with its latency, size,
  tokens and peak memory (:func:`workers.runtime.measure.model_batch`).

The budget of a (stage, model, device) is learned for the worker's life
(:class:`BudgetBook`, kept in the worker context), because the memory a device can
spare is a property of the worker process, not of one task.

``EMBED_FLEET_SIMULATE_OOM_TOKENS=N`` makes every device call whose padded size is above
``N`` tokens raise the real ``torch.cuda.OutOfMemoryError`` before it runs: the tests
exercise on a CPU the recovery a GPU takes.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import numpy as np

from shared.records.errors import EmbedFleetError
from shared.records.logs import get_logger
from workers.runtime.measure import (
    StageFigures,
    is_cuda,
    model_batch,
    peak_kind,
    read_peak,
    reset_peak,
)

log = get_logger("batches")

T = TypeVar("T")

# Good batches in a row after which a shrunk budget doubles again.
GROW_AFTER = 8
# Runs of good batches after which a size that ran out of memory is tried again (the
# pressure may have been another process's, and gone).
FORGET_AFTER = 4


# --- the batching rule ---------------------------------------------------------------


# How wide a batch's tensors are, rounded up (see pad_multiple).
CPU_PAD_MULTIPLE = 16
GPU_PAD_MULTIPLE = 8


def pad_multiple(device: str, dtype: Any = None) -> int:
    """What a batch's width (its longest item) is rounded up to, for a model of
    ``dtype`` (a ``torch.dtype``; ``None``: not known) on ``device``.

    On a CPU in bf16 or fp16, oneDNN builds and caches a kernel, with its scratch
    memory, for every input shape a matmul meets, up to 1,024 of them: exact widths gave
    a long run hundreds of shapes (rows x width), and a dense worker's memory grew with
    them for as long as it ran, each new shape also paying for its kernel. Widths in
    steps of 16 leave a few dozen shapes (every full batch of a width has the same
    rows), at a few padded positions a row. A CPU in fp32 multiplies through BLAS,
    which keeps nothing per shape: there the padding would only cost, so widths stay
    exact. A GPU's tensor cores want multiples of 8.
    """
    if device.split(":")[0] != "cpu":
        return GPU_PAD_MULTIPLE
    half = str(dtype) in ("torch.bfloat16", "torch.float16")
    return CPU_PAD_MULTIPLE if half else 1


def model_rows(rows: int, width: int, budget: int, device: str, multiple: int) -> int:
    """How many rows a batch of ``rows`` items at ``width`` is run at: on a CPU in bf16
    or fp16 (``multiple`` > 1 there), the next power of two, within the budget.

    Widths in steps of ``multiple`` leave every full batch of a width with the same
    rows, but each unit's last batch has whatever rows are left, and oneDNN keeps a
    kernel with its scratch memory for each of those shapes too: over a long run, a
    new one every few units, and a worker's memory grew with them. Powers of two leave
    a handful a width. The extra rows repeat the batch's own items; their outputs are
    written over with the same values. Exact where nothing is cached per shape (fp32 on
    a CPU, a GPU)."""
    if multiple <= 1 or device.split(":")[0] != "cpu" or rows <= 1:
        return rows
    return max(rows, min(1 << (rows - 1).bit_length(), budget // max(width, 1)))


def model_dtype(model: Any) -> Any:
    """The dtype of a model's first parameter (``None`` for none, or no model)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    for parameter in parameters():
        return parameter.dtype
    return None


def padded_width(longest: int, multiple: int = 1) -> int:
    """A batch's width: its longest item rounded up to ``multiple`` (at least 1)."""
    return -(-max(longest, 1) // multiple) * multiple


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, multiple: int = 1
) -> list[list[int]]:
    """Group item indices into batches whose padded size stays within ``max_tokens``.

    A batch of short chunks can hold many more items than a batch of 256-token chunks for
    the same memory and time, so the budget is ``len(batch) * longest item``, the size of
    the padded tensor the model actually sees. Items are sorted by length first so that
    padding stays small.

    Args:
        lengths: Token count of each item (special tokens included or not, but alike).
        max_tokens: Budget of ``batch size * longest item`` per batch. An item longer
            than the budget gets a batch of its own.
        multiple: What the longest item is rounded up to (:func:`pad_multiple`): the
            tensors' width, which the budget counts.

    Returns:
        Lists of indices into ``lengths``, longest items first.
    """
    # Longest first, ties in item order (a stable sort of the negated lengths). Sorted so,
    # a batch's width is its first item's, and the budget then holds budget // width
    # items: one step per batch, not per item (a rerank unit has ~10,000 pairs).
    sizes = np.asarray(lengths, dtype=np.int64)
    ranked = np.argsort(-sizes, kind="stable")
    order: list[int] = ranked.tolist()
    longest: list[int] = sizes[ranked].tolist()
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        width = padded_width(longest[start], multiple)
        end = start + max(1, max_tokens // width)
        batches.append(order[start:end])
        start = end
    return batches


def first_batch(items: Sequence[T], lengths: Sequence[int], max_tokens: int) -> list[T]:
    """The items of the first batch :func:`token_budget_batches` cuts: the longest ones,
    as many as the budget holds. This is the shape the model is about to run at, which
    is what the ``auto`` dtype probe must time (a small probe can favour a dtype that
    loses at full batch size)."""
    batches = token_budget_batches(lengths, max_tokens)
    return [items[i] for i in batches[0]] if batches else []


def padded_tokens(group: Sequence[int], lengths: Sequence[int], multiple: int = 1) -> int:
    """The size of the padded tensor a model batch makes: items x its width."""
    if not group:
        return 0
    return len(group) * padded_width(max(lengths[i] for i in group), multiple)


def recut(
    pending: deque[list[int]], lengths: Sequence[int], budget: int, multiple: int = 1
) -> deque[list[int]]:
    """Cut the groups not yet run again at a new budget, still longest first: after an
    OOM the old groups would fail again; after a grow-back bigger groups are cheaper."""
    flat = [i for group in pending for i in group]
    groups = token_budget_batches([lengths[i] for i in flat], budget, multiple)
    return deque([flat[j] for j in group] for group in groups)


# --- learned budgets -----------------------------------------------------------------


class TokenBudget:
    """The padded-token budget of one (stage, model, device) in this process.

    Attributes:
        ceiling: The initial and largest budget.
        value: The budget the next batch is cut at.
        oom_count: Out-of-memory errors seen over the worker's life.
        failed_at: The smallest padded size that ran out of memory lately: the budget
            grows back only below it, until ``FORGET_AFTER`` runs of good batches say
            the memory is there again.
    """

    def __init__(self, ceiling: int, grow_after: int = GROW_AFTER) -> None:
        if ceiling < 1:
            raise ValueError(f"a token budget must be >= 1, got {ceiling}")
        if grow_after < 1:
            raise ValueError(f"grow_after must be >= 1, got {grow_after}")
        self.ceiling = ceiling
        self.value = ceiling
        self.grow_after = grow_after
        self.oom_count = 0
        self.failed_at: int | None = None
        self._streak = 0

    def shrink(self, failed_tokens: int | None = None) -> int:
        """Halve after an out-of-memory error of a batch of ``failed_tokens`` padded
        tokens; returns the new budget."""
        self.oom_count += 1
        self._streak = 0
        self.value = max(self.value // 2, 1)
        if failed_tokens is not None:
            self.failed_at = min(failed_tokens, self.failed_at or failed_tokens)
        return self.value

    def too_large(self) -> None:
        """Count an item that ran out of memory alone; the budget stays (see module doc)."""
        self.oom_count += 1
        self._streak = 0

    def interrupted(self) -> None:
        """A batch that neither succeeded nor ran out of memory (a time limit) breaks
        the run of good batches without changing the budget."""
        self._streak = 0

    def succeeded(self) -> None:
        """Count a good batch; after ``grow_after`` in a row the budget doubles (up to
        the ceiling, and below the last size that failed)."""
        self._streak += 1
        if self._streak % self.grow_after or self.value >= self.ceiling:
            return
        grown = min(self.value * 2, self.ceiling)
        if self.failed_at is not None and grown >= self.failed_at:
            if self._streak < self.grow_after * FORGET_AFTER:
                return
            self.failed_at = None
        self.value = grown
        self._streak = 0


class BudgetBook:
    """A worker process's learned budgets, one per (stage, model, device)."""

    def __init__(self) -> None:
        self._budgets: dict[tuple[str, str, str], TokenBudget] = {}
        self._lock = threading.Lock()

    def get(self, stage: str, model: str, device: str, ceiling: int) -> TokenBudget:
        """The budget for (stage, model, device), created at ``ceiling`` the first time."""
        key = (stage, model, device)
        with self._lock:
            if key not in self._budgets:
                self._budgets[key] = TokenBudget(ceiling)
            return self._budgets[key]

    def oom_total(self) -> int:
        """Out-of-memory errors seen by every budget of the process so far."""
        with self._lock:
            return sum(budget.oom_count for budget in self._budgets.values())


# --- errors and fallbacks --------------------------------------------------------------


class BatchTooLarge(EmbedFleetError):
    """Items no model call could process (one item out of memory alone, or over the
    time limit everywhere), in a stage that has no fallback for them."""


@dataclass(frozen=True)
class ItemFallback:
    """What a stage does with items no model call could process.

    Attributes:
        name: Counted under this name in :attr:`BatchRun.fallbacks`.
        handle: Called with the item indices and the reason.
    """

    name: str
    handle: Callable[[list[int], str], None]


class _BatchTimeout(BaseException):
    """Raised by the SIGALRM handler inside a model call that ran past its time limit.

    A ``BaseException``, not an ``Exception``: library code between the handler and the
    runner (tokenizers, progress bars, the caller's task body) may catch ``Exception``
    and would otherwise swallow the interruption.
    """


@dataclass
class BatchRun:
    """What one :meth:`BatchRunner.run` did.

    Attributes:
        batch_sizes: Sizes of the model calls that succeeded (device and CPU copy).
        oom_count: Out-of-memory errors on the way.
        timeout_count: Calls over the time limit (interrupted or, off the main
            thread, kept).
        fallbacks: Batches ``split`` after a time limit, run on the ``cpu`` copy, and
            given to the stage's :class:`ItemFallback` (under its name).
    """

    batch_sizes: list[int] = field(default_factory=list)
    oom_count: int = 0
    timeout_count: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)


ModelCall = Callable[[Any, list[int]], None]
"""Runs a model on one group of item indices and stores the output itself."""

LayOut = Callable[[Any, list[list[int]]], None]
"""Lays out a model's inputs for the next groups it will be called with, together."""

# Batches whose inputs are laid out together, ahead of their model calls. Laying a
# batch's ids out between two forward passes cost twice what it costs among others
# (measured: 9,600 rerank pairs in 619 batches, 30 ms laid out in a row, 56-60 ms one
# before each forward pass): each forward pass evicts what the layout works on. 16
# batches are at most 16 x 32,768 padded tokens on a GPU (12 MiB of pinned memory).
LAY_OUT_AHEAD = 16


@dataclass
class _Pass:
    """One :meth:`BatchRunner.run`: its model, items and call, the batches not yet run,
    and what it did so far."""

    model: Any
    lengths: Sequence[int]
    call: ModelCall
    figures: StageFigures
    fallback: ItemFallback | None
    multiple: int = 1
    """What its batch widths are rounded up to (:func:`pad_multiple` of the runner's
    device and the model's dtype)."""
    pending: deque[list[int]] = field(default_factory=deque)
    done: BatchRun = field(default_factory=BatchRun)


class BatchRunner:
    """Runs one model over items in adaptive token-budget batches (see module doc).

    Args:
        stage: The stage, for spans and logs.
        model_name: The model's name, likewise.
        device: Where ``model`` runs (only ``cpu`` versus anything else matters for
            the fallback chain; the label goes into spans).
        budget: The learned budget to cut batches at (shared across runs).
        time_limit_s: Seconds one model call may take (``None``: no limit).
        cpu_model: Returns a CPU copy of the model for the fallback chain; called once,
            on first use, so a GPU worker loads it only if it needs it.
        before_batch: A test hook, called with a batch's item indices right before each
            model call (device and CPU), inside the time-limited region.
        simulate_oom_tokens: The test hook of ``EMBED_FLEET_SIMULATE_OOM_TOKENS``.
    """

    def __init__(
        self,
        stage: str,
        model_name: str,
        device: str,
        budget: TokenBudget,
        *,
        time_limit_s: float | None = None,
        cpu_model: Callable[[], Any] | None = None,
        before_batch: Callable[[list[int]], None] | None = None,
        simulate_oom_tokens: int | None = None,
    ) -> None:
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {time_limit_s}")
        self.stage = stage
        self.model_name = model_name
        self.device = device
        self.budget = budget
        self.time_limit_s = time_limit_s
        self.before_batch = before_batch
        self.simulate_oom_tokens = simulate_oom_tokens
        self._cpu_factory = cpu_model
        self._cpu: Any = None
        self.current_device: str | None = None
        """The device of the model call in progress (``cpu`` in the fallback), else
        None; for ``before_batch`` hooks."""

    @property
    def has_cpu_copy(self) -> bool:
        return self._cpu_factory is not None and self.device.split(":")[0] != "cpu"

    def run(
        self,
        model: Any,
        lengths: Sequence[int],
        call: ModelCall,
        *,
        figures: StageFigures,
        fallback: ItemFallback | None = None,
        lay_out: LayOut | None = None,
    ) -> BatchRun:
        """Run ``call(model, group)`` over every item, adapting to memory and time.

        Args:
            model: The model on :attr:`device`, handed to ``call``.
            lengths: Token count of each item, special tokens included.
            call: Runs a model on a group of item indices and stores the output.
            figures: The unit's running figures; every call's peak memory and OOM go
                in, and the budget the run ended with.
            fallback: What to do with items no call could process; without one they
                raise :class:`BatchTooLarge`.
            lay_out: Called with the model and the groups of the next
                :data:`LAY_OUT_AHEAD` calls on the device, as ``call`` will get them,
                before the first of them: their inputs laid out together (a group that
                ``call`` then gets otherwise, after an out-of-memory re-cut or on the
                CPU copy, is laid out on its own).

        Raises:
            BatchTooLarge: items no call could process and no fallback.
            Exception: anything ``call`` raises other than an out-of-memory error: a
                broken model must fail the task, not be papered over.
        """
        multiple = pad_multiple(self.device, model_dtype(model))
        work = _Pass(model, lengths, call, figures, fallback, multiple)
        work.pending.extend(token_budget_batches(lengths, self.budget.value, multiple))
        reset_peak("cpu")  # a CPU's batches read the process's peak since here
        cut_at = self.budget.value
        laid_out = 0  # calls left of the last window laid out
        while work.pending:
            if self.budget.value != cut_at:
                work.pending = recut(work.pending, lengths, self.budget.value, multiple)
                cut_at, laid_out = self.budget.value, 0
            if lay_out is not None and laid_out == 0:
                window = list(itertools.islice(work.pending, LAY_OUT_AHEAD))
                lay_out(
                    model,
                    [self._shaped(work, self.device, group, work.multiple) for group in window],
                )
                laid_out = len(window)
            laid_out -= 1
            self._on_device(work, work.pending.popleft())
        figures.budgets[self.model_name] = self.budget.value
        # A CPU's peak (the run's own device, or the CPU copy a batch fell back to) is
        # the process's since reset_peak: read once here, not per batch.
        if not is_cuda(self.device) or work.done.fallbacks["cpu"]:
            figures.peak_memory_bytes = max(figures.peak_memory_bytes, read_peak("cpu"))
            figures.peak_memory_kind = peak_kind("cpu")
        return work.done

    # -- the paths a batch can take ----------------------------------------------------

    def _on_device(self, work: _Pass, group: list[int], *, may_split: bool = True) -> None:
        import torch

        out_of_memory = False
        try:
            slow = self._call(work, self.device, group)
        except torch.cuda.OutOfMemoryError:
            # Handled below, outside the except block: the exception's traceback holds
            # the frames (and tensors) of the failed call until the block ends.
            out_of_memory = True
        except _BatchTimeout:
            self._timed_out(work, group, may_split)
            return
        if out_of_memory:
            self._out_of_memory(work, group)
            return
        work.done.batch_sizes.append(len(group))
        if slow:
            work.done.timeout_count += 1
            self.budget.interrupted()
            log.warning("batch over the time limit (kept)", extra=self._fields(group))
            return
        self.budget.succeeded()

    def _timed_out(self, work: _Pass, group: list[int], may_split: bool) -> None:
        """Split a batch over the time limit in two (once); a half still too slow goes
        down the fallback chain."""
        work.done.timeout_count += 1
        self.budget.interrupted()
        log.warning("batch over the time limit", extra=self._fields(group, may_split))
        if may_split and len(group) > 1:
            work.done.fallbacks["split"] += 1
            half = (len(group) + 1) // 2
            for part in (group[:half], group[half:]):
                self._on_device(work, part, may_split=False)
            return
        self._fall_back(work, group, f"{self._what()}: {len(group)} item(s) over the time limit")

    def _out_of_memory(self, work: _Pass, group: list[int]) -> None:
        """Several items: halve the budget and cut them again. One item: no smaller batch
        of it exists, so it goes down the fallback chain and the budget stays."""
        import torch

        work.done.oom_count += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(group) > 1:
            new_budget = self.budget.shrink(padded_tokens(group, work.lengths, work.multiple))
            log.warning("batch out of memory; budget halved", extra=self._fields(group, new_budget))
            work.pending.appendleft(group)
            return
        self.budget.too_large()
        tokens = work.lengths[group[0]]
        self._fall_back(
            work, group, f"{self._what()}: one item of {tokens} tokens runs out of memory alone"
        )

    def _fall_back(self, work: _Pass, group: list[int], reason: str) -> None:
        """The CPU copy if there is one; else (or if it fails too) the stage's fallback.

        Failures of the CPU copy (it cannot load, a torch error, its own time limit)
        are absorbed: this is the last resort for one batch, and the rest of the unit
        should still run. Only those failures, though: anything else (a Celery time
        limit of the whole task, an interrupt) propagates.
        """
        done = work.done
        if self.has_cpu_copy:
            try:
                slow = self._call(work, "cpu", group)
            except _BatchTimeout:
                done.timeout_count += 1
                log.warning("CPU fallback over the time limit", extra=self._fields(group))
            except (RuntimeError, ValueError, OSError, EmbedFleetError):
                log.warning("CPU fallback failed", extra=self._fields(group), exc_info=True)
            else:
                done.timeout_count += int(slow)
                done.fallbacks["cpu"] += 1
                done.batch_sizes.append(len(group))
                return
        if work.fallback is None:
            raise BatchTooLarge(
                reason,
                "Lower the model's max_seq_length, free the device, or run this stage "
                "on a device with more memory",
            )
        done.fallbacks[work.fallback.name] += 1
        log.warning("batch given up", extra=self._fields(group, work.fallback.name))
        work.fallback.handle(group, reason)

    # -- one model call -----------------------------------------------------------------

    def _call(self, work: _Pass, device: str, group: list[int]) -> bool:
        """One model call over ``group`` on ``device`` (the runner's, or ``cpu`` for the
        CPU copy), under the time limit, in a batch span.

        Returns:
            Whether the call ran over the limit without being interrupted (off the main
            thread, where no signal can interrupt it).

        Raises:
            _BatchTimeout: if the SIGALRM timer interrupted the call.
        """
        on_device = device == self.device
        if on_device:
            model = work.model
        else:
            if self._cpu is None:
                assert self._cpu_factory is not None, "only a runner with a CPU copy calls it"
                self._cpu = self._cpu_factory()
            model = self._cpu
        interruptible = _signals_usable()
        # The CPU copy of a fallback is padded as a CPU pads its dtype, not as the device.
        multiple = work.multiple if on_device else pad_multiple(device, model_dtype(model))
        tokens = padded_tokens(group, work.lengths, multiple)
        shaped = self._shaped(work, device, group, multiple, tokens)
        started = time.monotonic()
        self.current_device = device
        record = None
        try:
            with (
                model_batch(
                    self.stage, self.model_name, device, len(group), tokens, work.done.oom_count
                ) as record,
                _time_limit(self.time_limit_s if interruptible else None),
            ):
                if on_device:
                    check_simulated_oom(tokens, self.simulate_oom_tokens)
                if self.before_batch is not None:
                    self.before_batch(list(group))
                work.call(model, shaped)
        finally:
            self.current_device = None
            if record is not None:
                work.figures.add(record, device)
        elapsed = time.monotonic() - started
        return not interruptible and self.time_limit_s is not None and elapsed > self.time_limit_s

    def _shaped(
        self, work: _Pass, device: str, group: list[int], multiple: int, tokens: int = 0
    ) -> list[int]:
        """The rows the model sees of ``group`` on ``device`` (see :func:`model_rows`):
        the group's own items, the last repeated (``tokens``: its padded size, where the
        caller has it already)."""
        width = (tokens or padded_tokens(group, work.lengths, multiple)) // len(group)
        rows = model_rows(len(group), width, self.budget.value, device, multiple)
        return group + [group[-1]] * (rows - len(group))

    def _what(self) -> str:
        return f"{self.stage} {self.model_name} on {self.device}"

    def _fields(self, group: list[int], detail: object = None) -> dict[str, dict[str, object]]:
        fields: dict[str, object] = {"what": self._what(), "items": len(group)}
        if detail is not None:
            fields["detail"] = detail
        return {"fields": fields}


def check_simulated_oom(tokens: int, limit: int | None) -> None:
    """The test hook: raise a real CUDA out-of-memory error above ``limit`` tokens."""
    if limit is not None and tokens > limit:
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"simulated: {tokens} padded tokens > EMBED_FLEET_SIMULATE_OOM_TOKENS={limit}"
        )


# --- the time limit ----------------------------------------------------------------------


def _signals_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise _BatchTimeout


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block with :class:`_BatchTimeout` after ``seconds`` (main thread).

    The previous SIGALRM handler and timer are restored afterwards, a previous timer
    with the time the block took subtracted (and fired at once if it fell due meanwhile),
    so code around the runner that uses SIGALRM keeps working. Main thread only (the
    caller checks); without a limit the block just runs.
    """
    if seconds is None:
        yield
        return
    previous_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    started = time.monotonic()
    previous_delay, previous_interval = 0.0, 0.0
    try:
        try:
            previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
            yield
        finally:
            # Disarm first; if the alarm fires right here, the outer finally still
            # restores the handler.
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = previous_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), previous_interval)
