"""The chunk phase: each read range chunked with the job's tokenizer and staged in
batches whose encode units go out at once; then ``seal`` counts the batches.

A range is read again (validation wrote no chunks): its bad records and in-range
duplicates come out of the reader as they did then, and the ids ``plan_chunk`` listed as
duplicates of earlier ranges are left out. Chunking is deterministic, so a unit run
twice stages the same batches under the same ids (``b<range>-<n>``), and the ledger
counts each once.
"""

from __future__ import annotations

import time

from celery import Celery

from shared.control.celery_app import EncodeUnits, advance, send_resume
from shared.control.ledger import JobLedger
from shared.control.settings import Settings
from shared.inputs.chunking import Chunker, ChunkTally, chunk_batches
from shared.inputs.sources import (
    MAX_LISTED_SKIPS,
    OWN_LINES,
    ReadProgress,
    listed_together,
    read_range,
)
from shared.records import ids
from shared.records.content_keys import text_key
from shared.records.errors import BadRecordError
from shared.records.job_store import JobStore
from shared.records.schemas import (
    Document,
    JobSpec,
    LatencySummary,
    ProducerReport,
    RangeChunked,
    ServedRow,
    SkippedRecord,
)
from shared.records.served_rows import place, served_rows
from workers.prepare.reuse import EarlierLookup


def chunk_range(
    spec: JobSpec,
    ledger: JobLedger,
    store: JobStore,
    app: Celery,
    chunker: Chunker,
    range_id: str,
    transient_window_s: float,
    text_claims: int = Settings.text_claims,
) -> RangeChunked:
    """Chunk and stage one range, enqueueing each batch's encode units as it goes (an
    S3 source's outage retried over ``transient_window_s``). Each batch lists the chunks
    whose text another chunk of the job claimed first (claiming at most ``text_claims``
    texts a job, none once it is sealed or its ledger was rebuilt; see
    :mod:`shared.records.served_rows`)."""
    started = time.time()
    plan = store.read_plan()
    index = ids.range_index(range_id)
    excluded = set(store.exclusions(range_id).doc_ids)
    progress = ReadProgress()
    batches: dict[str, int] = {}
    tally = ChunkTally()
    part = plan.ranges[index]
    records = read_range(plan.kind, part, progress, spec.fields, transient_window_s, spec.limits)
    # Bad records and duplicates were listed by the validate and dedupe phases; a
    # document of too many chunks is found here, the first time it is cut.
    documents = (r for r in records if isinstance(r, Document) and r.id not in excluded)
    line_offset = 0 if plan.kind in OWN_LINES else store.validation().line_offsets[index]

    def too_long(record: SkippedRecord) -> None:
        if spec.on_bad_record == "fail":
            moved = record.shifted(line_offset)
            raise BadRecordError(moved.path, moved.line, moved.reason)

    # Claims hold only while the job first chunks: a ledger written again from the store
    # lost them, and seal dropped them (a late copy of this unit runs after it), and
    # claiming anew could turn a chunk that serves others into one served. So then
    # nothing is claimed: every chunk staged is its own.
    late = ledger.was_rebuilt() or ledger.phase_opened("encode")
    claims = 0 if late else text_claims
    # A job reusing an earlier one's vectors copies them beside each batch first.
    earlier = (
        EarlierLookup(spec, store, range_id, plan.partitions, transient_window_s)
        if spec.reuse
        else None
    )
    with EncodeUnits(app, ledger, spec, "documents") as units:
        runs = chunk_batches(
            chunker, documents, spec.batch_chunks, tally, too_long, spec.sort_window
        )
        for run in runs:
            chunks = run.chunks
            batch_id = ids.range_batch_id(index, len(batches))
            batch = run.staged(spec.job_id, batch_id)
            keys = [text_key(c.text) for c in chunks]
            # A chunk taking an earlier job's vectors is not encoded: it claims nothing.
            known = earlier.stage(batch_id, chunks, keys) if earlier is not None else []
            batch.earlier = len(known)
            batch.served = _served(ledger, batch_id, keys, set(known), claims)
            store.put_batch(batch)
            ledger.record_staged(batch_id, len(chunks), -1, -1, [c.chunk_id for c in chunks])
            units.add(batch_id, sum(run.tokens.lengths))
            batches[batch_id] = len(chunks)
    chunked = RangeChunked(
        documents=tally.documents,
        chunks=tally.chunks,
        tokens=tally.tokens,
        batches=batches,
        empty_documents=tally.empty,
        skipped=[record.shifted(line_offset) for record in tally.too_long[:MAX_LISTED_SKIPS]],
        skipped_count=len(tally.too_long),
        started_at=started,
        finished_at=time.time(),
    )
    if earlier is not None:
        chunked.earlier = earlier.tally()
    store.put_chunked(range_id, chunked)
    ledger.record_range_read(range_id, tally.documents, progress.bytes_read)
    return chunked


def _served(
    ledger: JobLedger, batch_id: str, keys: list[str], known: set[int], cap: int
) -> list[ServedRow]:
    """The batch's chunks whose text another chunk of the job claimed first, claiming
    the others' texts (one round trip; none at all with ``cap`` 0)."""
    if cap == 0:
        return []
    rows = [row for row in range(len(keys)) if row not in known]
    places = [place(batch_id, row) for row in rows]
    found = ledger.claim_texts([keys[row] for row in rows], places, cap)
    return served_rows(batch_id, found, rows)


def seal(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """Once every range is chunked: the job's report of what was read and staged (the
    producer's report, as a producer that prepared the job writes it), and the encode
    phase's total. Returns the document batches."""

    spec = ledger.spec()
    plan = store.read_plan()
    validation = store.validation()
    ranges = [store.chunked(ids.range_id(part.index)) for part in plan.ranges]
    done = [r for r in ranges if r is not None]
    assert len(done) == len(ranges), "seal runs once every range is chunked"
    ledger.forget_texts()
    started = min((r.started_at for r in done), default=time.time())
    finished = max((r.finished_at for r in done), default=started)
    chunks = sum(r.chunks for r in done)
    latencies = [r.finished_at - r.started_at for r in done]
    report = ProducerReport(
        documents=sum(r.documents for r in done),
        chunks=chunks,
        batches=sum(len(r.batches) for r in done),
        tokens=sum(r.tokens for r in done),
        empty_documents=[doc for r in done for doc in r.empty_documents],
        skipped_records=listed_together(validation.skipped, [s for r in done for s in r.skipped]),
        skipped_count=validation.skipped_count + sum(r.skipped_count for r in done),
        started_at=started,
        finished_at=finished,
        latency=LatencySummary.from_samples(latencies, chunks, finished - started),
        queries=spec.retrieval.queries if spec.retrieval else 0,
        query_batches=spec.retrieval.query_batches if spec.retrieval else 0,
    )
    store.put_producer_report(report)
    if ledger.seal(report, claimant="step:seal"):
        advance(app, spec, "encode")
    elif ledger.was_rebuilt():
        # The ledger was written again from the store while the job prepared: encode
        # units done before that are not counted, and their messages are gone. The
        # resume step counts what the store holds and enqueues the rest.
        send_resume(app, spec.job_id)
    return report.batches
