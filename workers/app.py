"""The app that fleet workers run::

    celery -A workers.app worker -Q dense,rerank -c 1   # one per GPU (or CPU host)
    celery -A workers.app worker -Q aggregate -c 1
    celery -A workers.app flower

Importing this module registers the msgspec serializer and the tasks; it does not
import torch (models load on a worker's first task), so Flower stays light.
"""

from __future__ import annotations

from shared import logs
from shared.celery_app import make_app
from shared.config import Settings

_settings = Settings.from_env()
logs.configure(_settings.log_level)
app = make_app(_settings)

from workers import gpu_lease, tasks  # noqa: E402, F401  (registers signals and tasks)
