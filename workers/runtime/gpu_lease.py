"""The GPU lease of a dense/rerank worker, taken when the worker starts.

Celery's ``worker_init`` runs in the worker's main process before it forks its pool, so
the lease is taken once per worker and its device goes to the pool processes in the
:class:`~workers.runtime.context.WorkerBoot` they inherit; ``worker_shutdown`` gives it
back. A worker that finds every GPU it sees leased (by UUID: another container may hold
it under another hostname and index) exits with a message naming the holders
(or waits for one with ``EMBED_FLEET_GPU_WAIT=1``); on a host without CUDA it runs on
the CPU and says that instead.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from shared.control.leases import GpuLease, host_gpus
from shared.control.ledger import connect
from shared.records.errors import EmbedFleetError, ExitCode
from shared.records.logs import get_logger
from workers.runtime.context import GPU_QUEUES, WorkerBoot

log = get_logger("gpu")


def take_gpu_lease(boot: WorkerBoot) -> None:
    """Lease a GPU for a worker that serves ``dense`` or ``rerank`` (sets the boot's
    device and lease); exits with code 3 when every GPU is held and it may not wait.

    A real device is then the only one the pool processes see: ``CUDA_VISIBLE_DEVICES``
    is set to its UUID before the fork (CUDA reads it when first used there, and the
    main process never uses CUDA). A container given every GPU (compose's ``count:
    all``) would otherwise create a context on GPU 0 from any library call that uses
    the default device. Stand-in devices (``EMBED_FLEET_GPUS``) run where
    ``EMBED_FLEET_DEVICE`` says, else on ``cuda:<index>``.
    """
    settings = boot.settings
    if not boot.queues & GPU_QUEUES:
        return
    if settings.device and settings.gpus is None:
        log.warning(
            "device set by EMBED_FLEET_DEVICE: no GPU lease taken",
            extra={"fields": {"device": settings.device}},
        )
        boot.device = settings.device
        return
    gpus = host_gpus(settings.gpus)
    if not gpus:
        log.warning("no CUDA device on this host: this worker runs on the CPU")
        boot.device = "cpu"
        return
    lease = GpuLease(connect(settings.worker_broker_url), worker=boot.node, on_lost=_lease_lost)
    try:
        gpu = lease.acquire(
            gpus, wait=settings.gpu_wait, on_wait=lambda: log.warning("waiting for a free GPU")
        )
    except EmbedFleetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(ExitCode.RUNNING) from None
    boot.lease = lease
    atexit.register(lease.release)  # also on a cold shutdown, which skips worker_shutdown
    if settings.gpus is not None:
        boot.device = settings.device or f"cuda:{gpu.index}"
    elif gpu.uuid.startswith(("GPU-", "MIG-")):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu.uuid
        boot.device = "cuda:0"
    else:  # CUDA gave no UUID: the lease is by host and index, the device by index
        boot.device = f"cuda:{gpu.index}"
    log.warning(
        "GPU leased",
        extra={"fields": {"device": boot.device, "uuid": gpu.uuid, "host": lease.host}},
    )


def _lease_lost() -> None:
    """The lease expired unrenewed and may be another worker's now: stop using the GPU.
    A graceful stop finishes or hands back the unit in hand within the stop timeout."""
    log.error("GPU lease lost (not renewed within its TTL): stopping this worker")
    os.kill(os.getpid(), signal.SIGTERM)


def release_gpu_lease(boot: WorkerBoot) -> None:
    if boot.lease is not None:
        boot.lease.release()
        boot.lease = None
