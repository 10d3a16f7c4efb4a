"""An earlier job's vectors for some of a unit's chunks (``run --reuse``), as an encode
worker takes them.

The chunk stage copied them beside the unit's batches (``workers.prepare.reuse``). A
worker takes a model's earlier vectors only where its own loaded model has the same
model key (:mod:`shared.records.content_keys`: name, weights, tokenizer and the dtype it
actually runs); otherwise it encodes every chunk, as a job without reuse does. So a
fleet whose workers picked another dtype than the earlier job's never mixes vectors
of two kinds in a column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.records.job_store import JobStore
from shared.records.schemas import ChunkBatch, EarlierVectors, ModelInfo, SparseRow


@dataclass(frozen=True)
class Taken:
    """One model's earlier vectors for a unit: the positions (in the unit's chunk order)
    and, in that order, the dense rows or the sparse rows."""

    positions: list[int]
    dense: np.ndarray[Any, np.dtype[np.float32]] | None = None
    sparse: list[SparseRow] | None = None


class Earlier:
    """The earlier vectors of a unit's batches, each at its offset in the unit."""

    def __init__(self, shelves: list[tuple[int, EarlierVectors]]) -> None:
        self.shelves = shelves

    @classmethod
    def read(cls, store: JobStore, batches: Sequence[ChunkBatch]) -> Earlier | None:
        """What the chunk stage staged for these batches (``None``: nothing)."""
        shelves: list[tuple[int, EarlierVectors]] = []
        offset = 0
        for batch in batches:
            if batch.earlier:
                shelves.append((offset, store.earlier_vectors(batch.batch_id)))
            offset += len(batch.chunks)
        return cls(shelves) if shelves else None

    def take(self, model: ModelInfo) -> Taken | None:
        """The model's earlier vectors, if the earlier job made them with a model of the
        same key (else ``None``: encode them all)."""
        name = model.name
        usable = all(
            shelf.model_keys.get(name) == model.key
            and (name in shelf.dense if model.kind == "dense" else name in shelf.sparse)
            for _, shelf in self.shelves
        )
        if not model.key or not usable:
            return None
        positions = [offset + row for offset, shelf in self.shelves for row in shelf.rows]
        if model.kind == "dense":
            blocks = [shelf.dense[name].to_numpy() for _, shelf in self.shelves]
            return Taken(positions, dense=np.concatenate(blocks))
        rows = [row for _, shelf in self.shelves for row in shelf.sparse[name]]
        return Taken(positions, sparse=rows)


def per_batch(
    positions: Mapping[str, Sequence[int]], batches: Sequence[ChunkBatch]
) -> list[dict[str, int]]:
    """Per batch: model -> how many of its positions (in the unit's chunk order) fall in
    the batch (the rows a model took from the earlier job, or encoded itself)."""
    bounds = np.cumsum([0] + [len(b.chunks) for b in batches])
    out: list[dict[str, int]] = [{} for _ in batches]
    for name, rows in positions.items():
        counts: list[int] = np.histogram(rows, bins=bounds)[0].tolist()
        for index, count in enumerate(counts):
            if count:
                out[index][name] = int(count)
    return out
