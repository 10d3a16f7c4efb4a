"""The Celery app as both sides see it: queues, task names, reliability settings.

The producer publishes by task *name* (``send_task``), so it never imports worker code;
workers register their tasks on the app this module builds.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from shared import serializer
from shared.config import Settings
from shared.schemas import Struct

TASK_EMBED_DENSE = "embed_fleet.dense.embed_batch"
TASK_ENCODE_SPARSE = "embed_fleet.sparse.encode_batch"
TASK_RETRIEVE_DENSE = "embed_fleet.dense.retrieve"
TASK_RETRIEVE_SPARSE = "embed_fleet.sparse.retrieve"
TASK_RERANK = "embed_fleet.rerank.rerank_group"
TASK_PLAN_RETRIEVE = "embed_fleet.aggregate.plan_retrieve"
TASK_FUSE = "embed_fleet.aggregate.fuse"
TASK_EXPORT = "embed_fleet.aggregate.export_job"

QUEUE_DENSE = "dense"
QUEUE_SPARSE = "sparse"
QUEUE_RERANK = "rerank"
QUEUE_AGGREGATE = "aggregate"

ROUTES: dict[str, str] = {
    TASK_EMBED_DENSE: QUEUE_DENSE,
    TASK_RETRIEVE_DENSE: QUEUE_DENSE,
    TASK_ENCODE_SPARSE: QUEUE_SPARSE,
    TASK_RETRIEVE_SPARSE: QUEUE_SPARSE,
    TASK_RERANK: QUEUE_RERANK,
    TASK_PLAN_RETRIEVE: QUEUE_AGGREGATE,
    TASK_FUSE: QUEUE_AGGREGATE,
    TASK_EXPORT: QUEUE_AGGREGATE,
}
# The task that runs each per-batch stage, and each stage's retrieve task.
STAGE_TASKS: dict[str, str] = {"dense": TASK_EMBED_DENSE, "sparse": TASK_ENCODE_SPARSE}
RETRIEVE_TASKS: dict[str, str] = {"dense": TASK_RETRIEVE_DENSE, "sparse": TASK_RETRIEVE_SPARSE}


def make_app(settings: Settings | None = None) -> Celery:
    """Build the fleet's Celery app.

    Reliability follows DESIGN.md: a task is acknowledged only after it ran
    (``acks_late``), a worker killed mid-task hands it back (``reject_on_worker_lost``),
    each worker process reserves one task at a time (prefetch 1), and no result backend
    is used because the job ledger is the source of truth.
    """
    settings = settings or Settings.from_env()
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
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        task_default_queue=QUEUE_AGGREGATE,
        # Flower shows task events only with these on.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


def send(app: Celery, task_name: str, message: Struct) -> None:
    """Publish one typed message to the queue its task is routed to."""
    app.send_task(task_name, args=[message], queue=ROUTES[task_name])
