"""The manifest's ``changes``: a reusing job (``run --reuse``) against its earlier job.

Added up at ``finish`` from what each phase kept in ``work/``: the id partitions'
matches (the earlier documents, and those gone), the ranges' tallies (documents
unchanged, changed, added; chunks found), and the parts' counts of rows each model
took from the earlier job. Everything else a vector store needs, row by row, is in the
parts themselves (``export --to delta``).
"""

from __future__ import annotations

from collections import Counter

from shared.inputs.models import BM25
from shared.records import ids
from shared.records.job_store import JobStore
from shared.records.schemas import Changes, DocumentChanges, ExportedPart, JobSpec
from workers.prepare.reuse import partitions_of


def changes(spec: JobSpec, store: JobStore, parts: list[ExportedPart]) -> Changes | None:
    """The job's changes against the job it reused (``None``: it reused none)."""
    if not spec.reuse:
        return None
    plan = store.read_plan()
    matches = [
        store.reuse_match(ids.partition_id(index)) for index in range(partitions_of(plan, spec))
    ]
    chunked = [store.chunked(ids.range_id(part.index)) for part in plan.ranges]
    ranges = [r.earlier for r in chunked if r is not None and r.earlier is not None]
    reused: Counter[str] = Counter()
    encoded: Counter[str] = Counter()
    for part in parts:
        reused.update(part.reused)
        encoded.update(part.encoded)
    chunks = sum(part.artifact.records for part in parts)
    sparse = [m for m in spec.sparse_models if m != BM25] if "sparse" in spec.stages else []
    models = [*spec.dense_models, *sparse]
    refused = next((m.refused for m in matches if m is not None and m.refused), "")
    if not refused and any(m is None for m in matches):
        refused = "the match of the earlier job's documents did not run"
    return Changes(
        against=spec.reuse,
        # The folder's last segment (shared.records.earlier_jobs.folder_of).
        against_job=spec.reuse.rstrip("/").rpartition("/")[2],
        refused=refused,
        documents=DocumentChanges(
            added=sum(r.added for r in ranges),
            changed=sum(r.changed for r in ranges),
            unchanged=sum(r.unchanged for r in ranges),
            removed=sum(m.removed_documents for m in matches if m),
        ),
        chunks=chunks,
        chunks_found=sum(r.found for r in ranges),
        reused={m: reused.get(m, 0) for m in models},
        encoded={m: encoded.get(m, 0) for m in models},
        repeats={m: chunks - reused.get(m, 0) - encoded.get(m, 0) for m in models},
        lost=next((r.lost for r in ranges if r.lost), ""),
        chunks_lost=sum(r.lost_chunks for r in ranges),
    )
