"""The app that fleet workers run::

    celery -A workers.app worker -Q dense,rerank -c 1   # one per GPU (or CPU host)
    celery -A workers.app worker -Q sparse -c 1
    celery -A workers.app worker -Q aggregate -c 1
    celery -A workers.app flower

SIGTERM stops a worker gracefully: it finishes the unit in hand within
``EMBED_FLEET_STOP_TIMEOUT`` seconds or hands it back to its queue, then gives its GPU
lease back.

Importing this module reads the settings once, registers the msgspec serializer and the
tasks, and wires the worker's lifecycle to the worker context
(:mod:`workers.runtime.context`); it does not import torch (models load on a worker's
first task, or at start with ``EMBED_FLEET_PRELOAD``), so Flower stays light.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from shared.control import telemetry
from shared.control.celery_app import make_app
from shared.control.settings import Settings
from shared.records import logs
from workers.runtime import context

settings = Settings.from_env()
logs.configure(settings.log_level)
app = make_app(settings)


def consumed_queues(worker: Any) -> frozenset[str]:
    """The queue names a starting Celery worker consumes (``-Q``)."""
    queues = getattr(getattr(getattr(worker, "app", None), "amqp", None), "queues", None)
    return frozenset(getattr(queues, "consume_from", None) or {})


@signals.worker_init.connect
def boot_worker(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, before the fork: its queues, its GPU lease, and for
    a preparing worker the chunker's libraries (``workers.runtime.preload``)."""
    from workers.runtime.gpu_lease import take_gpu_lease
    from workers.runtime.preload import import_chunking_libraries

    boot = context.WorkerBoot(
        settings=settings, queues=consumed_queues(sender), node=str(getattr(sender, "hostname", ""))
    )
    take_gpu_lease(boot)
    context.attach_boot(app, boot)
    if "prepare" in boot.queues:
        import_chunking_libraries()


@signals.worker_process_init.connect
def start_process(**_: Any) -> None:
    """In each pool process, after the fork: tracing (exporter threads do not survive a
    fork), the worker context, and the preloaded models."""
    from workers.runtime.preload import stage_models

    telemetry.configure("embed-fleet-worker", settings)
    boot = context.boot_of(app) or context.WorkerBoot(settings=settings)
    worker = context.WorkerContext.start(boot)
    context.attach(app, worker)
    stage_models(worker)


@signals.worker_shutting_down.connect
def stopping(how: str = "", **_: Any) -> None:
    """Told to stop (SIGTERM): finish the unit in hand within ``EMBED_FLEET_STOP_TIMEOUT``,
    else hand it back to its queue (:mod:`workers.runtime.shutdown`)."""
    from workers.runtime.shutdown import bound_the_stop

    boot = context.boot_of(app)
    if boot is not None and boot.stop_timer is None:  # a second SIGTERM changes nothing
        boot.stop_timer = bound_the_stop(settings.stop_timeout, how)


@signals.worker_shutdown.connect
def stop_worker(**_: Any) -> None:
    """Give the GPU lease back (after a finished or a handed-back unit alike)."""
    from workers.runtime.gpu_lease import release_gpu_lease

    boot = context.boot_of(app)
    if boot is not None:
        if boot.stop_timer is not None:
            boot.stop_timer.cancel()  # the unit is done: no cold shutdown mid-teardown
        release_gpu_lease(boot)


from workers import tasks  # noqa: E402, F401  (registers the tasks)
