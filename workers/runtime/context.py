"""The worker context: everything a task needs, built once per worker process.

Two moments build it, as Celery's prefork model dictates:

- :class:`WorkerBoot`, in the worker's main process before it forks its pool
  (``worker_init``, see ``workers.app``): the settings, the queues the worker consumes,
  and its device (the GPU lease is taken here, once per worker, so two pool processes
  never take two GPUs).
- :meth:`WorkerContext.start`, in each pool process after the fork
  (``worker_process_init``): a Redis client of its own (a client must not cross a
  fork), the object stores, and the :class:`~workers.inference.engine.Inference` that
  holds its models and learned budgets.

Both live on the worker's Celery app (:func:`attach`), which Celery hands to every task
(``self.app``), so nothing is passed through module globals or environment variables.
Task bodies receive the context as their first argument.
"""

from __future__ import annotations

import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.control.leases import GpuLease
from shared.control.ledger import JobLedger, connect
from shared.control.settings import Settings
from shared.inputs.chunking import Chunker, chunker_for
from shared.records.job_store import JobStore
from shared.records.schemas import JobSpec, ModelInfo
from shared.records.storage import ObjectStore, open_store
from workers.inference.engine import Inference
from workers.runtime.heap import HeapKeeper
from workers.runtime.pace import UnitPace
from workers.runtime.parallel_io import ParallelIO

# Queues whose work runs on a GPU when there is one.
GPU_QUEUES = frozenset({"dense", "rerank"})
# Specs of recent jobs kept per process (a spec never changes once a job is open).
KEPT_SPECS = 64
# How long the main process's Redis calls retry when Redis cannot be reached: it runs the
# worker's event loop, which must get back to its pool and its broker.
MAIN_PROCESS_WINDOW_S = 5.0


@dataclass
class WorkerBoot:
    """What the worker's main process settles before the fork.

    Attributes:
        settings: The process's settings, read once.
        queues: The queues the worker consumes (``-Q``).
        node: The worker's Celery node name (``-n``).
        device: Where its dense and rerank models run (``None``: decide in the pool
            process, which may look at CUDA; the main process must not).
        lease: Its GPU lease, if it took one.
        stop_timer: Armed when the worker is told to stop: hands the unit in hand back
            when it fires (:mod:`workers.runtime.shutdown`).
        redis: The main process's own Redis client, made when it first records in a
            job's ledger how a pool process died (:mod:`workers.runtime.deaths`).
    """

    settings: Settings
    queues: frozenset[str] = frozenset()
    node: str = ""
    device: str | None = None
    lease: GpuLease | None = None
    stop_timer: threading.Timer | None = None
    redis: redis.Redis | None = None

    def ledger(self, job_id: str) -> JobLedger:
        """A job's ledger as the main process sees it. Its client is made on first use,
        after the fork (pool processes make their own), and its calls give up after
        :data:`MAIN_PROCESS_WINDOW_S` when Redis cannot be reached."""
        if self.redis is None:
            self.redis = connect(self.settings.worker_broker_url, MAIN_PROCESS_WINDOW_S)
        return JobLedger(self.redis, job_id)


@dataclass
class Job:
    """One job as a task sees it: what was asked, its ledger, its objects."""

    spec: JobSpec
    ledger: JobLedger
    store: JobStore


@dataclass
class WorkerContext:
    """A worker process's resources (see module doc).

    Attributes:
        boot: What the main process settled.
        redis: This process's Redis client (broker and ledger).
        inference: Its models, learned budgets and device.
        heap: Its RSS ceiling (``workers.runtime.heap``), checked after every unit.
        io: Reads and writes of a unit's several objects at once.
        pace: How much of an encode unit it takes, by its own seconds per batch
            (``EMBED_FLEET_UNIT_SECONDS``).
        host: The host's name, for reports.
    """

    boot: WorkerBoot
    redis: redis.Redis
    inference: Inference
    host: str = field(default_factory=socket.gethostname)
    heap: HeapKeeper = field(default_factory=HeapKeeper)
    io: ParallelIO = field(default_factory=ParallelIO)
    pace: UnitPace = field(default_factory=UnitPace)
    _stores: dict[str, ObjectStore] = field(default_factory=dict)
    _specs: OrderedDict[str, JobSpec] = field(default_factory=OrderedDict)
    _kept: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)
    _chunkers: OrderedDict[str, Chunker] = field(default_factory=OrderedDict)

    @classmethod
    def start(cls, boot: WorkerBoot) -> WorkerContext:
        """Build the context of one pool process (after the fork)."""
        settings = boot.settings
        client = connect(settings.worker_broker_url, settings.transient_window)
        device = boot.device or settings.device
        return cls(
            boot=boot,
            redis=client,
            inference=Inference.from_settings(settings, device),
            pace=UnitPace(settings.unit_seconds),
        )

    @property
    def settings(self) -> Settings:
        return self.boot.settings

    def ledger(self, job_id: str) -> JobLedger:
        return JobLedger(self.redis, job_id)

    def store(self, url: str) -> ObjectStore:
        """The object store at ``url``, opened once per process."""
        if url not in self._stores:
            self._stores[url] = open_store(url, self.settings.transient_window)
        return self._stores[url]

    def job(self, job_id: str) -> Job:
        """A job's spec (read from the ledger once per process), ledger (which keeps the
        spec, so its phase checks read it from Redis no more) and store."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self.ledger(job_id).spec()
            self._specs[job_id] = spec
            while len(self._specs) > KEPT_SPECS:
                self._specs.popitem(last=False)
        ledger = JobLedger(self.redis, job_id, spec)
        return Job(spec, ledger, JobStore.of(spec, self.store(spec.output)))

    def chunker(self, job: Job) -> Chunker:
        """The job's chunker (its tokenizer loaded once per process and job)."""
        chunker = self._chunkers.get(job.spec.job_id)
        if chunker is None:
            chunker = self._chunkers[job.spec.job_id] = chunker_for(job.spec)
            while len(self._chunkers) > 2:
                self._chunkers.popitem(last=False)
        return chunker

    def keep_model(self, job: Job, info: ModelInfo) -> None:
        """A model a unit used, in the store (once per process and job: the store's copy
        is what a rebuilt ledger's model table comes from; the ledger's own copy goes
        with the unit's record, :meth:`~shared.control.ledger.JobLedger.record_done_many`)."""
        self.once_per_job(job, f"model:{info.kind}:{info.name}", lambda: job.store.put_model(info))

    def once_per_job(self, job: Job, what: str, write: Callable[[], None]) -> None:
        """Run ``write`` the first time this process does ``what`` for the job (what a
        worker records beside the job's shards: the models it used, a vocabulary)."""
        key = (job.spec.job_id, what)
        if key not in self._kept:
            write()
            self._kept[key] = None
            while len(self._kept) > KEPT_SPECS * 8:
                self._kept.popitem(last=False)


_BOOT = "embed_fleet_boot"
_CONTEXT = "embed_fleet_context"


def attach_boot(app: Any, boot: WorkerBoot) -> None:
    setattr(app, _BOOT, boot)


def boot_of(app: Any) -> WorkerBoot | None:
    boot: WorkerBoot | None = getattr(app, _BOOT, None)
    return boot


def attach(app: Any, context: WorkerContext) -> None:
    setattr(app, _CONTEXT, context)


def context_of(app: Any) -> WorkerContext:
    """The context of the worker process running ``app``'s tasks; built on first use
    where no ``worker_process_init`` ran (a solo pool, a test calling a task)."""
    context: WorkerContext | None = getattr(app, _CONTEXT, None)
    if context is None:
        boot = boot_of(app) or WorkerBoot(settings=Settings.from_env())
        context = WorkerContext.start(boot)
        attach(app, context)
    return context
