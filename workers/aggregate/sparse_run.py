"""The manifest's ``sparse_run``: per sparse model, where its vectors came from and how
many non-zeros they have, counted by each export part as it writes its chunks and
summed by ``finish``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import numpy as np

from shared.inputs.models import BM25
from shared.records.schemas import (
    BatchReport,
    LatencySummary,
    ModelInfo,
    SparseInferenceRun,
    SparseModelRun,
    SparseRow,
    SparseShard,
    SparseTally,
)
from workers.ranking.sparse_weights import WEIGHT_DECIMALS, BM25Statistics

K = TypeVar("K", str, int)


class SparseRunBuilder:
    """Counts, per model, where vectors came from and how many non-zeros they have.

    Each export part counts its own chunks into a :class:`SparseTally` (kept with the
    part); ``finish`` merges the parts' tallies and builds the manifest's ``sparse_run``.
    """

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.tally = SparseTally(
            sources={m: {} for m in models},
            nnz={m: {} for m in models},
            outside_vocabulary={m: 0 for m in models},
        )

    def add_shard(self, shard: SparseShard) -> None:
        self.tally.chunks += len(shard.chunk_ids)
        for error in shard.errors:
            _bump(self.tally.errors, error)

    def add_vector(self, model: str, row: SparseRow, exported: dict[str, float]) -> None:
        _bump(self.tally.sources[model], row.source)
        if row.source != "missing":
            _bump(self.tally.nnz[model], len(exported))

    def add_outside_vocabulary(self, model: str, weights: int) -> None:
        self.tally.outside_vocabulary[model] += weights

    def merge(self, part: SparseTally) -> None:
        """Add one part's tally."""
        self.tally.chunks += part.chunks
        for error, count in part.errors.items():
            _bump(self.tally.errors, error, count)
        for model in self.models:
            for source, count in part.sources.get(model, {}).items():
                _bump(self.tally.sources[model], source, count)
            for nnz, count in part.nnz.get(model, {}).items():
                _bump(self.tally.nnz[model], nnz, count)
            self.tally.outside_vocabulary[model] += part.outside_vocabulary.get(model, 0)

    def build(
        self,
        infos: Iterable[ModelInfo],
        reports: list[BatchReport],
        latency: LatencySummary,
        bm25: BM25Statistics | None,
    ) -> SparseInferenceRun:
        by_name = {info.name: info for info in infos if info.kind == "sparse"}
        runs = []
        errors = dict(self.tally.errors)
        for model in self.models:
            info = by_name.get(model) or _builtin_info(model, reports)
            sources = self.tally.sources[model]
            histogram = self.tally.nnz[model]
            runs.append(
                SparseModelRun(
                    model=info,
                    live=sources.get("live", 0),
                    metadata=sources.get("metadata", 0),
                    missing=sources.get("missing", 0),
                    nnz_mean=round(_mean(histogram), 2),
                    nnz_p95=round(_percentile(histogram, 95), 2),
                )
            )
            if self.tally.outside_vocabulary[model]:
                errors[
                    f"{model}: metadata.sparse terms outside the model's vocabulary, left "
                    "out of the Parquet sparse column (the metadata column keeps them)"
                ] = self.tally.outside_vocabulary[model]
        return SparseInferenceRun(
            models=runs,
            chunks=self.tally.chunks,
            latency=latency,
            errors=errors,
            weight_decimals=WEIGHT_DECIMALS,
            bm25=bm25.params if bm25 else None,
            bm25_avg_length=round(bm25.avg_length, 4) if bm25 else None,
            bm25_documents=bm25.documents if bm25 else None,
        )


def _bump(counter: dict[K, int], key: K, count: int = 1) -> None:
    counter[key] = counter.get(key, 0) + count


def _mean(histogram: dict[int, int]) -> float:
    total = sum(histogram.values())
    return sum(value * count for value, count in histogram.items()) / total if total else 0.0


def _percentile(histogram: dict[int, int], q: float) -> float:
    """``numpy.percentile`` (linear) of the values a histogram counts, without expanding
    it (a collection's worth of values would not fit)."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    position = q / 100 * (total - 1)
    below, fraction = int(np.floor(position)), position - np.floor(position)

    def value_at(index: int) -> int:
        seen = 0
        for value in sorted(histogram):
            seen += histogram[value]
            if index < seen:
                return value
        return max(histogram)

    low = value_at(below)
    high = value_at(min(below + 1, total - 1))
    return float(low + (high - low) * fraction)


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
