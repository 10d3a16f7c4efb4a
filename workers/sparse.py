"""SparseVectorGenerator: SPLADE vectors and BM25 term statistics for a staged batch.

CPU first (GPU when the job asks for it); each SPLADE model is a
``sentence_transformers.SparseEncoder`` held by the worker's
:class:`~workers.model_manager.ModelManager`, and its batches adapt to memory
(:mod:`workers.adaptive`: an out-of-memory batch is cut smaller and retried). When a
model cannot be loaded or fails on a batch (an exception, a single chunk out of memory
alone, a Celery time limit), chunks whose metadata carries sparse weights
(``metadata.sparse`` as ``{token: weight}``) use those, the rest are marked missing, and
the error is recorded: the job still completes.

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
from workers.adaptive import run_adaptive
from workers.measure import StageFigures
from workers.model_manager import Loaded, ModelFamily, manager
from workers.precision import vectors_agree
from workers.stage import StageResult

# Padded tokens per SPLADE batch on CPU; the MLM head makes each token cost a full
# vocabulary row, so batches stay small.
DEFAULT_SPARSE_BATCH_TOKENS = 4096


def resolve_device(requested: str | None) -> str:
    """``cpu`` (the default), ``cuda``, or ``auto`` (CUDA when present)."""
    if requested in (None, "", "cpu"):
        return "cpu"
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


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

_vocabs: dict[str, list[str]] = {}


def vocabulary(name: str, tokenizer: Any) -> list[str]:
    """Token of each vocabulary index (once per model and process)."""
    if name not in _vocabs:
        vocab = [""] * len(tokenizer)
        for token, index in tokenizer.get_vocab().items():
            if index < len(vocab):
                vocab[index] = token
        _vocabs[name] = vocab
    return _vocabs[name]


def load_sparse(
    name: str, device: str, dtype: str = "auto", probe: list[str] | None = None
) -> Loaded:
    """The SPLADE model, hydrated on ``device`` by the :class:`ModelManager`; ``probe``
    (texts) decides whether ``auto`` may keep bf16."""
    return manager().get(SPARSE, name, device, dtype, probe)


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    """Tokenise exactly as ``bm25s.tokenize(..., stopwords="en", stemmer=english)``."""
    import bm25s
    import Stemmer

    tokens: list[list[str]] = bm25s.tokenize(
        texts,
        stopwords="en",
        stemmer=_stemmer(Stemmer),
        return_ids=False,
        show_progress=False,
    )
    return tokens


_stemmers: dict[str, Any] = {}


def _stemmer(module: Any) -> Any:
    if "english" not in _stemmers:
        _stemmers["english"] = module.Stemmer("english")
    return _stemmers["english"]


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
    """Sparse rows for every chunk of a batch, for every sparse model of the job."""

    def __init__(
        self, device: str | None = None, max_batch_tokens: int | None = None, dtype: str = "auto"
    ) -> None:
        self.device = resolve_device(device)
        self.max_batch_tokens = max_batch_tokens or DEFAULT_SPARSE_BATCH_TOKENS
        self.dtype = dtype

    def encode(
        self, batch: ChunkBatch, models: list[str], kind: BatchKind = "documents"
    ) -> StageResult:
        """Rows for every chunk and model. Queries go through ``encode_query`` (SPLADE's
        query side) and give BM25 term counts without adding to document frequencies."""
        rows: dict[str, list[SparseRow]] = {}
        errors: list[str] = []
        sizes: list[int] = []
        infos: list[ModelInfo] = []
        figures = StageFigures()
        doc_freqs: dict[str, int] = {}
        texts = [chunk.text for chunk in batch.chunks]
        for name in models:
            if name == BM25:
                rows[name], freqs = self._bm25(texts)
                doc_freqs = freqs if kind == "documents" else {}
                continue
            try:
                sparse = load_sparse(name, self.device, self.dtype, texts)
            except Exception as exc:  # unloadable model: fall back for the whole batch
                errors.append(f"{name}: load failed: {type(exc).__name__}: {exc}"[:300])
                rows[name] = [metadata_row(chunk.metadata) for chunk in batch.chunks]
                continue
            infos.append(sparse.info)
            rows[name] = self._live(sparse, batch, errors, sizes, kind, figures)
        shard = SparseShard(
            job_id=batch.job_id,
            batch_id=batch.batch_id,
            chunk_ids=[chunk.chunk_id for chunk in batch.chunks],
            rows=rows,
            doc_freqs=doc_freqs,
            errors=errors,
            batch_sizes=sizes,
        )
        tokens = sum(chunk.n_tokens for chunk in batch.chunks)
        return StageResult(shard, sizes, tokens, infos, self.device, figures)

    def _live(
        self,
        sparse: Loaded,
        batch: ChunkBatch,
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
        encode = sparse.model.encode_query if kind == "queries" else sparse.model.encode
        vocab = vocabulary(sparse.info.name, sparse.model.tokenizer)
        out: list[SparseRow | None] = [None] * len(chunks)
        lengths = [chunk.n_tokens + 2 for chunk in chunks]

        def fall_back(group: list[int], reason: str) -> None:
            errors.append(f"{sparse.info.name}: {reason}"[:300])
            for position in group:
                out[position] = metadata_row(chunks[position].metadata)

        def run(group: list[int]) -> None:
            try:
                encoded = encode(
                    [chunks[i].text for i in group],
                    batch_size=len(group),
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )
            except torch.cuda.OutOfMemoryError:
                raise  # run_adaptive halves the budget and re-cuts (or calls fall_back)
            except Exception as exc:  # a time limit, a broken input: fall back, go on
                fall_back(group, f"{type(exc).__name__}: {exc}")
                return
            for position, row in zip(group, _rows(encoded, vocab), strict=True):
                out[position] = row

        done = run_adaptive(
            lengths,
            run,
            stage="sparse",
            model=sparse.info.name,
            device=self.device,
            ceiling=self.max_batch_tokens,
            figures=figures,
            too_large=fall_back,
        )
        sizes += done.batch_sizes
        return [
            row if row is not None else SparseRow(tokens=[], weights=[], source="missing")
            for row in out
        ]

    @staticmethod
    def _bm25(texts: list[str]) -> tuple[list[SparseRow], dict[str, int]]:
        rows: list[SparseRow] = []
        doc_freqs: Counter[str] = Counter()
        for terms in bm25_tokenize(texts):
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
