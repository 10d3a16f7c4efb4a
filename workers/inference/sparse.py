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

from shared.models import BM25
from shared.schemas import BatchKind, ChunkBatch, ModelInfo, SparseRow, SparseShard
from workers.inference.batch_runner import ItemFallback, first_batch
from workers.inference.devices import default_batch_tokens, sparse_device
from workers.inference.engine import Inference
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
        """Rows for every chunk and model. Queries go through ``encode_query`` (SPLADE's
        query side) and give BM25 term counts without adding to document frequencies."""
        rows: dict[str, list[SparseRow]] = {}
        errors: list[str] = []
        sizes: list[int] = []
        infos: list[ModelInfo] = []
        figures = StageFigures()
        doc_freqs: dict[str, int] = {}
        texts = [chunk.text for chunk in batch.chunks]
        # +2: [CLS] and [SEP], which n_tokens (text tokens only) leaves out.
        lengths = [chunk.n_tokens + 2 for chunk in batch.chunks]
        for name in models:
            if name == BM25:
                rows[name], freqs = self._bm25(texts)
                doc_freqs = freqs if kind == "documents" else {}
                continue
            try:
                # The probe that decides whether ``auto`` may keep bf16: the first
                # model batch, at its real shape.
                budget = self.max_batch_tokens or default_batch_tokens("sparse", self.device)
                probe = first_batch(texts, lengths, budget)
                sparse = self.inference.models.get(SPARSE, name, self.device, self.dtype, probe)
            except Exception as exc:  # unloadable model: fall back for the whole batch
                errors.append(f"{name}: load failed: {type(exc).__name__}: {exc}"[:300])
                rows[name] = [metadata_row(chunk.metadata) for chunk in batch.chunks]
                continue
            infos.append(sparse.info)
            rows[name] = self._live(sparse, batch, lengths, errors, sizes, kind, figures)
        shard = SparseShard(
            job_id=batch.job_id,
            batch_id=batch.batch_id,
            chunk_ids=[chunk.chunk_id for chunk in batch.chunks],
            rows=rows,
            doc_freqs=doc_freqs,
            errors=errors,
            batch_sizes=sizes,
        )
        return UnitOutcome(
            items=len(batch.chunks),
            device=self.device,
            shard=shard,
            batch_sizes=sizes,
            kind=kind,
            tokens=sum(chunk.n_tokens for chunk in batch.chunks),
            figures=figures,
            models=infos,
        )

    def _live(
        self,
        sparse: Loaded,
        batch: ChunkBatch,
        lengths: list[int],
        errors: list[str],
        sizes: list[int],
        kind: BatchKind,
        figures: StageFigures,
    ) -> list[SparseRow]:
        """Rows from the model, in adaptive token-budget batches. A batch that fails
        (a single chunk out of memory, a time limit, a broken input) falls back to
        metadata weights for its chunks, and the rest of the batch goes on."""
        import torch

        chunks = batch.chunks
        name = sparse.info.name
        vocab: list[str] = self.inference.once(
            ("vocabulary", name), lambda: vocabulary(sparse.model.tokenizer)
        )
        self.vocabularies[name] = vocab
        out: list[SparseRow | None] = [None] * len(chunks)

        def fall_back(group: list[int], reason: str) -> None:
            errors.append(f"{name}: {reason}"[:300])
            for position in group:
                out[position] = metadata_row(chunks[position].metadata)

        def run(model: Any, group: list[int]) -> None:
            encode = model.encode_query if kind == "queries" else model.encode
            try:
                encoded = encode(
                    [chunks[i].text for i in group],
                    batch_size=len(group),
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )
            except torch.cuda.OutOfMemoryError:
                raise  # the runner halves the budget and re-cuts (or falls back)
            except Exception as exc:  # a time limit, a broken input: fall back, go on
                fall_back(group, f"{type(exc).__name__}: {exc}")
                return
            for position, row in zip(group, _rows(encoded, vocab), strict=True):
                out[position] = row

        runner = self.inference.runner("sparse", name, self.device, self.max_batch_tokens)
        done = runner.run(
            sparse.model,
            lengths,
            run,
            figures=figures,
            fallback=ItemFallback("metadata", fall_back),
        )
        sizes += done.batch_sizes
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


def _rows(encoded: Any, vocab: list[str]) -> list[SparseRow]:
    """A sparse [n, vocab] tensor into rows of (token, weight), zeros dropped."""
    import torch

    dense_rows = encoded.to_dense() if encoded.is_sparse else encoded
    rows: list[SparseRow] = []
    for vector in dense_rows.to(torch.float32).cpu():
        ids = torch.nonzero(vector, as_tuple=True)[0]
        rows.append(
            SparseRow(tokens=[vocab[i] for i in ids.tolist()], weights=vector[ids].tolist())
        )
    return rows
