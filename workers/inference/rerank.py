"""CrossEncoder reranking: (query, passage) pairs scored in token-budget batches.

A worker's :class:`~workers.inference.model_manager.ModelManager` holds each reranker
(:func:`load_cross_encoder`), and the worker keeps one :class:`CrossEncoderBatchExecutor`
per (model, device) for its life. The executor owns no loop of its own: it hands the
pairs to a :class:`~workers.inference.batch_runner.BatchRunner`, whose budget is the
process's (shrunk on out-of-memory errors, grown back after a run of good batches), so
what it learns carries over from one task to the next.

A rerank task must not fail a job because one batch is too big or too slow: the
runner re-cuts an out-of-memory batch smaller, splits a batch over the time limit in
two, sends a half that is still too slow (or a pair out of memory alone) to a CPU copy
of the model, and pairs that no path could score come back as ``None`` (the caller
keeps them in fused order). Every such event is counted in
:class:`~shared.records.schemas.RerankStats`, so the manifest says how much of the ranking the
reranker really saw. Any other error of the model (a plain ``RuntimeError``, a bad
input) propagates: it is a bug or a broken model, and the task's retry and failure
handling should see it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import torch

from shared.inputs import tokens
from shared.records.schemas import FusedGroup, ModelInfo, RerankShard, RerankStats
from workers.inference.batch_runner import BatchRunner, ItemFallback, TokenBudget, first_batch
from workers.inference.devices import default_batch_tokens
from workers.inference.engine import Inference
from workers.inference.feed import (
    Feed,
    StagedIds,
    forward,
    model_inputs,
    pair_feed,
    per_device,
)
from workers.inference.layout import Ids, Pieces
from workers.inference.model_manager import Loaded, ModelFamily
from workers.inference.precision import scores_agree
from workers.runtime.measure import StageFigures

# Tokenizers without a configured limit report int(1e30) as model_max_length; anything
# above this is such a placeholder, not a real limit.
_UNSET_MAX_LENGTH = 1_000_000
# The limit used when neither the model nor its config states one (BERT's).
_FALLBACK_MAX_LENGTH = 512


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
    inference: Inference,
    name: str,
    device: str,
    dtype: str = "fp32",
    probe: list[tuple[str, str]] | None = None,
) -> Loaded:
    """The reranker, hydrated on ``device`` by the worker's :class:`ModelManager`.

    Loading takes seconds and the weights take memory, so a worker pays for them once,
    not per task. A GPU worker also keeps a CPU copy for its fallback path (a separate
    entry of the manager, device ``cpu``).

    Args:
        inference: The worker's models.
        name: A hub id, an alias, or a local folder (see
            :func:`shared.inputs.models.resolve_model`).
        device: A torch device string (``cpu``, ``cuda``, ``cuda:1``).
        dtype: The dtype policy (``auto``, ``fp32``, ``bf16``, ``fp16``).
        probe: (query, passage) pairs that decide whether ``auto`` may keep bf16.

    Returns:
        The model and its :class:`ModelInfo` (``kind="rerank"``).

    Raises:
        EmbedFleetError: if no source has the model.
    """
    return inference.models.get(RERANK, name, device, dtype, probe)


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


# --- the executor --------------------------------------------------------------------


class CrossEncoderBatchExecutor:
    """Scores (query, passage) pairs in token-budget batches that adapt to the device.

    The batches run through a :class:`~workers.inference.batch_runner.BatchRunner`:
    out of memory, the budget halves and the rest is re-cut (a pair that does not fit
    alone goes to the CPU fallback); after ``grow_after`` good batches in a row the
    budget doubles again, up to ``max_batch_tokens``. In the main thread (where Celery's
    prefork children run tasks) a call over ``time_limit_s`` is interrupted, split in
    two, and a half still too slow goes to the CPU model (when the executor runs on
    another device and ``cpu_model`` is given); what no path scored stays ``None``.
    Elsewhere (threads cannot receive signals) a slow call is counted as a timeout but
    its scores are kept, because they are correct and dropping them would only lose
    work already paid for.

    Scores stay where the model computed them until the end of :meth:`score`, then come
    back in one device-to-host copy per device, so the GPU runs batch n while the CPU
    tokenises batch n + 1.

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
        simulate_oom_tokens: int | None = None,
    ) -> None:
        """Set up an executor for one model on one device.

        Args:
            model: A ``CrossEncoder``: its forward pass, ``activation_fn`` and (for
                the inputs only its own ``preprocess`` lays out) ``preprocess``.
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
            budget: The process's learned budget for this (model, device); default: the
                executor's own.
            model_name: Names the model in spans and logs.
            simulate_oom_tokens: The out-of-memory test hook.

        Raises:
            ValueError: on a non-positive budget, time limit or ``grow_after``.
        """
        self.model = model
        self.device = device
        self._runner = BatchRunner(
            "rerank",
            model_name,
            device,
            budget or TokenBudget(max_batch_tokens, grow_after),
            time_limit_s=time_limit_s,
            cpu_model=cpu_model,
            before_batch=before_batch,
            simulate_oom_tokens=simulate_oom_tokens,
        )
        self.max_batch_tokens = self._runner.budget.ceiling

    @property
    def budget(self) -> int:
        """The padded-token budget the next batch is cut at (learned over the worker's
        life)."""
        return self._runner.budget.value

    @property
    def current_device(self) -> str | None:
        """The device of the model call in progress (``cpu`` in the fallback), else None.

        For ``before_batch`` hooks: a test can make only the device calls slow.
        """
        return self._runner.current_device

    def score(self, feed: Feed) -> tuple[list[float | None], RerankStats]:
        """Score every pair of a feed; ``None`` where neither the device nor the CPU could.

        Args:
            feed: The pairs' inputs (:func:`pairs_feed`): their ids (or texts) and each
                pair's length with its special tokens, to cut batches by padded size.

        Returns:
            The scores in the order of the feed's pairs and what it took to get them.

        Raises:
            ValueError: if the model returns more than one score per pair.
            Exception: whatever the device model raises other than an out-of-memory
                error (and the time-limit interruption): a broken model must fail the
                task, not be papered over.
        """
        # Scored batches whose values may still be on the device: read back at the end.
        results: list[tuple[list[int], torch.Tensor]] = []

        def predict(model: Any, group: list[int]) -> None:
            out = forward(model, feed, group)
            # A tensor, left where the model computed it: no device sync per batch.
            results.append((group, _as_scores(model, out["scores"], len(group))))

        figures = StageFigures()
        lengths = feed.lengths
        run = self._runner.run(
            self.model,
            lengths,
            predict,
            figures=figures,
            fallback=ItemFallback("unreranked", lambda group, reason: None),
            lay_out=feed.lay_out,
        )
        scores = _collect(results, len(lengths))
        stats = RerankStats(
            pairs_asked=len(lengths),
            pairs_scored=sum(score is not None for score in scores),
            batch_sizes=run.batch_sizes,
            oom_count=run.oom_count,
            timeout_count=run.timeout_count,
            fallbacks=dict(run.fallbacks),
            max_batch_tokens=self._runner.budget.value,
            peak_memory_bytes=figures.peak_memory_bytes,
            tokens=sum(lengths),
        )
        return scores, stats


def _collect(results: list[tuple[list[int], torch.Tensor]], n: int) -> list[float | None]:
    """Every batch's scores back in pair order (one device-to-host copy per device)."""
    scores: list[float | None] = [None] * n
    for positions, values in per_device(results):
        for index, value in zip(positions, values.double().cpu().tolist(), strict=True):
            scores[index] = float(value)
    return scores


def _as_scores(model: Any, scores: torch.Tensor, rows: int) -> torch.Tensor:
    """A batch's raw scores as ``predict`` makes them (in float32, through the model's
    activation, one label squeezed) and as one [n] tensor on the device they were
    computed on (shapes are checked without a device sync)."""
    if torch.is_floating_point(scores) and torch.finfo(scores.dtype).bits < 32:
        scores = scores.float()
    activation = getattr(model, "activation_fn", None)
    if activation is not None:
        scores = activation(scores)
    scores = scores.detach()
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (rows,):
        raise ValueError(
            f"expected one score per pair ({rows}), got output of shape {tuple(scores.shape)}: "
            "a reranker needs a single-label CrossEncoder"
        )
    return scores


# --- the rerank task's work ------------------------------------------------------------


def executor_for(
    inference: Inference,
    name: str,
    dtype: str = "auto",
    probe: list[tuple[str, str]] | None = None,
) -> tuple[CrossEncoderBatchExecutor, Loaded]:
    """The worker's executor for (model, device): one per process, and its budget is
    the process's, so what it learns outlives the task."""
    device = inference.device
    loaded = load_cross_encoder(inference, name, device, dtype, probe)

    def build() -> CrossEncoderBatchExecutor:
        runner = inference.runner("rerank", loaded.info.name, device)
        return CrossEncoderBatchExecutor(
            loaded.model,
            device,
            runner.budget.ceiling,
            time_limit_s=inference.rerank_timeout_s,
            cpu_model=lambda: load_cross_encoder(inference, name, "cpu", "fp32").model,
            budget=runner.budget,
            model_name=loaded.info.name,
            simulate_oom_tokens=inference.simulate_oom_tokens,
        )

    executor: CrossEncoderBatchExecutor = inference.once(
        ("rerank-executor", loaded.info.name, device, dtype), build
    )
    # The manager may have released and staged the model again since the last task.
    executor.model = loaded.model
    return executor, loaded


def pairs_feed(
    inference: Inference,
    model: Any,
    name: str,
    pairs: list[tuple[str, str]],
    staged: StagedIds | None = None,
    identity: str = "",
) -> Feed:
    """The feed of (query, passage) pairs for a CrossEncoder: each distinct query
    tokenized once with the model's tokenizer, each passage from its staged ids where
    they were made by a tokenizer of the model's identity (``identity``), the rest
    tokenized together in one call; truncated as the model truncates a pair."""
    inputs = model_inputs(inference, ("rerank", name), model, pairs=True)
    if staged is None or identity != inputs.identity:
        staged = StagedIds.none(len(pairs))
    limit = model_max_length(model)

    def approximate(i: int) -> int:
        query, passage = pairs[i]
        return min(limit, len(query.split()) + len(passage.split()) + 3)

    return pair_feed(inputs, pairs, staged, approximate)


def rerank_fused(
    inference: Inference, groups: list[FusedGroup], model: str, rerank_top: int, dtype: str
) -> tuple[list[RerankShard], ModelInfo]:
    """Score the first ``rerank_top`` fused candidates of every query of ``groups``:
    one shard per group.

    All pairs of the groups go to the executor at once, so its token-budget batches mix
    queries (and groups) and stay full. The pairs' ids are laid out first (with the
    model staged on the CPU, which is enough: the passages' staged ids, each query
    tokenized once), so that the ``auto`` probe can run the first real batch at its
    real shape. What the scoring did as a whole (its model batches, out-of-memory
    errors, time limits, fallbacks, peak memory) goes with the first group's statistics
    only, so that the manifest's sums over shards stay what the worker did.
    """
    staged = inference.models.stage(RERANK, model, inference.device, dtype)
    pairs, passages, owners = _pairs_of(groups, rerank_top)
    identities = {group.tokenizer for group in groups}
    identity = identities.pop() if len(identities) == 1 else ""
    feed = pairs_feed(inference, staged.model, staged.name, pairs, passages, identity)
    budget = default_batch_tokens("rerank", inference.device)
    executor, loaded = executor_for(
        inference, model, dtype, first_batch(pairs, feed.lengths, budget)
    )
    scores, run = executor.score(feed)
    by_group: list[dict[str, list[float | None]]] = [{} for _ in groups]
    asked = [0] * len(groups)
    scored = [0] * len(groups)
    lengths = [0] * len(groups)
    position = 0
    for number, query_id, count in owners:
        end = position + count
        mine = scores[position:end]
        by_group[number][query_id] = mine
        asked[number] += count
        scored[number] += sum(score is not None for score in mine)
        lengths[number] += sum(feed.lengths[position:end])
        position = end
    shards = [
        RerankShard(
            job_id=group.job_id,
            group_id=group.group_id,
            scores=by_group[number],
            stats=msgspec.structs.replace(
                run if number == 0 else _EMPTY_RUN,
                pairs_asked=asked[number],
                pairs_scored=scored[number],
                tokens=lengths[number],
                max_batch_tokens=run.max_batch_tokens,
            ),
        )
        for number, group in enumerate(groups)
    ]
    return shards, loaded.info


def _pairs_of(
    groups: list[FusedGroup], rerank_top: int
) -> tuple[list[tuple[str, str]], StagedIds, list[tuple[int, str, int]]]:
    """The (query, passage) pairs of every query's first ``rerank_top`` candidates, the
    passages' staged ids (each group's decoded in one call: its queries share
    candidates), and each query's (group, query id, candidates), in pair order."""
    pairs: list[tuple[str, str]] = []
    piece_of: list[int] = []  # each pair's passage's piece, or -1
    owners: list[tuple[int, str, int]] = []
    flats: list[Ids] = [np.zeros(0, dtype=np.int64)]
    lengths: list[Ids] = [np.zeros(0, dtype=np.int64)]
    count = 0
    for number, group in enumerate(groups):
        ids, each = tokens.from_many(list(group.ids.values()), group.id_dtype)
        piece = {chunk_id: count + k for k, chunk_id in enumerate(group.ids)}
        count += len(each)
        flats.append(ids)
        lengths.append(each)
        for query in group.queries:
            candidates = query.candidates[:rerank_top]
            pairs += [(query.text, group.texts[c.chunk_id]) for c in candidates]
            piece_of += [piece.get(c.chunk_id, -1) for c in candidates]
            owners.append((number, query.query_id, len(candidates)))
    pieces = Pieces.of_flat(np.concatenate(flats), np.concatenate(lengths))
    return pairs, StagedIds(pieces, np.asarray(piece_of, dtype=np.int64)), owners


# What a group's statistics hold of a scoring call that was another group's too.
_EMPTY_RUN = RerankStats(pairs_asked=0, pairs_scored=0, batch_sizes=[])
