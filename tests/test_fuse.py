"""Fusion in parallel (``workers.aggregate.fuse``), against a real Redis ledger and a real
folder store: fuse units split the queries, read only the batches their candidates are
in, and together write exactly what one unit over every query writes."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
from test_ledger import spec, unit

from shared.control.ledger import JobLedger
from shared.records.job_store import JobStore
from shared.records.schemas import (
    Chunk,
    ChunkBatch,
    FusedGroup,
    Hits,
    JobSpec,
    RetrievalSpec,
)
from shared.records.storage import LocalStore
from workers.aggregate.fuse import fuse_unit, fuse_units, lists_by_fuse_unit, rerank_units
from workers.ranking.retrieval import TopK

QUERIES = 40  # groups of 16: 16, 16, 8
BATCHES = 12
CHUNKS_PER_BATCH = 10
TOP_K = 5
RERANK_TOP = 3


class CountingStore(JobStore):
    """A job store that notes which staged batches were read."""

    read: list[str]

    def batch(self, batch_id: str) -> ChunkBatch:
        self.read.append(batch_id)
        return super().batch(batch_id)


def _spec(job_id: str, groups_per_unit: int) -> JobSpec:
    retrieval = RetrievalSpec(
        queries_source="/q",
        queries=QUERIES,
        query_batches=1,
        qrels_source=None,
        top_k=TOP_K,
        rerank_model="r",
        rerank_top=RERANK_TOP,
        rerank_groups_per_fuse_task=groups_per_unit,
        weights={"dense": 0.5, "bm25": 0.5},
    )
    return msgspec.structs.replace(spec(job_id), retrieval=retrieval, sparse_models=["bm25"])


def _chunks(batch_id: str, prefix: str, n: int) -> ChunkBatch:
    chunks = [
        Chunk(chunk_id=f"{prefix}{i}#0", doc_id=f"{prefix}{i}", index=0,
              text=f"text of {prefix}{i}", n_tokens=3, span=(0, 3))
        for i in range(n)
    ]  # fmt: skip
    return ChunkBatch(job_id="", batch_id=batch_id, chunks=chunks)


def _job(root: Path, redis_client: object, job_id: str, groups_per_unit: int) -> CountingStore:
    """A job whose retrieve phase is done: per retriever (dense, bm25), two retrieve
    units of half the batches each, with seeded random scores."""
    job = _spec(job_id, groups_per_unit)
    store = CountingStore(LocalStore(root), "c", job_id)
    store.read = []
    ledger = JobLedger(redis_client, job_id)  # type: ignore[arg-type]
    ledger.open(job, documents_total=BATCHES * CHUNKS_PER_BATCH, bytes_total=1)
    batches = [f"b{n:06d}" for n in range(BATCHES)]
    for n, batch_id in enumerate(batches):
        store.put_batch(_chunks(batch_id, f"d{n}-", CHUNKS_PER_BATCH))
        ledger.record_staged(batch_id, CHUNKS_PER_BATCH, 1, 10)
    store.put_batch(_chunks("q000000", "query", QUERIES))
    ledger.record_staged_queries("q000000", QUERIES)
    queries = store.queries(["q000000"])
    query_ids = [q.id for q in queries]
    rng = random.Random(7)
    # Two retrieve units per retriever, each over half of the batches.
    for retriever, ranking in (("dense", "dense"), ("sparse", "bm25")):
        for half, group in enumerate((batches[: BATCHES // 2], batches[BATCHES // 2 :])):
            top = TopK(QUERIES, TOP_K)
            for batch_id in group:
                ids = [c.chunk_id for c in store.batch(batch_id).chunks]
                # Every third batch scores higher: the candidates are in a few batches.
                scale = 1.0 if int(batch_id[1:]) % 3 == 0 else 0.5
                scores = np.array([[scale * rng.random() for _ in ids] for _ in range(QUERIES)])
                top.add(scores, ids, batch_id)
            group_id = f"{retriever}-g{half:05d}"
            hits: dict[str, list[Hits]] = {ranking: top.hits()}
            for part in lists_by_fuse_unit(job, queries, group_id, query_ids, hits):
                store.put_top_k(part)
            ledger.record_done(unit("retrieve", group_id, "queries"))
    store.read = []
    return store


def test_fuse_units_write_what_one_unit_writes_and_read_only_their_batches(
    tmp_path: Path, redis_client
) -> None:
    serial = _job(tmp_path / "serial", redis_client, "job-serial", groups_per_unit=64)
    parallel = _job(tmp_path / "parallel", redis_client, "job-parallel", groups_per_unit=1)
    serial_ledger = JobLedger(redis_client, "job-serial")
    parallel_ledger = JobLedger(redis_client, "job-parallel")
    queries = serial.queries(["q000000"])
    assert [u for u, _ in fuse_units(serial_ledger.spec(), queries)] == ["f-g00000"]
    units = fuse_units(parallel_ledger.spec(), queries)
    assert [u for u, _ in units] == ["f-g00000", "f-g00001", "f-g00002"]

    assert fuse_unit(serial_ledger, serial, "f-g00000") == QUERIES
    fused_by: dict[str, int] = {}
    for fuse_id, groups in units:
        parallel.read = []
        fused_by[fuse_id] = fuse_unit(parallel_ledger, parallel, fuse_id)
        # Only the batches holding the candidates it reranks were read, each once.
        wanted = {"q000000"}  # and the queries' own batch
        for group_id, _ in groups:
            group = parallel._get(parallel.layout.fused(group_id), FusedGroup)
            for query in group.queries:
                for candidate in query.candidates[:RERANK_TOP]:
                    wanted.add(f"b{int(candidate.doc_id[1:].split('-')[0]):06d}")
        assert sorted(parallel.read) == sorted(wanted)
        assert len(wanted) - 1 < BATCHES
    assert fused_by == {"f-g00000": 16, "f-g00001": 16, "f-g00002": 8}

    # Group by group, the parallel units wrote exactly what the one unit wrote.
    for group_id in ("q-g00000", "q-g00001", "q-g00002"):
        one = serial._get(serial.layout.fused(group_id), FusedGroup)
        many = parallel._get(parallel.layout.fused(group_id), FusedGroup)
        assert msgspec.structs.replace(many, job_id="") == msgspec.structs.replace(one, job_id="")
        assert len(one.texts) >= RERANK_TOP
        for query in one.queries:
            assert len(query.candidates) == TOP_K
            for candidate in query.candidates[:RERANK_TOP]:
                assert one.texts[candidate.chunk_id] == f"text of {candidate.doc_id}"
    rerank = rerank_units(parallel_ledger, parallel, parallel_ledger.spec())
    assert [u.unit for u in rerank] == ["q-g00000", "q-g00001", "q-g00002"]


@pytest.mark.parametrize("groups_per_unit", [1, 2, 64])
def test_every_query_is_in_exactly_one_fuse_unit(groups_per_unit: int) -> None:
    from shared.records.job_store import QueryText

    job = _spec("j", groups_per_unit)
    queries = [QueryText(f"q{i}", "t") for i in range(QUERIES)]
    units = fuse_units(job, queries)
    seen = [q.id for _, groups in units for _, members in groups for q in members]
    assert seen == [q.id for q in queries]
    assert all(len(groups) <= groups_per_unit for _, groups in units)
