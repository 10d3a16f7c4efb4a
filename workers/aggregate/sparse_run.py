"""The manifest's ``sparse_run``: per sparse model, where its vectors came from and how
many non-zeros they have, summed by the export as it writes the chunks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from shared.models import BM25
from shared.schemas import (
    BatchReport,
    LatencySummary,
    ModelInfo,
    SparseInferenceRun,
    SparseModelRun,
    SparseRow,
    SparseShard,
)
from workers.ranking.sparse_weights import WEIGHT_DECIMALS, BM25Statistics


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
    bm25 = model == BM25
    return ModelInfo(
        name=model,
        source="builtin" if bm25 else "unavailable",
        revision="bm25s-tokenizer+english-stemmer" if bm25 else "",
        dim=0,
        dtype="float64" if bm25 else "",
        device=reports[0].device if reports else "cpu",
        max_seq_length=0,
        kind="sparse",
    )
