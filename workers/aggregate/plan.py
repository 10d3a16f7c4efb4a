"""The aggregator's step after encoding: plan the retrieve phase.

The collection's BM25 statistics are merged once (the retrieve units and the export
read them), the document batches are cut into groups, and one retrieve unit is enqueued
per encode stage and group. Idempotent: a redelivered step rewrites the same objects
and enqueues units the ledger counts once.
"""

from __future__ import annotations

from celery import Celery

from shared.control.celery_app import fan_out
from shared.control.ledger import JobLedger
from shared.records import ids
from shared.records.job_store import JobStore
from shared.records.schemas import JobSpec, RetrieveGroup
from workers.ranking.sparse_weights import keep_merged_bm25


def retrieve_units(ledger: JobLedger, spec: JobSpec) -> list[RetrieveGroup]:
    """One retrieve unit per encode stage and group of the encoded document batches (a
    batch that failed any encode stage is left out of the job, as the export leaves it
    out, so that no candidate names a chunk the artifacts lack)."""
    assert spec.retrieval is not None, "only jobs with queries have a retrieve phase"
    size = spec.retrieval.batches_per_retrieve_task
    usable = ledger.usable_batches()
    units: list[RetrieveGroup] = []
    for stage in spec.stages:
        for number, start in enumerate(range(0, len(usable), size)):
            units.append(
                RetrieveGroup(
                    job_id=spec.job_id,
                    stage="retrieve",
                    unit=ids.group_id(stage, number),
                    retriever=stage,
                    batch_ids=usable[start : start + size],
                )
            )
    return units


def plan_retrieve(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """Fan the retrieve phase out; returns how many units it enqueued."""
    spec = ledger.spec()
    keep_merged_bm25(store, spec, ledger.usable_batches())
    units = retrieve_units(ledger, spec)
    return fan_out(app, ledger, spec, "retrieve", units, variant=lambda unit: unit.retriever)
