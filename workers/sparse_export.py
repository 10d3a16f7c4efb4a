"""The aggregator's side of the sparse stage: BM25 statistics merged across batches,
final sparse weights for ``chunks.jsonl``, and the manifest's ``sparse_run``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from shared.schemas import (
    BatchReport,
    BM25Collection,
    BM25Params,
    LatencySummary,
    ModelInfo,
    SparseInferenceRun,
    SparseModelRun,
    SparseRow,
    SparseShard,
)

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


class SparseRunBuilder:
    """Counts, per model, where vectors came from and how many non-zeros they have."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.sources: dict[str, Counter[str]] = {m: Counter() for m in models}
        self.nnz: dict[str, list[int]] = {m: [] for m in models}
        self.errors: Counter[str] = Counter()
        self.chunks = 0

    def add_shard(self, shard: SparseShard) -> None:
        self.chunks += len(shard.chunk_ids)
        self.errors.update(shard.errors)

    def add_vector(self, model: str, row: SparseRow, exported: dict[str, float]) -> None:
        self.sources[model][row.source] += 1
        if row.source != "missing":
            self.nnz[model].append(len(exported))

    def build(
        self,
        infos: Iterable[ModelInfo],
        reports: list[BatchReport],
        latency: LatencySummary,
        bm25: BM25Statistics | None,
    ) -> SparseInferenceRun:
        by_name = {info.name: info for info in infos if info.kind == "sparse"}
        runs = []
        for model in self.models:
            info = by_name.get(model) or _builtin_info(model, reports)
            nnz = np.array(self.nnz[model] or [0])
            runs.append(
                SparseModelRun(
                    model=info,
                    live=self.sources[model]["live"],
                    metadata=self.sources[model]["metadata"],
                    missing=self.sources[model]["missing"],
                    nnz_mean=round(float(nnz.mean()), 2),
                    nnz_p95=round(float(np.percentile(nnz, 95)), 2),
                )
            )
        return SparseInferenceRun(
            models=runs,
            chunks=self.chunks,
            latency=latency,
            errors=dict(self.errors),
            weight_decimals=WEIGHT_DECIMALS,
            bm25=bm25.params if bm25 else None,
            bm25_avg_length=round(bm25.avg_length, 4) if bm25 else None,
            bm25_documents=bm25.documents if bm25 else None,
        )


def _builtin_info(model: str, reports: list[BatchReport]) -> ModelInfo:
    """BM25 has no weights; a SPLADE model that never loaded is named as such."""
    device = reports[0].device if reports else "cpu"
    if model == "bm25":
        return ModelInfo(
            name="bm25",
            source="builtin",
            revision="bm25s-tokenizer+english-stemmer",
            dim=0,
            dtype="float64",
            device=device,
            max_seq_length=0,
            kind="sparse",
        )
    return ModelInfo(
        name=model,
        source="unavailable",
        revision="",
        dim=0,
        dtype="",
        device=device,
        max_seq_length=0,
        kind="sparse",
    )
