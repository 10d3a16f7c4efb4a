"""Rebuilding a job's ledger from its object store (``producer.recovery``), against a
real Redis and a real folder store."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from test_ledger import spec

from producer.recovery import find_job, rebuild_ledger
from shared.control.ledger import JobLedger
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.schemas import (
    Chunk,
    ChunkBatch,
    JobRecord,
    JobSpec,
    LatencySummary,
    ModelInfo,
    ProducerReport,
    RetrievalSpec,
)
from shared.records.storage import LocalStore


def _spec(job_id: str) -> JobSpec:
    """The ledger tests' spec, with queries and a collection name that needs sanitising."""
    retrieval = RetrievalSpec(queries_source="/q", queries=5, query_batches=2, qrels_source=None)
    return msgspec.structs.replace(
        spec(job_id), collection="my docs", chunk_tokens=64, retrieval=retrieval
    )


def _batch(job_id: str, batch_id: str, items: int) -> ChunkBatch:
    chunks = [
        Chunk(chunk_id=f"{batch_id}-{i}#0", doc_id=f"{batch_id}-{i}", index=0, text="t",
              n_tokens=1, span=(0, 1))
        for i in range(items)
    ]  # fmt: skip
    return ChunkBatch(job_id=job_id, batch_id=batch_id, chunks=chunks)


def _report(chunks: int, batches: int) -> ProducerReport:
    return ProducerReport(
        documents=chunks, chunks=chunks, batches=batches, tokens=chunks, empty_documents=[],
        skipped_records=[], skipped_count=0, started_at=0, finished_at=1,
        latency=LatencySummary.from_samples([], 0, 0), queries=5, query_batches=2,
    )  # fmt: skip


def _staged_job(root: Path, job_id: str, sealed: bool) -> JobStore:
    """A job's objects as a producer leaves them: 3 document batches (4, 4, 2 chunks),
    2 query batches (4, 1), the record first, the report last if it finished."""
    store = JobStore(LocalStore(root), "my docs", job_id)
    store.put_job_record(JobRecord(spec=_spec(job_id), documents_total=10, bytes_total=999))
    for batch_id, items in (("b000000", 4), ("b000001", 4), ("b000002", 2)):
        store.put_batch(_batch(job_id, batch_id, items))
    for batch_id, items in (("q000000", 4), ("q000001", 1)):
        store.put_batch(_batch(job_id, batch_id, items))
    store.put_model(ModelInfo(name="org/m", source="/m", revision="", dim=8, dtype="fp32",
                              device="cpu", max_seq_length=64))  # fmt: skip
    if sealed:
        store.put_producer_report(_report(10, 3))
    return store


def test_find_job_looks_in_every_collection(tmp_path: Path) -> None:
    _staged_job(tmp_path, "job-a", sealed=True)
    (tmp_path / "other-collection" / "job-b").mkdir(parents=True)
    found = find_job(LocalStore(tmp_path), "job-a")
    assert found.layout.root == "my-docs/job-a"  # the collection's safe name
    with pytest.raises(EmbedFleetError) as missing:
        find_job(LocalStore(tmp_path), "job-b")  # a folder without a record is no job
    assert "no job 'job-b'" in str(missing.value) and "--output" in str(missing.value)


def test_rebuild_of_a_submitted_job(tmp_path: Path, redis_client) -> None:
    store = _staged_job(tmp_path, "job-a", sealed=True)
    ledger = JobLedger(redis_client, "job-a")
    record = rebuild_ledger(ledger, store)
    assert record.spec.job_id == "job-a" and ledger.spec() == record.spec
    # Every batch but the last of its kind holds batch_chunks items.
    assert ledger.staged_items() == {
        "b000000": 4, "b000001": 4, "b000002": 2, "q000000": 4, "q000001": 1,
    }  # fmt: skip
    assert ledger.phase_opened("encode") and ledger.status() == "resuming"
    assert [m.name for m in ledger.models()] == ["org/m"]
    progress = ledger.progress()
    assert (progress.staged_chunks, progress.total_batches) == (10, 5)
    assert (progress.documents_total, progress.bytes_total) == (10, 999)


def test_rebuild_of_a_job_whose_producer_stopped(tmp_path: Path, redis_client) -> None:
    """No report: the job is not sealed and no batch is recorded staged (the producer
    that finishes the staging records them all, with their true sizes)."""
    store = _staged_job(tmp_path, "job-a", sealed=False)
    ledger = JobLedger(redis_client, "job-a")
    rebuild_ledger(ledger, store)
    assert not ledger.phase_opened("encode") and ledger.staged_items() == {}
    with pytest.raises(EmbedFleetError, match="never fully submitted"):
        ledger.require_submitted()
