"""The GPU lease of a dense/rerank worker, taken when the worker starts.

Celery's ``worker_init`` runs in the worker's main process before it forks its pool, so
the lease is taken once per worker and its device is handed to the pool process through
``EMBED_FLEET_DEVICE`` (``cuda:<index>``). ``worker_shutdown`` gives it back. A worker
that finds every GPU of its host leased exits with a message saying so (or waits for
one with ``EMBED_FLEET_GPU_WAIT=1``); on a host without CUDA it runs on the CPU and
says that instead. Like the retry policy in ``hooks``, this lives beside the tasks, not
in them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import signals

from shared.errors import EmbedFleetError
from shared.leases import GpuLease, gpu_count
from shared.logs import get_logger
from workers.hooks import ledger_client

log = get_logger("gpu")
# The queues whose work runs on a GPU when there is one.
GPU_QUEUES = frozenset({"dense", "rerank"})
_lease: GpuLease | None = None


def consumed_queues(worker: Any) -> set[str]:
    """The queue names a starting Celery worker consumes (``-Q``)."""
    queues = getattr(getattr(getattr(worker, "app", None), "amqp", None), "queues", None)
    return set(getattr(queues, "consume_from", None) or {})


@signals.worker_init.connect
def take_gpu_lease(sender: Any = None, **_: Any) -> None:
    """Lease a GPU for a worker that serves ``dense`` or ``rerank``."""
    global _lease
    if sender is None or not consumed_queues(sender) & GPU_QUEUES:
        return
    if os.environ.get("EMBED_FLEET_DEVICE"):
        log.warning(
            "device set by EMBED_FLEET_DEVICE: no GPU lease taken",
            extra={"fields": {"device": os.environ["EMBED_FLEET_DEVICE"]}},
        )
        return
    devices = gpu_count()
    if devices == 0:
        log.warning("no CUDA device on this host: this worker runs on the CPU")
        os.environ["EMBED_FLEET_DEVICE"] = "cpu"
        return
    lease = GpuLease(ledger_client(), worker=str(sender.hostname))
    wait = os.environ.get("EMBED_FLEET_GPU_WAIT", "").lower() in ("1", "true", "yes")
    try:
        index = lease.acquire(
            devices, wait=wait, on_wait=lambda: log.warning("waiting for a free GPU")
        )
    except EmbedFleetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(3) from None
    _lease = lease
    os.environ["EMBED_FLEET_DEVICE"] = f"cuda:{index}"
    log.warning("GPU leased", extra={"fields": {"device": f"cuda:{index}", "host": lease.host}})


@signals.worker_shutdown.connect
def release_gpu_lease(**_: Any) -> None:
    global _lease
    if _lease is not None:
        _lease.release()
        _lease = None
