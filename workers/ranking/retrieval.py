"""The retrieve phase: every query's exact top-k over a group of document shards.

A retrieve task reads the job's query vectors and one group of document shards and
keeps, per query and ranking, the best ``k`` chunks under one total order: score
descending, then chunk id ascending (plain string order), so ties never depend on which
group a chunk was in. Because the order is total, the global top-k of a query is made
of members of the groups' top-k lists, and merging those lists (:func:`merge_hits`)
gives exactly what a brute-force search over the whole collection gives. No process
ever holds every vector of the collection: a task holds the queries and one shard.

Scores: dense is the dot product of L2-normalised vectors (cosine), averaged over the
models of the ensemble; sparse is the dot product of the query's and the chunk's
sparse weights, per model (SPLADE: exported weights; BM25: query term counts times
the chunk's BM25 weights, which is BM25 itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import sparse as sp

from shared.inputs.models import BM25
from shared.records.job_store import JobStore
from shared.records.schemas import DENSE_RANKING, DenseShard, Hits, JobSpec, SparseRow
from shared.records.served_rows import ServedShards
from workers.ranking.sparse_weights import BM25Statistics, collection_bm25, rounded

# Queries scored at once: bounds the score matrix to QUERY_BLOCK x shard rows.
QUERY_BLOCK = 1024

SparseVector = dict[str, float]


def top_indices(
    scores: Sequence[float] | np.ndarray[Any, Any], ids: Sequence[str], k: int
) -> list[int]:
    """Indices of the best ``k`` items under (score desc, id asc), best first."""
    values = np.asarray(scores, dtype=np.float64)
    n = len(values)
    if n > k:
        part = np.argpartition(-values, k - 1)[:k]
        threshold = values[part].min()
        candidates = np.nonzero(values >= threshold)[0].tolist()
    else:
        candidates = list(range(n))
    listed = values.tolist()
    candidates.sort(key=lambda i: (-listed[i], ids[i]))
    return candidates[:k]


class TopK:
    """Running top-k per query over blocks of scored chunks, with each hit's batch."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.ids: list[list[str]] = [[] for _ in range(queries)]
        self.scores: list[list[float]] = [[] for _ in range(queries)]
        self.batches: list[list[str]] = [[] for _ in range(queries)]

    def add(
        self,
        scores: np.ndarray[Any, Any],
        chunk_ids: Sequence[str],
        batch_id: str,
        offset: int = 0,
    ) -> None:
        """Fold a [queries, chunks] score block of one batch's chunks into the lists of
        queries ``offset .. offset + len(scores)``."""
        for row, values in enumerate(scores):
            q = offset + row
            best = top_indices(values, chunk_ids, self.k)
            ids = self.ids[q] + [chunk_ids[i] for i in best]
            merged = self.scores[q] + [float(values[i]) for i in best]
            batches = self.batches[q] + [batch_id] * len(best)
            keep = top_indices(merged, ids, self.k)
            self.ids[q] = [ids[i] for i in keep]
            self.scores[q] = [merged[i] for i in keep]
            self.batches[q] = [batches[i] for i in keep]

    def hits(self) -> list[Hits]:
        return [
            Hits(chunk_ids=i, scores=s, batch_ids=b)
            for i, s, b in zip(self.ids, self.scores, self.batches, strict=True)
        ]


def merge_hits(lists: Iterable[Hits], k: int) -> Hits:
    """One query's partial top-k lists (one per group) into its global top-k."""
    ids: list[str] = []
    scores: list[float] = []
    batches: list[str] = []
    for hits in lists:
        ids += hits.chunk_ids
        scores += hits.scores
        batches += hits.batch_ids or [""] * len(hits.chunk_ids)
    keep = top_indices(scores, ids, k)
    return Hits(
        chunk_ids=[ids[i] for i in keep],
        scores=[scores[i] for i in keep],
        batch_ids=[batches[i] for i in keep],
    )


# --- dense ---------------------------------------------------------------------------


def dense_scores(
    queries: dict[str, np.ndarray[Any, Any]], shard: DenseShard, start: int, stop: int
) -> np.ndarray[Any, Any]:
    """Ensemble scores of queries ``start:stop`` against one shard: the mean over
    models of the dot products of normalised vectors."""
    total: np.ndarray[Any, Any] | None = None
    for model, matrix in queries.items():
        block = matrix[start:stop] @ shard.vectors[model].to_numpy().T
        total = block if total is None else total + block
    assert total is not None, "a dense ranking needs at least one model"
    return total / len(queries)


def dense_top_k(
    queries: dict[str, np.ndarray[Any, Any]], shards: Iterable[DenseShard], k: int
) -> list[Hits]:
    n = len(next(iter(queries.values())))
    top = TopK(n, k)
    for shard in shards:
        for start in range(0, n, QUERY_BLOCK):
            stop = min(n, start + QUERY_BLOCK)
            scores = dense_scores(queries, shard, start, stop)
            top.add(scores, shard.chunk_ids, shard.batch_id, start)
    return top.hits()


# --- sparse --------------------------------------------------------------------------


class SparseQueries:
    """One sparse model's query vectors as a CSR matrix over the queries' own
    vocabulary (a chunk token no query has cannot add to any score)."""

    def __init__(self, vectors: list[SparseVector]) -> None:
        self.vocab: dict[str, int] = {}
        indptr, indices, data = [0], [], []
        for vector in vectors:
            for token, weight in vector.items():
                indices.append(self.vocab.setdefault(token, len(self.vocab)))
                data.append(weight)
            indptr.append(len(indices))
        self.matrix = sp.csr_matrix(
            (np.array(data, dtype=np.float64), indices, indptr),
            shape=(len(vectors), max(1, len(self.vocab))),
        )

    def scores(self, chunks: list[SparseVector]) -> np.ndarray[Any, Any]:
        """[queries, chunks] dot products."""
        indptr, indices, data = [0], [], []
        for vector in chunks:
            for token, weight in vector.items():
                column = self.vocab.get(token)
                if column is not None:
                    indices.append(column)
                    data.append(weight)
            indptr.append(len(indices))
        docs = sp.csr_matrix(
            (np.array(data, dtype=np.float64), indices, indptr),
            shape=(len(chunks), self.matrix.shape[1]),
        )
        product: Any = self.matrix @ docs.T
        return np.asarray(product.toarray())


SparseChunks = tuple[str, list[str], dict[str, list[SparseVector]]]


def sparse_top_k(
    queries: dict[str, list[SparseVector]], shards: Iterable[SparseChunks], k: int
) -> dict[str, list[Hits]]:
    """Per sparse model, every query's top-k over ``(batch id, chunk ids, {model:
    vectors})``."""
    matrices = {model: SparseQueries(vectors) for model, vectors in queries.items()}
    tops = {model: TopK(len(vectors), k) for model, vectors in queries.items()}
    for batch_id, chunk_ids, vectors in shards:
        for model, matrix in matrices.items():
            tops[model].add(matrix.scores(vectors[model]), chunk_ids, batch_id)
    return {model: top.hits() for model, top in tops.items()}


def chunk_vector(model: str, row: SparseRow, bm25: BM25Statistics | None) -> SparseVector:
    """A chunk's sparse vector exactly as ``chunks.jsonl`` exports it."""
    if row.source == "missing":
        return {}
    if model == BM25 and bm25 is not None:
        return bm25.weights(row)
    return rounded(row)


def query_vector(row: SparseRow) -> SparseVector:
    """A query's sparse vector: SPLADE weights, or BM25 query term counts."""
    if row.source == "missing":
        return {}
    return dict(zip(row.tokens, row.weights, strict=True))


# --- one retrieve unit ------------------------------------------------------------------


def dense_queries(
    store: JobStore, batch_ids: list[str]
) -> tuple[list[str], dict[str, np.ndarray[Any, Any]]]:
    """The query ids and, per dense model, the query matrix, from the query shards."""
    ids: list[str] = []
    parts: dict[str, list[np.ndarray[Any, Any]]] = {}
    for batch_id in batch_ids:
        shard = store.dense(batch_id)
        ids += shard.chunk_ids
        for model, matrix in shard.vectors.items():
            parts.setdefault(model, []).append(matrix.to_numpy())
    return ids, {model: np.concatenate(blocks) for model, blocks in parts.items()}


def sparse_queries(
    store: JobStore, batch_ids: list[str]
) -> tuple[list[str], dict[str, list[SparseVector]]]:
    """The query ids and, per sparse model, the query vectors, from the query shards."""
    ids: list[str] = []
    vectors: dict[str, list[SparseVector]] = {}
    for batch_id in batch_ids:
        shard = store.sparse(batch_id)
        ids += shard.chunk_ids
        for model, rows in shard.rows.items():
            vectors.setdefault(model, []).extend(query_vector(row) for row in rows)
    return ids, vectors


def sparse_chunks(
    store: JobStore, batch_ids: list[str], bm25: BM25Statistics | None
) -> Iterable[SparseChunks]:
    """Each document shard's batch, chunk ids and exported sparse vectors, one shard at
    a time (served rows filled)."""
    shards = ServedShards(store)
    for batch_id in batch_ids:
        shard = shards.sparse(batch_id)
        vectors = {
            model: [chunk_vector(model, row, bm25) for row in rows]
            for model, rows in shard.rows.items()
        }
        yield batch_id, shard.chunk_ids, vectors


def retrieve(
    store: JobStore,
    spec: JobSpec,
    retriever: str,
    query_batches: list[str],
    batch_ids: list[str],
    k: int,
) -> tuple[list[str], dict[str, list[Hits]]]:
    """One retrieve unit's work: the query ids and, per ranking, their top-k lists over
    the documents of ``batch_ids``, searched with the ``retriever`` stage's vectors."""
    if retriever == "dense":
        query_ids, matrices = dense_queries(store, query_batches)
        if not query_ids:
            return [], {DENSE_RANKING: []}
        shards = ServedShards(store)
        hits = dense_top_k(matrices, (shards.dense(b) for b in batch_ids), k)
        return query_ids, {DENSE_RANKING: hits}
    query_ids, vectors = sparse_queries(store, query_batches)
    if not query_ids:
        return [], {model: [] for model in spec.sparse_models}
    chunks = sparse_chunks(store, batch_ids, collection_bm25(store))
    return query_ids, sparse_top_k(vectors, chunks, k)
