"""The weights a chunk's sparse vector is exported and searched with: SPLADE weights
rounded, and BM25 weights from the collection's statistics merged across batches.

The retrieve stage and the export both use these, so a chunk is searched with exactly
the vector ``chunks.jsonl`` holds."""

from __future__ import annotations

import math
from collections import Counter

from shared.inputs.models import BM25
from shared.records.job_store import JobStore
from shared.records.schemas import BM25Collection, BM25Params, JobSpec, SparseRow

# Exported sparse weights are rounded to this many decimals; zeros are dropped.
WEIGHT_DECIMALS = 6


class BM25Statistics:
    """Collection statistics merged from per-batch shards (nothing holds every chunk).

    Scores follow ``bm25s``'s Lucene variant: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    tf part = tf / (tf + k1 * (1 - b + b * len / avg_len)); a chunk's exported weight for
    a term is their product, so a query's BM25 score is the sum of its terms' weights.
    """

    def __init__(self, params: BM25Params) -> None:
        self.params = params
        self.documents = 0
        self.total_length = 0
        self.doc_freqs: Counter[str] = Counter()

    @classmethod
    def from_collection(cls, merged: BM25Collection) -> BM25Statistics:
        stats = cls(merged.params)
        stats.documents = merged.documents
        stats.total_length = merged.total_length
        stats.doc_freqs = Counter(merged.doc_freqs)
        return stats

    def collection(self) -> BM25Collection:
        return BM25Collection(
            params=self.params,
            documents=self.documents,
            total_length=self.total_length,
            doc_freqs=dict(self.doc_freqs),
        )

    def add(self, rows: list[SparseRow], doc_freqs: dict[str, int]) -> None:
        self.documents += len(rows)
        self.total_length += sum(row.length for row in rows)
        self.doc_freqs.update(doc_freqs)

    @property
    def avg_length(self) -> float:
        return self.total_length / self.documents if self.documents else 0.0

    def idf(self, term: str) -> float:
        df = self.doc_freqs.get(term, 0)
        return math.log(1 + (self.documents - df + 0.5) / (df + 0.5))

    def weights(self, row: SparseRow) -> dict[str, float]:
        k1, b = self.params.k1, self.params.b
        norm = k1 * (1 - b + b * row.length / self.avg_length) if self.avg_length else k1
        out: dict[str, float] = {}
        for term, tf in zip(row.tokens, row.weights, strict=True):
            weight = round(self.idf(term) * tf / (tf + norm), WEIGHT_DECIMALS)
            if weight:
                out[term] = weight
        return out


def rounded(row: SparseRow) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, weight in zip(row.tokens, row.weights, strict=True):
        value = round(weight, WEIGHT_DECIMALS)
        if value:
            out[token] = value
    return out


def merge_bm25(store: JobStore, params: BM25Params, batch_ids: list[str]) -> BM25Statistics:
    """The collection's BM25 statistics, merged from these batches' sparse shards."""
    stats = BM25Statistics(params)
    for batch_id in batch_ids:
        shard = store.sparse(batch_id)
        stats.add(shard.rows[BM25], shard.doc_freqs)
    return stats


def keep_merged_bm25(store: JobStore, spec: JobSpec, batch_ids: list[str]) -> BM25Statistics | None:
    """Merge the collection's BM25 statistics from these batches afresh (a resume may
    have encoded a batch again) and keep them for the retrieve units and the export."""
    if BM25 not in spec.sparse_models:
        return None
    merged = merge_bm25(store, spec.bm25 or BM25Params(), batch_ids)
    store.put_bm25(merged.collection())
    return merged


def collection_bm25(store: JobStore) -> BM25Statistics | None:
    """The merged statistics the plan step wrote, if it did."""
    merged = store.bm25()
    return BM25Statistics.from_collection(merged) if merged is not None else None
