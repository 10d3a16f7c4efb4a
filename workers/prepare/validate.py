"""The validate phase: every record of one read range parsed and checked, and its ids
handed to the duplicate check by partition; then ``plan_dedupe`` adds up the ranges.

Nothing is staged yet: under ``--on-bad-record fail`` the first bad record fails the job
before a single chunk is encoded, as when the producer validated alone. A range knows
its lines only from its own first line, so the skipped records it lists are moved to
file lines by ``plan_dedupe``, which knows how many lines each range holds; a failing
record is named by its file line at once (its range counts the lines before it, once).
"""

from __future__ import annotations

from celery import Celery

from shared.control.ledger import JobLedger
from shared.inputs.sources import (
    MAX_LISTED_SKIPS,
    OWN_LINES,
    ReadProgress,
    lines_before,
    read_range,
)
from shared.records import ids
from shared.records.errors import BadRecordError
from shared.records.job_store import JobStore
from shared.records.schemas import (
    Document,
    IdPartition,
    JobSpec,
    RangeValidated,
    ReadPlan,
    ReadRange,
    SkippedRecord,
    Validation,
)
from workers.prepare.reuse import index_earlier_parts, partitions_of


def validate_range(
    spec: JobSpec, ledger: JobLedger, store: JobStore, range_id: str, transient_window_s: float
) -> int:
    """Validate one range and write what it found; returns its documents (an S3 source's
    outage retried over ``transient_window_s``).

    Raises:
        BadRecordError: under ``fail``, for the range's first bad record (file line).
    """
    plan = store.read_plan()
    part = plan.ranges[ids.range_index(range_id)]
    progress = ReadProgress()
    skipped: list[SkippedRecord] = []
    skipped_count = 0
    partitions: list[IdPartition] = [IdPartition(ids=[], lines=[]) for _ in range(plan.partitions)]
    records = read_range(plan.kind, part, progress, spec.fields, transient_window_s, spec.limits)
    for record in records:
        if isinstance(record, Document):
            bucket = partitions[ids.id_partition(record.id, plan.partitions)]
            bucket.ids.append(record.id)
            bucket.lines.append(record.line)
            continue
        if spec.on_bad_record == "fail":
            raise _named(plan, part, record, transient_window_s)
        skipped_count += 1
        if len(skipped) < MAX_LISTED_SKIPS:
            skipped.append(record)
    # A JSONL range's lines, blank ones too: the next range's lines start after them. Other
    # kinds' records carry their own file's lines, so the next range shifts by nothing.
    lines = 0 if plan.kind in OWN_LINES else progress.lines
    if ledger.status() == "failed":
        return 0  # another range failed the job: write nothing more
    if partitions_of(plan, spec):
        for index, bucket in enumerate(partitions):
            store.put_id_partition(ids.partition_id(index), range_id, bucket)
    if spec.reuse:
        index = ids.range_index(range_id)
        ranges = len(plan.ranges)
        index_earlier_parts(spec, store, index, ranges, plan.partitions, transient_window_s)
    store.put_validated(
        range_id,
        RangeValidated(
            documents=progress.documents,
            lines=lines,
            bytes=progress.bytes_read,
            skipped=skipped,
            skipped_count=skipped_count,
        ),
    )
    return progress.documents


def _named(
    plan: ReadPlan, part: ReadRange, record: SkippedRecord, transient_window_s: float
) -> BadRecordError:
    """The bad record's error, with its line in the whole file."""
    offset = (
        0 if plan.kind in OWN_LINES else lines_before(part.path, part.start, transient_window_s)
    )
    moved = record.shifted(offset)
    return BadRecordError(moved.path, moved.line, moved.reason)


def plan_dedupe(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """Once every range is validated: where each range's lines start, every skipped
    record at its file line, the documents in all; then one dedupe unit per id
    partition (none for a collection read as one range). Returns the units."""
    from shared.control.celery_app import fan_out
    from shared.records.schemas import PrepareUnit

    spec = ledger.spec()
    plan = store.read_plan()
    offsets: list[int] = []
    skipped: list[SkippedRecord] = []
    documents = skipped_count = at = 0
    for part in plan.ranges:
        found = store.validated(ids.range_id(part.index))
        offsets.append(at)
        documents += found.documents
        skipped_count += found.skipped_count
        room = MAX_LISTED_SKIPS - len(skipped)
        skipped += [record.shifted(at) for record in found.skipped[:room]]
        at += found.lines
    store.put_validation(
        Validation(
            documents=documents,
            line_offsets=offsets,
            skipped=skipped,
            skipped_count=skipped_count,
        )
    )
    ledger.set_documents_total(documents)
    partitions = range(partitions_of(plan, spec))
    units = [
        PrepareUnit(job_id=spec.job_id, stage="dedupe", unit=ids.partition_id(index))
        for index in partitions
    ]
    return fan_out(app, ledger, spec, "dedupe", units)
