"""SparseVectorGenerator: SPLADE vectors and BM25 term statistics for a staged batch.

CPU first (GPU when the job asks for it); each SPLADE model is a
``sentence_transformers.SparseEncoder`` held by the worker's
:class:`~workers.inference.model_manager.ModelManager`, and its batches run through a
:class:`~workers.inference.batch_runner.BatchRunner` (an out-of-memory batch is cut
smaller and retried). When a model cannot be loaded or fails on a batch (an exception,
a single chunk out of memory alone, a Celery time limit), chunks whose metadata carries
sparse weights (``metadata.sparse`` as ``{token: weight}``) use those, the rest are
marked missing, and the error is recorded: the job still completes.

``bm25`` is a sparse "model" without weights: workers emit each chunk's term
frequencies and length (tokenised as ``bm25s`` does: English stopwords, Snowball
stemmer) plus the batch's document frequencies; the aggregator merges the statistics of
every batch and computes the BM25 weights.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from shared.inputs.models import BM25
from shared.records.schemas import BatchKind, Chunk, ChunkBatch, ModelInfo, SparseRow, SparseShard
from workers.inference.batch_runner import ItemFallback, first_batch
from workers.inference.devices import default_batch_tokens, sparse_device
from workers.inference.earlier import Earlier, Taken, per_batch
from workers.inference.engine import Inference
from workers.inference.feed import (
    Distinct,
    Feed,
    encode_inputs,
    forward,
    per_device,
    served_positions,
    staged_ids,
    text_feed,
)
from workers.inference.model_manager import Loaded, ModelFamily
from workers.inference.precision import vectors_agree
from workers.runtime.measure import StageFigures, UnitOutcome


def _load(path: str, device: str) -> Any:
    from sentence_transformers import SparseEncoder

    return SparseEncoder(path, device=device)


def _probe(model: Any, texts: list[str]) -> np.ndarray[Any, Any]:
    vectors = model.encode(texts, convert_to_tensor=True, show_progress_bar=False)
    dense: np.ndarray[Any, Any] = (
        (vectors.to_dense() if vectors.is_sparse else vectors).float().cpu().numpy()
    )
    return dense


SPARSE = ModelFamily(
    kind="sparse",
    load=_load,
    probe=_probe,
    agree=vectors_agree,
    dim=lambda model: len(model.tokenizer),
    max_seq_length=lambda model: int(model.max_seq_length or 0),
)


def vocabulary(tokenizer: Any) -> list[str]:
    """The token of each vocabulary index."""
    vocab = [""] * len(tokenizer)
    for token, index in tokenizer.get_vocab().items():
        if index < len(vocab):
            vocab[index] = token
    return vocab


def bm25_tokenize(texts: list[str], stemmer: Any = None) -> list[list[str]]:
    """Tokenise exactly as ``bm25s.tokenize(..., stopwords="en", stemmer=english)``."""
    import bm25s
    import Stemmer

    tokens: list[list[str]] = bm25s.tokenize(
        texts,
        stopwords="en",
        stemmer=stemmer or Stemmer.Stemmer("english"),
        return_ids=False,
        show_progress=False,
    )
    return tokens


def metadata_row(metadata: dict[str, Any]) -> SparseRow:
    """The fallback: ``metadata.sparse`` weights when a chunk carries them."""
    weights = metadata.get("sparse")
    if isinstance(weights, dict) and weights:
        pairs = [(str(t), float(w)) for t, w in weights.items() if isinstance(w, int | float) and w]
        if pairs:
            return SparseRow(
                tokens=[t for t, _ in pairs], weights=[w for _, w in pairs], source="metadata"
            )
    return SparseRow(tokens=[], weights=[], source="missing")


class SparseVectorGenerator:
    """Sparse rows for every chunk of a batch, for every sparse model of the job.

    Args:
        inference: The worker's models and learned budgets.
        device: The job's ``--sparse-device`` (``cpu``, ``cuda``, ``auto``).
        max_batch_tokens: The padded-token budget to start from (default: the device's).
        dtype: The dtype policy.
    """

    def __init__(
        self,
        inference: Inference,
        device: str | None = None,
        max_batch_tokens: int | None = None,
        dtype: str = "auto",
    ) -> None:
        self.inference = inference
        self.device = sparse_device(device)
        self.max_batch_tokens = max_batch_tokens
        self.dtype = dtype
        # Model -> its terms by index, for the export's Parquet parts (see workers.tasks).
        self.vocabularies: dict[str, list[str]] = {}

    def encode(
        self, batch: ChunkBatch, models: list[str], kind: BatchKind = "documents"
    ) -> UnitOutcome:
        """:meth:`encode_batches` of one staged batch."""
        return self.encode_batches([batch], models, kind)

    def encode_batches(
        self,
        batches: list[ChunkBatch],
        models: list[str],
        kind: BatchKind = "documents",
        earlier: Earlier | None = None,
    ) -> UnitOutcome:
        """Rows for every chunk of a unit's staged batches and every model, one shard per
        batch. Queries go through ``encode_query`` (SPLADE's query side) and give BM25
        term counts without adding to document frequencies. A chunk whose row an
        earlier job made with a model of the same key (``earlier``, ``run --reuse``)
        gets that row and is not encoded; BM25 is always counted afresh (its weights
        are the whole collection's)."""
        chunks = [chunk for batch in batches for chunk in batch.chunks]
        rows: dict[str, list[SparseRow]] = {}
        errors: list[str] = []
        sizes: list[int] = []
        infos: list[ModelInfo] = []
        figures = StageFigures()
        doc_freqs: list[dict[str, int]] = [{} for _ in batches]
        taken: dict[str, list[int]] = {}
        encoded: dict[str, list[int]] = {}
        # A text the unit holds twice goes through a model once (see Distinct); BM25's
        # statistics count every chunk.
        every_text = [chunk.text for chunk in chunks]
        # +2: [CLS] and [SEP], which n_tokens (text tokens only) leaves out.
        every_length = [chunk.n_tokens + 2 for chunk in chunks]
        # A chunk another chunk of the job serves is not encoded (its rows are filled
        # as the shard is read: shared.records.served_rows), but BM25 counts it.
        served = served_positions(batches)
        distinct = Distinct.of(every_text, served)
        texts = distinct.pick(every_text)
        approximate = distinct.pick(every_length)
        tokens: list[int] = []
        for name in models:
            if name == BM25:
                rows[name] = []
                for i, batch in enumerate(batches):
                    batch_rows, freqs = self._bm25([chunk.text for chunk in batch.chunks])
                    rows[name] += batch_rows
                    doc_freqs[i] = freqs if kind == "documents" else {}
                continue
            try:
                # The probe that decides whether ``auto`` may keep bf16: the first
                # model batch, at its real shape.
                budget = self.max_batch_tokens or default_batch_tokens("sparse", self.device)
                probe = first_batch(texts, approximate, budget)
                sparse = self.inference.models.get(SPARSE, name, self.device, self.dtype, probe)
            except Exception as exc:  # unloadable model: fall back for the whole batch
                errors.append(f"{name}: load failed: {type(exc).__name__}: {exc}"[:300])
                rows[name] = [metadata_row(chunk.metadata) for chunk in chunks]
                continue
            infos.append(sparse.info)
            found = earlier.take(sparse.info) if earlier is not None else None
            # What this model encodes: the distinct texts, less those it has rows for.
            todo = distinct
            if found is not None:
                todo = Distinct.of(every_text, set(found.positions) | served)
                taken[sparse.info.name] = found.positions
            encoded[sparse.info.name] = todo.firsts
            inputs = encode_inputs(self.inference, "sparse", sparse.info.name, sparse.model, kind)
            staged = staged_ids(batches, inputs.identity).pick(todo.firsts)
            feed = text_feed(
                inputs, todo.pick(every_text), staged, todo.pick(every_length).__getitem__
            )
            rows[name] = self._live(sparse, chunks, todo, feed, errors, sizes, figures, found)
            if found is None:
                tokens = tokens or [
                    feed.lengths[row] if row >= 0 else every_length[i]
                    for i, row in enumerate(distinct.rows)
                ]
        tokens = tokens or every_length
        reused, fresh = per_batch(taken, batches), per_batch(encoded, batches)
        return UnitOutcome.of_batches(
            batches,
            tokens,
            lambda index, batch, part: SparseShard(
                job_id=batch.job_id,
                batch_id=batch.batch_id,
                chunk_ids=[chunk.chunk_id for chunk in batch.chunks],
                rows={name: model_rows[part] for name, model_rows in rows.items()},
                doc_freqs=doc_freqs[index],
                errors=errors,
                batch_sizes=sizes,
                reused=reused[index],
                encoded=fresh[index],
                served=batch.served,
            ),
            device=self.device,
            batch_sizes=sizes,
            kind=kind,
            figures=figures,
            models=infos,
        )

    def _live(
        self,
        sparse: Loaded,
        chunks: list[Chunk],
        distinct: Distinct,
        feed: Feed,
        errors: list[str],
        sizes: list[int],
        figures: StageFigures,
        found: Taken | None = None,
    ) -> list[SparseRow]:
        """Rows from the model, in adaptive token-budget batches over the distinct texts
        (``feed``), each chunk given its text's row. A batch that fails (a single chunk
        out of memory, a time limit, a broken input) falls back to metadata weights for
        its chunks (each chunk its own metadata's), and the rest of the batch goes on.
        Each batch's vectors stay on the device until the unit's end, when their
        non-zeros come back in one copy per device. Chunks with an earlier row
        (``found``) take it as it is."""
        import torch

        name = sparse.info.name
        vocab: list[str] = self.inference.once(
            ("vocabulary", name), lambda: vocabulary(sparse.model.tokenizer)
        )
        self.vocabularies[name] = vocab
        out: list[SparseRow | None] = [None] * len(chunks)
        if found is not None and found.sparse is not None:
            for position, row in zip(found.positions, found.sparse, strict=True):
                out[position] = row
        members = distinct.members()
        outputs: list[tuple[list[int], torch.Tensor]] = []
        max_active_dims = getattr(sparse.model, "max_active_dims", None)

        def fall_back(group: list[int], reason: str) -> None:
            errors.append(f"{name}: {reason}"[:300])
            for item in group:
                for position in members[item]:
                    out[position] = metadata_row(chunks[position].metadata)

        def run(model: Any, group: list[int]) -> None:
            try:
                vectors = forward(model, feed, group)["sentence_embedding"]
                if max_active_dims is not None:
                    from sentence_transformers.util import select_max_active_dims

                    vectors = select_max_active_dims(vectors, max_active_dims=max_active_dims)
            except torch.cuda.OutOfMemoryError:
                raise  # the runner halves the budget and re-cuts (or falls back)
            except Exception as exc:  # a time limit, a broken input: fall back, go on
                fall_back(group, f"{type(exc).__name__}: {exc}")
                return
            outputs.append((group, vectors.to_dense() if vectors.is_sparse else vectors))

        if distinct.firsts:
            runner = self.inference.runner("sparse", name, self.device, self.max_batch_tokens)
            done = runner.run(
                sparse.model,
                feed.lengths,
                run,
                figures=figures,
                fallback=ItemFallback("metadata", fall_back),
                lay_out=feed.lay_out,
            )
            sizes += done.batch_sizes
        for item, row in _rows(outputs, vocab):
            for position in members[item]:
                out[position] = row
        return [
            row if row is not None else SparseRow(tokens=[], weights=[], source="missing")
            for row in out
        ]

    def _bm25(self, texts: list[str]) -> tuple[list[SparseRow], dict[str, int]]:
        import Stemmer

        stemmer = self.inference.once(("stemmer", "english"), lambda: Stemmer.Stemmer("english"))
        rows: list[SparseRow] = []
        doc_freqs: Counter[str] = Counter()
        for terms in bm25_tokenize(texts, stemmer):
            counts = Counter(terms)
            doc_freqs.update(counts.keys())
            rows.append(
                SparseRow(
                    tokens=list(counts),
                    weights=[float(c) for c in counts.values()],
                    length=len(terms),
                )
            )
        return rows, dict(doc_freqs)


def _rows(outputs: list[tuple[list[int], Any]], vocab: list[str]) -> list[tuple[int, SparseRow]]:
    """Each item's (token, weight) row, zeros dropped, from every batch's [n, vocab]
    vectors: their non-zeros found on the device they ran on and copied back in one go
    per device."""
    import torch

    found: list[tuple[int, SparseRow]] = []
    for order, gathered in per_device(outputs):
        stacked = gathered.to(torch.float32)
        where = torch.nonzero(stacked, as_tuple=True)
        values = stacked[where].cpu().numpy()
        rows, columns = (index.cpu().numpy() for index in where)
        # Non-zeros come row by row, columns ascending within a row.
        bounds = np.searchsorted(rows, np.arange(len(order) + 1))
        for i, position in enumerate(order):
            lo, hi = bounds[i], bounds[i + 1]
            found.append(
                (
                    position,
                    SparseRow(
                        tokens=[vocab[c] for c in columns[lo:hi].tolist()],
                        weights=values[lo:hi].tolist(),
                    ),
                )
            )
    return found
