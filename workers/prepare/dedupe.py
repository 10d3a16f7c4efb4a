"""The dedupe phase: duplicate ids across read ranges, one id partition per unit.

Each range wrote the ids it accepted split by a stable hash into partitions; a dedupe
unit reads one partition of every range, so each id is looked at by exactly one unit
and no process holds every id. The first record of an id in reading order (range, then
line) keeps it, as when one process read the whole collection. Then ``plan_chunk``
gives each range the ids it must leave out and opens the chunk phase.
"""

from __future__ import annotations

from celery import Celery

from shared.control.ledger import JobLedger
from shared.inputs.sources import MAX_LISTED_SKIPS
from shared.records import ids
from shared.records.errors import BadRecordError, NoDocumentsError
from shared.records.job_store import JobStore
from shared.records.schemas import (
    DuplicateId,
    Duplicates,
    JobSpec,
    PrepareUnit,
    RangeExclusions,
    SkippedRecord,
)
from workers.prepare.reuse import match_partition


def dedupe_partition(
    spec: JobSpec, store: JobStore, partition_id: str, transient_window_s: float = 0.0
) -> int:
    """Find the duplicates of one id partition; returns the ids it looked at. A job that
    reuses an earlier job's vectors also matches the partition's documents with the
    earlier job's (an S3 outage ridden out over ``transient_window_s``).

    Raises:
        BadRecordError: under ``fail``, for the first duplicate (file and line).
    """
    plan = store.read_plan()
    first: dict[str, tuple[int, int]] = {}
    found: list[DuplicateId] = []
    seen = 0
    for part in plan.ranges:  # reading order: a lower range's record comes first
        bucket = store.id_partition(partition_id, ids.range_id(part.index))
        seen += len(bucket.ids)
        for doc_id, line in zip(bucket.ids, bucket.lines, strict=True):
            kept = first.setdefault(doc_id, (part.index, line))
            if kept[0] != part.index:
                found.append(DuplicateId(part.index, line, doc_id, *kept))
    if found and spec.on_bad_record == "fail":
        offsets = store.validation().line_offsets
        dup = min(found, key=lambda d: (d.range, d.line))
        path = plan.ranges[dup.range].path
        raise BadRecordError(
            path,
            offsets[dup.range] + dup.line,
            f"duplicate id {dup.doc_id!r} (first seen at line "
            f"{offsets[dup.first_range] + dup.first_line})",
        )
    store.put_duplicates(partition_id, Duplicates(items=found))
    if spec.reuse:
        match_partition(spec, store, partition_id, len(plan.ranges), first, transient_window_s)
    return seen


def plan_chunk(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """Once every partition is checked: list each range's duplicates (skipped records
    at their file lines, and the ids the range leaves out), then one chunk unit per
    range. Returns the units.

    Raises:
        NoDocumentsError: every record was skipped (unless the job allows it empty).
    """
    from shared.control.celery_app import fan_out

    spec = ledger.spec()
    plan = store.read_plan()
    validation = store.validation()
    by_range: dict[int, list[DuplicateId]] = {}
    if plan.partitions > 1:
        for index in range(plan.partitions):
            for dup in store.duplicates(ids.partition_id(index)).items:
                by_range.setdefault(dup.range, []).append(dup)
    if by_range and not validation.duplicates_listed:  # (a redelivered step counts once)
        offsets = validation.line_offsets
        listed = []
        for index in sorted(by_range):
            dups = sorted(by_range[index], key=lambda d: d.line)
            store.put_exclusions(
                ids.range_id(index), RangeExclusions(doc_ids=[d.doc_id for d in dups])
            )
            for dup in dups:
                first = offsets[dup.first_range] + dup.first_line
                listed.append(
                    SkippedRecord(
                        path=plan.ranges[index].path,
                        line=offsets[index] + dup.line,
                        reason=f"duplicate id {dup.doc_id!r} (first seen at line {first})",
                        first_seen=first,
                    )
                )
        count = sum(len(d) for d in by_range.values())
        skipped = sorted(validation.skipped + listed, key=lambda r: (r.path, r.line))
        validation.skipped = skipped[:MAX_LISTED_SKIPS]
        validation.skipped_count += count
        validation.documents -= count
        validation.duplicates_listed = True
        store.put_validation(validation)
        ledger.set_documents_total(validation.documents)
    if validation.documents == 0 and not spec.allow_empty:
        example = validation.skipped[0].named if validation.skipped else ""
        raise NoDocumentsError(spec.source, validation.skipped_count, example)
    units = [
        PrepareUnit(job_id=spec.job_id, stage="chunk", unit=ids.range_id(part.index))
        for part in plan.ranges
    ]
    return fan_out(app, ledger, spec, "chunk", units)
