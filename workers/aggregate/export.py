"""The export phase: the job's chunks written as parts, in parallel.

``plan_export`` (an aggregator step, after the last phase with units) cuts the encoded
document batches into groups of whole batches, each about ``--part-rows`` chunks or
``--part-bytes`` bytes, keeps the plan in ``work/export-plan.msgpack``, writes the
sparse models' vocabularies, and enqueues one ``export`` unit per part. Any number of
aggregate workers then write the parts at once (:func:`write_part`); ``finish`` follows
when every part is accounted for.

A part is a pure function of its batches: a redelivered or resumed part task writes
the same bytes to the same key.
"""

from __future__ import annotations

import itertools
import tempfile
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
from celery import Celery

from shared.control.celery_app import fan_out
from shared.control.ledger import JobLedger
from shared.inputs.models import BM25
from shared.records import ids
from shared.records.job_store import JobLayout, JobStore
from shared.records.schemas import (
    ChunkBatch,
    ExportedPart,
    ExportPart,
    ExportPlan,
    JobSpec,
    Vocabulary,
)
from shared.records.served_rows import ServedShards
from workers.aggregate.parts import Matrix32, PartWriter, SparseVectors
from workers.aggregate.sparse_run import SparseRunBuilder
from workers.ranking.sparse_weights import (
    BM25Statistics,
    collection_bm25,
    keep_merged_bm25,
    rounded,
)

# A staged batch with its rows' dense vectors by model and sparse vectors (if any).
BatchVectors = tuple[ChunkBatch, dict[str, Matrix32], SparseVectors | None]

# What a chunk's row costs besides its vectors (ids, text, metadata), for part sizing.
ROW_OVERHEAD_BYTES = 512
# A sparse vector's estimated bytes (index + value for about 100 non-zeros).
SPARSE_ROW_BYTES = 800


def part_rows(spec: JobSpec, dims: list[int]) -> int:
    """How many chunks a part takes: ``part_rows``, fewer where the rows' estimated
    size would pass ``part_bytes``."""
    row_bytes = 4 * sum(dims) + SPARSE_ROW_BYTES * len(spec.sparse_models) + ROW_OVERHEAD_BYTES
    return max(1, min(spec.export.part_rows, spec.export.part_bytes // row_bytes))


def plan_parts(
    spec: JobSpec, batch_ids: list[str], items: dict[str, int], rows: int
) -> list[ExportPart]:
    """Consecutive whole like-length windows per part (:func:`windows`; one batch each in a
    job that does not sort), each part up to ``rows`` chunks (a window larger than that is
    a part of its own)."""
    parts: list[ExportPart] = []
    current: list[str] = []
    filled = 0
    for window in windows(spec, batch_ids):
        size = sum(items.get(batch_id, 0) for batch_id in window)
        if current and filled + size > rows:
            parts.append(_part(spec, len(parts), current))
            current, filled = [], 0
        current += window
        filled += size
    if current:
        parts.append(_part(spec, len(parts), current))
    return parts


def windows(spec: JobSpec, batch_ids: list[str]) -> list[list[str]]:
    """Batch ids (in staging order) grouped by the like-length window they were staged in
    (``spec.sort_window`` batches of one stream; see ``shared.inputs.chunking``)."""

    def window(batch_id: str) -> tuple[str, int]:
        return ids.like_length_window(batch_id, spec.sort_window)

    return [list(group) for _, group in itertools.groupby(batch_ids, key=window)]


def _part(spec: JobSpec, number: int, batch_ids: list[str]) -> ExportPart:
    return ExportPart(
        job_id=spec.job_id, stage="export", unit=f"part-{number:05d}", batch_ids=batch_ids
    )


def vocabulary_json(vocabulary: Vocabulary) -> bytes:
    """A vocabulary artifact's bytes: a JSON list of terms, index = position."""
    return msgspec.json.encode(vocabulary.terms) + b"\n"


def plan_export(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """Plan the parts and fan the export phase out; returns how many parts."""
    spec = ledger.spec()
    batch_ids = ledger.usable_batches()
    bm25 = bm25_for_export(store, spec, batch_ids)
    for vocabulary in _vocabularies(store, spec, bm25):
        store.put_vocabulary(vocabulary)
        name = JobLayout.vocabulary_name(vocabulary.model)
        store.put_artifact(name, vocabulary_json(vocabulary))
    dims = [m.dim for m in ledger.models() if m.kind == "dense"]
    parts = plan_parts(spec, batch_ids, ledger.staged_items(), part_rows(spec, dims))
    store.put_export_plan(ExportPlan(parts=parts))
    return fan_out(app, ledger, spec, "export", parts)


def bm25_for_export(store: JobStore, spec: JobSpec, batch_ids: list[str]) -> BM25Statistics | None:
    """The statistics the retrieve phase's plan step just merged from the same batches;
    for a job without queries, merged now (afresh: a resume may have encoded a batch
    again) and kept for the parts."""
    if spec.retrieval is not None and BM25 in spec.sparse_models:
        return collection_bm25(store)
    return keep_merged_bm25(store, spec, batch_ids)


def _vocabularies(store: JobStore, spec: JobSpec, bm25: BM25Statistics | None) -> list[Vocabulary]:
    """Each sparse model's terms by index: a model's tokenizer vocabulary (kept by its
    workers), BM25's the collection's terms in sorted order. A model that never loaded
    has none (its chunks' own ``metadata.sparse`` terms then stay in the metadata)."""
    out = []
    for model in spec.sparse_models:
        if model == BM25:
            terms = sorted(bm25.doc_freqs) if bm25 is not None else []
            out.append(Vocabulary(model=model, terms=terms))
        else:
            out.append(store.vocabulary(model) or Vocabulary(model=model, terms=[]))
    return out


# --- one part ----------------------------------------------------------------------------


def write_part(ledger: JobLedger, store: JobStore, message: ExportPart) -> ExportedPart:
    """Write one part from its batches, upload it, and keep its record in ``work/``
    (the record's presence is what says the part is done)."""
    spec = ledger.spec()
    sparse_models = spec.sparse_models if "sparse" in spec.stages else []
    bm25 = collection_bm25(store) if BM25 in sparse_models else None
    run = SparseRunBuilder(sparse_models) if sparse_models else None
    indices: dict[str, dict[str, int]] = {}
    if spec.export.format == "parquet":
        for model in sparse_models:
            vocabulary = store.vocabulary(model)
            terms = vocabulary.terms if vocabulary is not None else []
            indices[model] = {term: i for i, term in enumerate(terms)}
    name = JobLayout.part_name(message.unit, spec.export.format)
    reused: Counter[str] = Counter()
    encoded: Counter[str] = Counter()
    # Rows served another chunk's vectors are filled as their shards are read.
    shards = ServedShards(store)
    with tempfile.TemporaryDirectory(prefix="embed-fleet-part-") as tmp:
        writer: PartWriter | None = None
        try:
            for window in windows(spec, message.batch_ids):
                read: list[BatchVectors] = []
                for batch_id in window:
                    batch = store.batch(batch_id)
                    matrices = _dense(shards, batch, reused, encoded)
                    sparse = (
                        _sparse(shards, batch, bm25, run, reused, encoded)
                        if run is not None
                        else None
                    )
                    read.append((batch, matrices, sparse))
                for batch, matrices, sparse in in_reading_order(read):
                    if writer is None:
                        dense = {model: matrix.shape[1] for model, matrix in matrices.items()}
                        path = Path(tmp) / f"part.{spec.export.format}"
                        writer = PartWriter(path, spec.export.format, dense, indices)
                    writer.add(batch, matrices, sparse)
            assert writer is not None, "a part has at least one batch"
            artifact = writer.close(store.layout.artifact(name))
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        store.upload_artifact(name, writer.path)
    if run is not None:
        for model, count in writer.outside_vocabulary.items():
            run.add_outside_vocabulary(model, count)
    exported = ExportedPart(
        part=message.unit,
        artifact=artifact,
        batch_ids=message.batch_ids,
        sparse=run.tally if run is not None else None,
        reused=dict(reused),
        encoded=dict(encoded),
    )
    store.put_exported_part(exported)
    return exported


def in_reading_order(
    window: list[BatchVectors],
) -> list[BatchVectors]:
    """A like-length window's batches with their vectors, as the part writes them: as they
    are when their chunks are in reading order (``reading`` empty), else as one batch of
    all their chunks put back in reading order, each vector with its chunk."""
    if all(not batch.reading for batch, _, _ in window):
        return window
    order = np.argsort([row for batch, _, _ in window for row in batch.reading], kind="stable")
    chunks = [chunk for batch, _, _ in window for chunk in batch.chunks]
    merged = msgspec.structs.replace(
        window[0][0], chunks=[chunks[i] for i in order], tokens=None, served=[], reading=[]
    )
    matrices = {
        model: np.concatenate([vectors[model] for _, vectors, _ in window])[order]
        for model in window[0][1]
    }
    sparse: SparseVectors | None = None
    if window[0][2] is not None:
        models = dict.fromkeys(model for _, _, vectors in window for model in vectors or {})
        sparse = {}
        for model in models:
            column = [
                row
                for batch, _, vectors in window
                for row in (vectors or {}).get(model) or [None] * len(batch.chunks)
            ]
            sparse[model] = [column[i] for i in order]
    return [(merged, matrices, sparse)]


def _dense(
    shards: ServedShards, batch: ChunkBatch, reused: Counter[str], encoded: Counter[str]
) -> dict[str, Matrix32]:
    """The batch's dense vectors by model (counting the rows taken from an earlier job,
    and the texts encoded)."""
    shard = shards.dense(batch.batch_id)
    if shard.chunk_ids != [c.chunk_id for c in batch.chunks]:
        raise RuntimeError(f"dense shard {batch.batch_id} does not match its chunk batch")
    reused.update(shard.reused)
    encoded.update(shard.encoded)
    return {name: matrix.to_numpy() for name, matrix in shard.vectors.items()}


def _sparse(
    shards: ServedShards,
    batch: ChunkBatch,
    bm25: BM25Statistics | None,
    run: SparseRunBuilder,
    reused: Counter[str],
    encoded: Counter[str],
) -> SparseVectors:
    """Each sparse model's exported vector per chunk: SPLADE weights rounded, BM25
    weights from the collection's statistics (what the retrieve phase searched)."""
    shard = shards.sparse(batch.batch_id)
    if shard.chunk_ids != [c.chunk_id for c in batch.chunks]:
        raise RuntimeError(f"sparse shard {batch.batch_id} does not match its chunk batch")
    run.add_shard(shard)
    reused.update(shard.reused)
    encoded.update(shard.encoded)
    vectors: SparseVectors = {}
    for model, rows in shard.rows.items():
        column: list[dict[str, float] | None] = []
        for row in rows:
            exported = bm25.weights(row) if model == BM25 and bm25 else rounded(row)
            run.add_vector(model, row, exported)
            column.append(exported if row.source != "missing" else None)
        vectors[model] = column
    return vectors
