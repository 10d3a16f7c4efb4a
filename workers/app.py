"""The app that fleet workers run::

    celery -A workers.app worker -Q dense,rerank -c 1   # one per GPU (or CPU host)
    celery -A workers.app worker -Q aggregate -c 1
    celery -A workers.app flower

Importing this module registers the msgspec serializer and the tasks; it does not
import torch (models load on a worker's first task), so Flower stays light.
"""

from __future__ import annotations

from celery import signals

from shared import logs, telemetry
from shared.celery_app import make_app
from shared.config import Settings

_settings = Settings.from_env()
logs.configure(_settings.log_level)
app = make_app(_settings)

from workers import gpu_lease, preload, tasks  # noqa: E402, F401  (registers signals and tasks)


@signals.worker_process_init.connect
def start_tracing(**_: object) -> None:
    """Tracing in every pool process (after the fork: exporter threads do not survive
    one); off unless OTEL_* or EMBED_FLEET_TRACE_* ask for it (see shared.telemetry)."""
    telemetry.configure("embed-fleet-worker")
