"""The Celery app as both sides see it, and the two ways work is published.

The producer publishes by task *name* (``send_task``), so it never imports worker code;
workers register their tasks on the app this module builds. Task names and queues come
from the pipeline table (:mod:`shared.pipeline`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from shared import pipeline, serializer
from shared.ledger import RETRY_CAP_S, RETRY_FIRST_S, retries_for
from shared.pipeline import PhaseName
from shared.schemas import BatchKind, EncodeBatch, JobSpec, JobStep, UnitMessage
from shared.settings import Settings


def make_app(settings: Settings) -> Celery:
    """Build the fleet's Celery app.

    Reliability: a task is acknowledged only after it ran (``acks_late``), a worker
    killed mid-task hands it back (``reject_on_worker_lost``), each worker process
    reserves one task at a time (prefetch 1), and no result backend is used because the
    job ledger is the source of truth.
    """
    serializer.register_serializer()
    app = Celery("embed_fleet", broker=settings.worker_broker_url, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.unacked_restore_interval is not None:
        transport["unacked_restore_interval"] = settings.unacked_restore_interval
        transport["unacked_restore_throttle"] = 1
    app.conf.update(
        task_serializer=serializer.NAME,
        accept_content=[serializer.NAME],
        result_accept_content=[serializer.NAME],
        result_serializer=serializer.NAME,
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # A publish (a retry, the next phase's step) rides out a broker restart instead of
        # failing, which would make Celery reject the message without requeueing it.
        task_publish_retry_policy={
            "max_retries": retries_for(settings.transient_window),
            "interval_start": RETRY_FIRST_S,
            "interval_step": RETRY_FIRST_S,
            "interval_max": RETRY_CAP_S,
        },
        task_routes={task: {"queue": queue} for task, queue in pipeline.routes().items()},
        task_default_queue=pipeline.QUEUE_AGGREGATE,
        # Flower shows task events only with these on.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


def send_unit(app: Celery, message: UnitMessage, variant: str = "") -> None:
    """Publish one unit of a stage to the queue of its task (``variant``: which of a
    stage's tasks, e.g. the retriever of a retrieve group)."""
    route = pipeline.stage(message.stage).route(variant)
    app.send_task(route.task, args=[message], queue=route.queue)


def send_encode_units(app: Celery, spec: JobSpec, batch_id: str, kind: BatchKind) -> None:
    """One message per encode stage of the job, all naming the same staged batch."""
    for stage in pipeline.job_stages(spec, "encode"):
        send_unit(app, EncodeBatch(job_id=spec.job_id, stage=stage.name, unit=batch_id, kind=kind))


def send_resume(app: Celery, job_id: str) -> None:
    """Enqueue the resume step, which re-drives the job from its first unfinished phase
    (``embed-collections resume``, the watchdog, a seal on a rebuilt ledger)."""
    step = pipeline.step("resume")
    app.send_task(
        step.route.task, args=[JobStep(job_id=job_id, step="resume")], queue=step.route.queue
    )


def advance(app: Celery, spec: JobSpec, phase: PhaseName) -> None:
    """Enqueue the aggregator step that follows ``phase``; called by whoever won the
    phase's guard."""
    step = pipeline.next_step(spec, phase)
    app.send_task(
        step.route.task, args=[JobStep(job_id=spec.job_id, step=step.name)], queue=step.route.queue
    )
