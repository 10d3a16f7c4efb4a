"""CrossEncoder reranking: (query, passage) pairs scored in token-budget batches.

A worker's :class:`~workers.model_manager.ModelManager` holds each reranker
(:func:`load_cross_encoder`), and the worker keeps one :class:`CrossEncoderBatchExecutor`
per (model, device) for its life, whose batch budget is the process's
(:mod:`workers.adaptive`: shrunk on out-of-memory errors, grown back after a run of good
batches), so what it learns carries over from one task to the next.

A rerank task must not fail a job because one batch is too big or too slow: an
out-of-memory batch is re-cut smaller, a batch over the time limit is split in two,
a half that is still too slow goes to a CPU copy of the model, and pairs that no path
could score come back as ``None`` (the caller keeps them in fused order). Every such
event is counted in :class:`~shared.schemas.RerankStats`, so the manifest says how
much of the ranking the reranker really saw. Any other error of the model (a plain
``RuntimeError``, a bad input) propagates: it is a bug or a broken model, and the
task's retry and failure handling should see it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import torch

from shared.errors import EmbedFleetError
from shared.logs import LOGGER
from shared.schemas import FusedGroup, ModelInfo, RerankGroup, RerankShard, RerankStats
from workers.adaptive import (
    TokenBudget,
    budget_for,
    check_simulated_oom,
    padded_tokens,
    recut,
)
from workers.batching import token_budget_batches
from workers.dense import pick_device
from workers.measure import StageFigures, model_batch
from workers.model_manager import Loaded, ModelFamily, manager
from workers.precision import PROBE_ITEMS, scores_agree

log = logging.getLogger(f"{LOGGER}.rerank")

# Padded tokens (batch size x longest pair) per model batch when the task leaves it to
# the worker. A cross-encoder attends over query and passage together, so a pair costs
# about what a chunk costs the dense models: the same budgets as dense.py.
DEFAULT_RERANK_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}

# Tokenizers without a configured limit report int(1e30) as model_max_length; anything
# above this is such a placeholder, not a real limit.
_UNSET_MAX_LENGTH = 1_000_000
# The limit used when neither the model nor its config states one (BERT's).
_FALLBACK_MAX_LENGTH = 512


def default_rerank_tokens(device: str) -> int:
    """The batch budget for a device kind (``cuda:1`` counts as ``cuda``; unknown: CPU's)."""
    return DEFAULT_RERANK_BATCH_TOKENS.get(device.split(":")[0], DEFAULT_RERANK_BATCH_TOKENS["cpu"])


# --- loading -------------------------------------------------------------------------


def _load(path: str, device: str) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(path, device=device)


def _probe(model: Any, pairs: list[tuple[str, str]]) -> np.ndarray[Any, Any]:
    batch = [list(pair) for pair in pairs]
    scores: np.ndarray[Any, Any] = model.predict(
        batch, batch_size=len(batch), show_progress_bar=False
    )
    return scores


RERANK = ModelFamily(
    kind="rerank",
    load=_load,
    probe=_probe,
    agree=scores_agree,
    dim=lambda model: int(getattr(model, "num_labels", 1) or 1),
    max_seq_length=lambda model: model_max_length(model),
    default_probe=(("a query", "a passage"),),
)


def load_cross_encoder(
    name: str, device: str, dtype: str = "fp32", probe: list[tuple[str, str]] | None = None
) -> Loaded:
    """The reranker, hydrated on ``device`` by the worker's :class:`ModelManager`.

    Loading takes seconds and the weights take memory, so a worker pays for them once,
    not per task. A GPU worker also keeps a CPU copy for its fallback path (a separate
    entry of the manager, device ``cpu``).

    Args:
        name: A hub id, an alias, or a local folder (see :func:`shared.models.resolve_model`).
        device: A torch device string (``cpu``, ``cuda``, ``cuda:1``).
        dtype: The dtype policy (``auto``, ``fp32``, ``bf16``, ``fp16``).
        probe: (query, passage) pairs that decide whether ``auto`` may keep bf16.

    Returns:
        The model and its :class:`ModelInfo` (``kind="rerank"``).

    Raises:
        EmbedFleetError: if no source has the model.
    """
    return manager().get(RERANK, name, device, dtype, probe)


def model_max_length(model: Any) -> int:
    """The number of tokens the CrossEncoder truncates a pair to.

    sentence-transformers 6 calls it ``max_seq_length`` (``max_length`` is a deprecated
    alias there, and the only name in 5); the tokenizer's ``model_max_length`` is the
    last resort. Tokenizers without a limit report 1e30, and no value may exceed the
    model's position embeddings, so the result is capped by those.
    """
    value: Any = getattr(model, "max_seq_length", None)
    if not value:
        value = getattr(model, "max_length", None)
    if not value:
        tokenizer = getattr(model, "tokenizer", None)
        value = getattr(tokenizer, "model_max_length", None)
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    cap = int(positions) if isinstance(positions, int) and positions > 0 else None
    if not isinstance(value, int) or value <= 0 or value >= _UNSET_MAX_LENGTH:
        return cap or _FALLBACK_MAX_LENGTH
    return min(value, cap) if cap else value


def pair_lengths(tokenizer: Any, query: str, passages: list[str], max_length: int) -> list[int]:
    """Token counts of each (query, passage) pair, as the CrossEncoder will see them.

    The executor cuts batches by padded tokens, so it needs each pair's length with the
    special tokens ([CLS] q [SEP] p [SEP]) and after the truncation the model applies.
    One call of the (Rust) tokenizer over all pairs, without tensors, attention masks or
    token type ids, keeps this cheap for thousands of pairs.

    Args:
        tokenizer: A Hugging Face tokenizer (``CrossEncoder.tokenizer``).
        query: The query, the first text of every pair.
        passages: The second texts.
        max_length: The model's limit (:func:`model_max_length`); longer pairs are
            truncated to it, as the model truncates them.

    Returns:
        One count per passage, each at most ``max_length``.
    """
    if not passages:
        return []
    encoded = tokenizer(
        [query] * len(passages),
        passages,
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return [min(len(ids), max_length) for ids in encoded["input_ids"]]


# --- the executor --------------------------------------------------------------------


class _BatchTimeout(BaseException):
    """Raised by the SIGALRM handler inside a model call that ran past its time limit.

    A ``BaseException``, not an ``Exception``: library code between the handler and the
    executor (tokenizers, progress bars, the caller's task body) may catch ``Exception``
    and would otherwise swallow the interruption.
    """


@dataclass
class _Run:
    """The state of one :meth:`CrossEncoderBatchExecutor.score` call."""

    lengths: Sequence[int]
    scores: list[float | None]
    pending: deque[list[int]] = field(default_factory=deque)
    # Scored batches whose values may still be on the device: read back once, at the
    # end, so the GPU runs batch n while the CPU tokenises batch n + 1.
    results: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    oom_count: int = 0
    timeout_count: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    figures: StageFigures = field(default_factory=StageFigures)

    def count(self, fallback: str) -> None:
        self.fallbacks[fallback] = self.fallbacks.get(fallback, 0) + 1


class CrossEncoderBatchExecutor:
    """Scores (query, passage) pairs in token-budget batches that adapt to the device.

    Out of memory: the budget halves and the batch is re-cut at it; a pair that no longer
    fits even alone goes to the CPU fallback. Grow back: after ``grow_after`` good batches
    in a row the budget doubles, up to ``max_batch_tokens``, so one long pair does not
    slow every later batch. The budget lives on the instance (not per call) because the
    memory a device can spare is a property of the worker, not of a task.

    Time limit: in the main thread (where Celery's prefork children run tasks), a
    ``SIGALRM`` timer interrupts a model call that runs past ``time_limit_s``; the batch
    is split in two halves, a half that is still too slow (or a one-pair batch, which
    cannot be split) goes to the CPU model (when the executor runs on another device and
    ``cpu_model`` is given), and what no path scored stays ``None``. Elsewhere (threads
    cannot receive signals) the call is timed after it returns: it is counted as a
    timeout but its scores are kept, because they are correct and dropping them would
    only lose work already paid for.

    An instance is not thread-safe: a worker keeps one per (model, device) and process.
    """

    def __init__(
        self,
        model: Any,
        device: str,
        max_batch_tokens: int,
        *,
        time_limit_s: float | None = None,
        grow_after: int = 8,
        cpu_model: Callable[[], Any] | None = None,
        before_batch: Callable[[list[int]], None] | None = None,
        budget: TokenBudget | None = None,
        model_name: str = "",
    ) -> None:
        """Set up an executor for one model on one device.

        Args:
            model: Anything with ``CrossEncoder.predict(sentences, batch_size=...,
                show_progress_bar=False, convert_to_numpy=True)``.
            device: The device ``model`` runs on; only ``cpu`` versus anything else
                matters here (a CPU executor has no CPU fallback).
            max_batch_tokens: The initial and largest budget of padded tokens
                (batch size x longest pair) per model call.
            time_limit_s: Seconds one model call may take; ``None``: no limit.
            grow_after: Good batches in a row after which a shrunk budget doubles.
            cpu_model: Returns the CPU copy of the model for the fallback path; called
                once, on first use, so a GPU worker loads it only if it needs it.
            before_batch: A test hook, called with a batch's pair indices right before
                each model call (device and CPU; :attr:`current_device` tells which),
                inside the time-limited region, so a test can make a batch slow without
                a slow model.
            budget: The process's learned budget for this (model, device)
                (:func:`workers.adaptive.budget_for`); default: the executor's own.
            model_name: Names the model in spans and logs.

        Raises:
            ValueError: on a non-positive budget, time limit or ``grow_after``.
        """
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {time_limit_s}")
        self._tokens = budget or TokenBudget(max_batch_tokens, grow_after)
        self.model = model
        self.model_name = model_name
        self.device = device
        self.max_batch_tokens = self._tokens.ceiling
        self.time_limit_s = time_limit_s
        self._cpu_factory = cpu_model
        self._cpu: Any = None
        self._before_batch = before_batch
        self._current_device: str | None = None

    @property
    def budget(self) -> int:
        """The padded-token budget the next batch is cut at (learned over the worker's
        life)."""
        return self._tokens.value

    @property
    def current_device(self) -> str | None:
        """The device of the model call in progress (``cpu`` in the fallback), else None.

        For ``before_batch`` hooks: a test can make only the device calls slow.
        """
        return self._current_device

    @property
    def on_cpu(self) -> bool:
        """Whether the executor's own device is the CPU (then there is no CPU fallback)."""
        return self.device.split(":")[0] == "cpu"

    def score(
        self, pairs: list[tuple[str, str]], lengths: list[int]
    ) -> tuple[list[float | None], RerankStats]:
        """Score every pair; ``None`` where neither the device nor the CPU could.

        Args:
            pairs: (query, passage) pairs.
            lengths: Token count of each pair with its special tokens
                (:func:`pair_lengths`), to cut batches by padded size.

        Returns:
            The scores in the order of ``pairs`` and what it took to get them.

        Raises:
            ValueError: if ``pairs`` and ``lengths`` differ in length, or the model
                returns more than one score per pair.
            Exception: whatever the device model raises other than an out-of-memory
                error (and the time-limit interruption): a broken model must fail the
                task, not be papered over.
        """
        if len(pairs) != len(lengths):
            raise ValueError(f"{len(pairs)} pairs but {len(lengths)} lengths")
        run = _Run(lengths=lengths, scores=[None] * len(pairs))
        run.pending.extend(token_budget_batches(lengths, self._tokens.value))
        cut_at = self._tokens.value
        while run.pending:
            if self._tokens.value != cut_at:
                run.pending = recut(run.pending, run.lengths, self._tokens.value)
                cut_at = self._tokens.value
            group = run.pending.popleft()
            self._run_device(pairs, group, run, may_split=True)
        self._collect(run)
        scored = sum(score is not None for score in run.scores)
        stats = RerankStats(
            pairs_asked=len(pairs),
            pairs_scored=scored,
            batch_sizes=run.batch_sizes,
            oom_count=run.oom_count,
            timeout_count=run.timeout_count,
            fallbacks=run.fallbacks,
            max_batch_tokens=self._tokens.value,
            peak_memory_bytes=run.figures.peak_memory_bytes,
            tokens=sum(lengths),
        )
        return run.scores, stats

    # -- the paths a batch can take ----------------------------------------------------

    def _run_device(
        self, pairs: list[tuple[str, str]], group: list[int], run: _Run, *, may_split: bool
    ) -> None:
        """One batch on the executor's model, with the OOM and time-limit handling."""
        out_of_memory = False
        try:
            values, slow = self._call(self.model, pairs, group, run, device=self.device)
        except torch.cuda.OutOfMemoryError:
            # Handled below, outside the except block: the exception's traceback holds
            # the frames (and tensors) of the failed call until the block ends.
            out_of_memory = True
        except _BatchTimeout:
            self._on_timeout(pairs, group, run, may_split=may_split)
            return
        if out_of_memory:
            self._on_oom(pairs, group, run)
            return
        self._record(group, values, run)
        if slow:
            run.timeout_count += 1
            self._tokens.interrupted()
            log.warning("rerank batch over the time limit (kept)", extra=_fields(group))
            return
        self._tokens.succeeded()

    def _on_oom(self, pairs: list[tuple[str, str]], group: list[int], run: _Run) -> None:
        run.oom_count += 1
        self._tokens.shrink(padded_tokens(group, run.lengths))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        longest = max(run.lengths[i] for i in group)
        log.warning(
            "rerank batch out of memory",
            extra=_fields(group, budget=self._tokens.value, longest=longest),
        )
        if self._tokens.value < longest:
            self._run_fallback(pairs, group, run)
        else:
            # Back to the front of the queue; score() re-cuts it at the new budget.
            run.pending.appendleft(group)

    def _on_timeout(
        self, pairs: list[tuple[str, str]], group: list[int], run: _Run, *, may_split: bool
    ) -> None:
        run.timeout_count += 1
        self._tokens.interrupted()
        log.warning("rerank batch timed out", extra=_fields(group, split=may_split))
        if may_split and len(group) > 1:
            run.count("split")
            half = (len(group) + 1) // 2
            for part in (group[:half], group[half:]):
                self._run_device(pairs, part, run, may_split=False)
        else:
            self._run_fallback(pairs, group, run)

    def _run_fallback(self, pairs: list[tuple[str, str]], group: list[int], run: _Run) -> None:
        """The CPU model if there is one; else (or if it fails too) the pairs stay None.

        Unlike the device path, failures of the CPU path (it cannot load, a torch error,
        its own time limit) are absorbed: this is the last resort for one batch, and the
        rest of the task should still be scored. Only those failures, though: anything
        else (a Celery soft time limit of the whole task, an interrupt) propagates.
        """
        if self.on_cpu or self._cpu_factory is None:
            run.count("unreranked")
            log.warning("rerank batch left unreranked", extra=_fields(group))
            return
        try:
            if self._cpu is None:
                self._cpu = self._cpu_factory()
            values, slow = self._call(self._cpu, pairs, group, run, device="cpu")
        except _BatchTimeout:
            run.timeout_count += 1
            run.count("unreranked")
            log.warning("rerank CPU fallback timed out", extra=_fields(group))
            return
        except (RuntimeError, ValueError, OSError, EmbedFleetError):
            run.count("unreranked")
            log.warning("rerank CPU fallback failed", extra=_fields(group), exc_info=True)
            return
        if slow:
            run.timeout_count += 1
        run.count("cpu")
        self._record(group, values, run)

    # -- one model call -----------------------------------------------------------------

    def _call(
        self,
        model: Any,
        pairs: list[tuple[str, str]],
        group: list[int],
        run: _Run,
        *,
        device: str,
    ) -> tuple[torch.Tensor, bool]:
        """One ``predict`` over ``group``, under the time limit, in a batch span.

        Returns:
            The scores, and whether the call ran over the limit without being
            interrupted (off the main thread, where no signal can interrupt it).

        Raises:
            _BatchTimeout: if the SIGALRM timer interrupted the call.
        """
        batch = [list(pairs[i]) for i in group]
        interruptible = _signals_usable()
        started = time.monotonic()
        self._current_device = device
        tokens = padded_tokens(group, run.lengths)
        record = None
        try:
            with (
                model_batch(
                    "rerank", self.model_name, device, len(group), tokens, run.oom_count
                ) as record,
                _time_limit(self.time_limit_s if interruptible else None),
            ):
                if device == self.device:
                    check_simulated_oom(tokens)
                if self._before_batch is not None:
                    self._before_batch(list(group))
                # A tensor, left where the model computed it: no device sync per batch.
                output = model.predict(
                    batch, batch_size=len(batch), show_progress_bar=False, convert_to_tensor=True
                )
        finally:
            self._current_device = None
            if record is not None:
                run.figures.add(record, device)
        elapsed = time.monotonic() - started
        slow = not interruptible and self.time_limit_s is not None and elapsed > self.time_limit_s
        return _as_scores(output, len(group)), slow

    def _record(self, group: list[int], values: torch.Tensor, run: _Run) -> None:
        run.results.append((group, values))
        run.batch_sizes.append(len(group))

    @staticmethod
    def _collect(run: _Run) -> None:
        """Read every batch's scores back (one device-to-host copy per device)."""
        by_device: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        for group, values in run.results:
            by_device.setdefault(str(values.device), []).append((group, values))
        for parts in by_device.values():
            flat = torch.cat([values for _, values in parts]).double().cpu().tolist()
            position = 0
            for group, _ in parts:
                for index in group:
                    run.scores[index] = float(flat[position])
                    position += 1
        run.results.clear()


def _as_scores(output: Any, rows: int) -> torch.Tensor:
    """``predict``'s output ([n] or [n, 1]; tensor, tensors or array) as one [n] tensor,
    on the device it was computed on (shapes are checked without a device sync)."""
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        output = torch.stack(output)
    tensor = (
        output.detach()
        if isinstance(output, torch.Tensor)
        else torch.as_tensor(np.asarray(output, dtype=np.float64))
    )
    if tensor.ndim == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tuple(tensor.shape) != (rows,):
        raise ValueError(
            f"expected one score per pair ({rows}), got output of shape {tuple(tensor.shape)}: "
            "a reranker needs a single-label CrossEncoder"
        )
    return tensor


def _signals_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise _BatchTimeout


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block with :class:`_BatchTimeout` after ``seconds`` (main thread).

    The previous SIGALRM handler and timer are restored afterwards, a previous timer
    with the time the block took subtracted (and fired at once if it fell due meanwhile),
    so code around the executor that uses SIGALRM keeps working. Main thread only (the
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


def _fields(group: list[int], **more: object) -> dict[str, dict[str, object]]:
    return {"fields": {"stage": "rerank", "pairs": len(group), **more}}


# --- the rerank task's work ------------------------------------------------------------

_executors: dict[tuple[str, str, str], CrossEncoderBatchExecutor] = {}


def executor_for(
    name: str,
    device: str,
    time_limit_s: float | None,
    max_batch_tokens: int | None = None,
    dtype: str = "auto",
    probe: list[tuple[str, str]] | None = None,
) -> tuple[CrossEncoderBatchExecutor, Loaded]:
    """The worker's executor for (model, device): one per process, and its budget is
    the process's (:func:`workers.adaptive.budget_for`), so what it learns outlives
    the task."""
    loaded = load_cross_encoder(name, device, dtype, probe)
    key = (loaded.info.name, device, dtype)
    ceiling = max_batch_tokens or default_rerank_tokens(device)
    if key not in _executors:
        _executors[key] = CrossEncoderBatchExecutor(
            loaded.model,
            device,
            ceiling,
            time_limit_s=time_limit_s,
            cpu_model=lambda: load_cross_encoder(name, "cpu", "fp32").model,
            budget=budget_for("rerank", loaded.info.name, device, ceiling),
            model_name=loaded.info.name,
        )
    executor = _executors[key]
    # The manager may have released and staged the model again since the last task.
    executor.model = loaded.model
    return executor, loaded


def rerank_fused(
    group: FusedGroup, msg: RerankGroup, time_limit_s: float | None
) -> tuple[RerankShard, ModelInfo]:
    """Score the first ``rerank_top`` fused candidates of every query of a group.

    All pairs of the group go to the executor at once, so its token-budget batches mix
    queries and stay full.
    """
    device = pick_device()
    probe = [
        (query.text, group.texts[c.chunk_id])
        for query in group.queries
        for c in query.candidates[: msg.rerank_top]
    ][:PROBE_ITEMS]
    executor, loaded = executor_for(
        msg.model, device, time_limit_s, msg.max_batch_tokens, msg.dtype, probe
    )
    pairs: list[tuple[str, str]] = []
    lengths: list[int] = []
    owners: list[tuple[str, int]] = []
    for query in group.queries:
        passages = [group.texts[c.chunk_id] for c in query.candidates[: msg.rerank_top]]
        pairs += [(query.text, passage) for passage in passages]
        lengths += pair_lengths(
            loaded.model.tokenizer, query.text, passages, loaded.info.max_seq_length
        )
        owners.append((query.query_id, len(passages)))
    scores, stats = executor.score(pairs, lengths)
    by_query: dict[str, list[float | None]] = {}
    position = 0
    for query_id, count in owners:
        by_query[query_id] = scores[position : position + count]
        position += count
    shard = RerankShard(job_id=msg.job_id, group_id=msg.group_id, scores=by_query, stats=stats)
    return shard, loaded.info
