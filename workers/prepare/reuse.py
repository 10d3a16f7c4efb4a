"""Reusing an earlier job's vectors (``run --reuse JOB``), on the prepare phases.

A chunk may take the earlier job's vector only where its document is the same and its
text key is the same (:mod:`shared.records.content_keys`); whether the model is the same
is the encode worker's call, by model key (``workers.inference.earlier``). The matching
rides on the phases the fleet already has, so no process ever holds every key:

1. **validate**: each range's unit also indexes its share of the earlier job's parts
   (part *j* goes to range *j mod ranges*): each chunk's document id, text key, part
   and row, split by the same id partitions as this job's ids
   (``work/reuse/index/<partition>/<part>``). A part is read whole and checked against
   the earlier manifest's sha256; one that does not verify refuses all reuse.
2. **dedupe**: each partition's unit, which already holds this job's ids of its
   partition, joins them with the earlier chunks of the same partition: for each range,
   the documents both jobs have and their earlier chunks (``work/reuse/found``); and
   the earlier documents this job no longer has (``work/reuse/match``).
3. **chunk**: a range's unit reads what its partitions found, and as it stages each
   batch it copies the earlier job's vectors of the batch's matching chunks from the
   earlier parts, bit for bit, beside the batch (``work/reuse/vectors/<batch>``), before
   the batch's encode unit is sent. It also counts the range's documents unchanged
   (the same chunks in the same order), changed and added.

Matching is by document id, then text: a passage that moved to another document is
encoded again, and the earlier job's parts are read once per range that needs them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from shared.inputs.models import BM25
from shared.records import ids
from shared.records.earlier_jobs import earlier_job, refusal
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.part_columns import dense_matrix
from shared.records.schemas import (
    Chunk,
    EarlierChunk,
    EarlierDocuments,
    EarlierIndex,
    EarlierTally,
    EarlierVectors,
    JobSpec,
    Matrix,
    ReadPlan,
    ReuseMatch,
    SparseRow,
)

if TYPE_CHECKING:
    import pyarrow as pa


def partitions_of(plan: ReadPlan, spec: JobSpec) -> int:
    """The id partitions a job's duplicate check writes: a reusing job always has at
    least one (its match runs there), other jobs none for a single range."""
    return plan.partitions if plan.partitions > 1 or spec.reuse else 0


class EarlierJob:
    """An earlier job's output, as a reusing job reads it: its manifest, and its parts
    each checked against the manifest's sha256 as it is read."""

    def __init__(self, spec: JobSpec, transient_window_s: float = 0.0) -> None:
        output = JobStore.of(spec).store
        try:
            self.job = earlier_job(spec.reuse, output, transient_window_s)
            self.manifest = self.job.manifest()
            self.refused = refusal(self.manifest)
        # Whatever keeps the earlier job from being read (gone, an S3 error past the
        # transient window, a manifest that does not decode) refuses reuse, never the job.
        except Exception as exc:
            self.refused = f"earlier job unreadable: {exc}"[:300]
            return
        layout = self.manifest.chunks
        assert layout is not None or self.refused
        self.parts = layout.parts if layout else []
        self._sha256 = {a.key: a.sha256 for a in self.manifest.artifacts}
        self._cached: tuple[int, pa.Table] | None = None

    def table(self, number: int, columns: list[str]) -> pa.Table:
        """Some columns of one earlier part. The last part read is kept (an instance
        reads one set of columns): consecutive batches of a range mostly find their
        chunks in the same earlier part, so it is fetched and decoded once.

        Raises:
            EmbedFleetError: the part is not what the manifest says it is.
        """
        if self._cached is not None and self._cached[0] == number:
            return self._cached[1]
        import pyarrow.parquet as pq

        key = self.parts[number]
        self._cached = None  # the previous part goes before the next one comes
        raw = self.job.store.get_bytes(key)
        if hashlib.sha256(raw).hexdigest() != self._sha256.get(key):
            raise EmbedFleetError(
                f"earlier part {key} does not match its manifest's sha256",
                "The earlier job's output was changed or is being deleted; its vectors "
                "are not reused",
            )
        table = pq.read_table(io.BytesIO(raw), columns=columns)
        self._cached = (number, table)
        return table


# --- validate: index the earlier parts ----------------------------------------------


def index_earlier_parts(
    spec: JobSpec,
    store: JobStore,
    range_index: int,
    ranges: int,
    partitions: int,
    transient_window_s: float = 0.0,
) -> int:
    """Index this range's share of the earlier job's parts by id partition; returns the
    parts indexed. A part that cannot be read or verified writes its refusal instead
    (the job then reuses nothing, and says why)."""
    earlier = EarlierJob(spec, transient_window_s)
    mine = range(range_index, len(earlier.parts), ranges) if not earlier.refused else []
    if earlier.refused and range_index == 0:
        for partition in range(partitions):
            store.put_earlier_index(
                ids.partition_id(partition),
                0,
                EarlierIndex(doc_ids=[], chunks=[], refused=earlier.refused),
            )
    for number in mine:
        buckets = [EarlierIndex(doc_ids=[], chunks=[]) for _ in range(partitions)]
        try:
            table = earlier.table(number, ["doc_id", "text_key"])
        except Exception as exc:  # unreadable or not as its manifest says: refuse reuse
            reason = f"earlier part {earlier.parts[number]}: {exc}"[:300]
            buckets = [EarlierIndex(doc_ids=[], chunks=[], refused=reason) for _ in buckets]
        else:
            doc_ids = table.column("doc_id").to_pylist()
            keys = table.column("text_key").to_pylist()
            for row, (doc_id, key) in enumerate(zip(doc_ids, keys, strict=True)):
                bucket = buckets[ids.id_partition(doc_id, partitions)]
                bucket.doc_ids.append(doc_id)
                bucket.chunks.append(EarlierChunk(key, number, row))
        for partition, bucket in enumerate(buckets):
            store.put_earlier_index(ids.partition_id(partition), number, bucket)
    return len(mine)


# --- dedupe: join this job's documents with the earlier ones --------------------------


def match_partition(
    spec: JobSpec,
    store: JobStore,
    partition_id: str,
    ranges: int,
    first: dict[str, tuple[int, int]],
    transient_window_s: float = 0.0,
) -> ReuseMatch:
    """Join one partition's documents (``first``: id -> its kept range and line) with
    the earlier job's chunks of the same partition; writes what each range found."""
    earlier = EarlierJob(spec, transient_window_s)
    found: list[dict[str, list[EarlierChunk]]] = [{} for _ in range(ranges)]
    earlier_docs: set[str] = set()
    refused = earlier.refused
    for number in range(len(earlier.parts) if not refused else 1):
        index = store.earlier_index(partition_id, number)
        if index is None:
            refused = refused or f"the earlier job's part {number} was not indexed"
            continue
        refused = refused or index.refused
        for doc_id, chunk in zip(index.doc_ids, index.chunks, strict=True):
            earlier_docs.add(doc_id)
            kept = first.get(doc_id)
            if kept is not None:
                found[kept[0]].setdefault(doc_id, []).append(chunk)
    for range_index, documents in enumerate(found):
        if refused:
            documents = {}
        store.put_earlier_documents(
            ids.range_id(range_index),
            partition_id,
            EarlierDocuments(doc_ids=list(documents), chunks=list(documents.values())),
        )
    removed = sum(1 for doc_id in earlier_docs if doc_id not in first)
    match = ReuseMatch(
        earlier_documents=len(earlier_docs), removed_documents=removed, refused=refused
    )
    store.put_reuse_match(partition_id, match)
    return match


# --- chunk: find each chunk's earlier vectors ------------------------------------------


class EarlierLookup:
    """What a range's chunk unit knows of the earlier job: its documents of the range
    and their chunks by text key, the vectors it copies, and the documents' tally."""

    def __init__(
        self,
        spec: JobSpec,
        store: JobStore,
        range_id: str,
        partitions: int,
        transient_window_s: float = 0.0,
    ) -> None:
        self.spec = spec
        self.transient_window_s = transient_window_s
        self.store = store
        self.documents: dict[str, list[EarlierChunk]] = {}
        for partition in range(partitions):
            found = store.earlier_documents(range_id, ids.partition_id(partition))
            self.documents.update(zip(found.doc_ids, found.chunks, strict=True))
        self._by_key = {
            doc_id: {chunk.text_key: chunk for chunk in reversed(chunks)}
            for doc_id, chunks in self.documents.items()
        }
        self._earlier: EarlierJob | None = None
        self._columns: _Columns | None = None
        # Each document's chunks' text keys by chunk index: a batch of a like-length
        # window holds a document's chunks out of order.
        self._seen: dict[str, dict[int, str]] = {}
        self.found = 0
        # The first reason a batch's earlier vectors could not be copied, and how many
        # chunks were encoded for it.
        self.lost = ""
        self.chunks_lost = 0

    def stage(self, batch_id: str, chunks: Sequence[Chunk], keys: Sequence[str]) -> list[int]:
        """Copy the earlier vectors of a batch's matching chunks beside it; returns the
        rows of the chunks that have them (none: nothing written)."""
        rows: list[int] = []
        where: list[EarlierChunk] = []
        for row, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
            self._seen.setdefault(chunk.doc_id, {})[chunk.index] = key
            hit = self._by_key.get(chunk.doc_id, {}).get(key)
            if hit is not None:
                rows.append(row)
                where.append(hit)
        if not rows:
            return []
        self.found += len(rows)
        try:
            vectors = self._copy(rows, where)
        except Exception as exc:
            # The earlier job went (or changed) under this job: these chunks are
            # encoded, as any new chunk is; nothing earlier is mixed in.
            self.lost = self.lost or f"{type(exc).__name__}: {exc}"[:300]
            self.chunks_lost += len(rows)
            return []
        self.store.put_earlier_vectors(batch_id, vectors)
        return rows

    def tally(self) -> EarlierTally:
        """This range's documents and chunks against the earlier job."""
        unchanged = changed = added = 0
        for doc_id, seen in self._seen.items():
            before = self.documents.get(doc_id)
            if before is None:
                added += 1
            elif [c.text_key for c in before] == [seen[index] for index in sorted(seen)]:
                unchanged += 1
            else:
                changed += 1
        return EarlierTally(unchanged, changed, added, self.found, self.chunks_lost, self.lost)

    def _copy(self, rows: list[int], where: list[EarlierChunk]) -> EarlierVectors:
        if self._earlier is None:
            self._earlier = EarlierJob(self.spec, self.transient_window_s)
        earlier = self._earlier
        if earlier.refused:
            raise EmbedFleetError(earlier.refused)
        if self._columns is None:
            self._columns = _Columns.of(self.spec, earlier)
        wanted_dense, wanted_sparse = self._columns.dense, self._columns.sparse
        vocabularies = self._columns.vocabularies
        dense: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
        sparse: dict[str, list[SparseRow | None]] = {
            m: [None] * len(rows) for m in wanted_sparse.values()
        }
        by_part: dict[int, list[int]] = {}
        for position, chunk in enumerate(where):
            by_part.setdefault(chunk.part, []).append(position)
        for part, positions in sorted(by_part.items()):
            table = earlier.table(part, [*wanted_dense, *wanted_sparse])
            take = [where[p].row for p in positions]
            for column, model in wanted_dense.items():
                block = dense_matrix(table.column(column).take(take).combine_chunks())
                if model not in dense:
                    dense[model] = np.zeros((len(rows), block.shape[1]), dtype=np.float32)
                dense[model][positions] = block
            for column, model in wanted_sparse.items():
                terms = vocabularies[model]
                for position, cell in zip(
                    positions, table.column(column).take(take).to_pylist(), strict=True
                ):
                    sparse[model][position] = (
                        SparseRow(tokens=[], weights=[], source="missing")
                        if cell is None
                        else SparseRow(
                            tokens=[terms[i] for i in cell["indices"]],
                            weights=[float(w) for w in cell["values"]],
                        )
                    )
        return EarlierVectors(
            rows=rows,
            model_keys=self._columns.model_keys,
            dense={m: Matrix.from_numpy(v) for m, v in dense.items()},
            sparse={m: [r for r in v if r is not None] for m, v in sparse.items()},
        )


@dataclass(frozen=True)
class _Columns:
    """What a range copies from the earlier parts, worked out once: the vector columns
    of this job's models (column -> model; BM25 never), the sparse models' earlier
    vocabularies (what their indices mean) and the models' keys."""

    dense: dict[str, str]
    sparse: dict[str, str]
    vocabularies: dict[str, list[str]]
    model_keys: dict[str, str]

    @classmethod
    def of(cls, spec: JobSpec, earlier: EarlierJob) -> _Columns:
        layout = earlier.manifest.chunks
        assert layout is not None
        dense = {c: m for c, m in layout.dense_columns.items() if m in spec.dense_models}
        models = spec.sparse_models if "sparse" in spec.stages else []
        sparse = {c: m for c, m in layout.sparse_columns.items() if m in models and m != BM25}
        vocabularies = {
            model: msgspec.json.decode(
                earlier.job.store.get_bytes(layout.vocabularies[model]), type=list[str]
            )
            for model in sparse.values()
        }
        return cls(dense, sparse, vocabularies, dict(layout.model_keys))
