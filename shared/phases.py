"""What runs after each phase of a job, in one place.

::

    encode ─▶ (queries?) plan_retrieve ─▶ retrieve tasks ─▶ fuse ─▶ (rerank?) rerank tasks ─▶ export
           └─▶ (no queries) export                                └─▶ (no rerank) export

The ledger decides *when* a phase is complete (exactly once, see ``shared.ledger``);
this module decides *what* its winner enqueues next. The producer (sealing a job whose
batches all finished early) and the workers share it.
"""

from __future__ import annotations

from celery import Celery

from shared.celery_app import TASK_EXPORT, TASK_FUSE, TASK_PLAN_RETRIEVE, send
from shared.ledger import Phase
from shared.schemas import ExportJob, JobSpec


def next_task(spec: JobSpec, phase: Phase) -> str:
    if phase == "encode":
        return TASK_PLAN_RETRIEVE if spec.retrieval is not None else TASK_EXPORT
    if phase == "retrieve":
        return TASK_FUSE
    return TASK_EXPORT


def advance(app: Celery, spec: JobSpec, phase: Phase) -> None:
    """Enqueue the aggregator step that follows ``phase``."""
    send(app, next_task(spec, phase), ExportJob(job_id=spec.job_id))
