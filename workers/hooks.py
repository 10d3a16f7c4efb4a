"""Cross-cutting task behaviour, in one base class instead of in every task body.

Like dramatiq's middleware: retries with backoff, "a batch that keeps failing is
recorded as failed with its reason", the per-process Redis client for the ledger, the
stage span around every task run (with the unit's figures as attributes), and the
hand-off to the next phase all live here. Task bodies only do their stage's work.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, ClassVar

import msgspec
import redis
from celery import Task
from opentelemetry import trace

from shared.config import Settings
from shared.ledger import PHASE_OF, JobLedger, Phase, connect
from shared.logs import get_logger
from shared.phases import advance
from shared.schemas import BatchFailure, BatchKind, BatchReport
from shared.telemetry import tracer
from workers.measure import (
    ATTR_BATCH_SIZE,
    ATTR_DEVICE,
    ATTR_LATENCY,
    ATTR_MODEL,
    ATTR_OOM,
    ATTR_PEAK,
    ATTR_PEAK_KIND,
    ATTR_STAGE,
    ATTR_TOKENS,
    StageFigures,
)
from workers.model_manager import manager

log = get_logger("worker")
_settings = Settings.from_env()
_clients: dict[int, redis.Redis] = {}


def ledger_client() -> redis.Redis:
    """One Redis client per process (a client must not cross a fork)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = connect(_settings.worker_broker_url)
    return _clients[pid]


class FleetTask(Task):  # type: ignore[misc]
    """Base of every fleet task.

    A task raising any exception is retried with exponential backoff up to
    ``EMBED_FLEET_MAX_RETRIES`` times; a message that does not validate is not retried.
    After the last try, :meth:`on_failure` records the batch as failed in the ledger so
    the job can still finish (``partial``) instead of waiting forever.
    """

    abstract = True
    stage: ClassVar[str] = ""
    acks_late = True
    reject_on_worker_lost = True
    autoretry_for = (Exception,)
    dont_autoretry_for = (msgspec.ValidationError,)
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = _settings.max_retries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task inside its stage span (a child of the Celery ``run`` span),
        noting the model manager's counters so the unit can report its model swaps."""
        self._models_before = manager().stats.snapshot()
        name = f"embed_fleet.stage.{self.stage or 'aggregate'}"
        with tracer().start_as_current_span(
            name, attributes={ATTR_STAGE: self.stage or "aggregate", "celery.task_name": self.name}
        ):
            return super().__call__(*args, **kwargs)

    def ledger(self, job_id: str) -> JobLedger:
        return JobLedger(ledger_client(), job_id)

    def report_done(
        self,
        ledger: JobLedger,
        *,
        unit: str,
        items: int,
        started: float,
        device: str,
        batch_sizes: list[int],
        kind: BatchKind,
        tokens: int = 0,
        figures: StageFigures | None = None,
        models: list[str] | None = None,
        items_missed: int = 0,
    ) -> BatchReport:
        """Record a finished unit of this task's stage, put its figures on the stage's
        span; if it completed its phase, start the next one."""
        figures = figures or StageFigures()
        report = BatchReport(
            batch_id=unit,
            stage=self.stage,
            chunks=items,
            tokens=tokens,
            started_at=started,
            finished_at=time.time(),
            worker=f"{socket.gethostname()}:{self.request.hostname or ''}",
            device=device,
            batch_sizes=batch_sizes,
            kind=kind,
            peak_memory_bytes=figures.peak_memory_bytes,
            peak_memory_kind=figures.peak_memory_kind,
            oom_count=figures.oom_count,
            budgets=figures.budgets,
            items_missed=items_missed,
            **manager().stats.since(getattr(self, "_models_before", None)),
        )
        describe_stage_span(report, models or [])
        if ledger.record_done(report):
            self.advance(ledger, PHASE_OF[self.stage])
        return report

    def advance(self, ledger: JobLedger, phase: Phase) -> None:
        """Start what follows ``phase``; called by whoever won its guard."""
        advance(self.app, ledger.spec(), phase)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        message = args[0] if args else {}
        job_id = message.get("job_id") if isinstance(message, dict) else None
        fields = {"task": self.name, "task_id": task_id, "job_id": job_id}
        log.error("task failed after retries", exc_info=exc, extra={"fields": fields})
        if not job_id:
            return
        ledger = self.ledger(job_id)
        reason = f"{type(exc).__name__}: {exc}"[:500]
        if self.stage:
            unit = message.get("batch_id") or message.get("group_id") or "?"
            failure = BatchFailure(batch_id=unit, stage=self.stage, reason=reason)
            if ledger.record_failed(failure):
                self.advance(ledger, PHASE_OF[self.stage])
        else:
            ledger.fail(f"{self.name} failed: {reason}", _settings.ledger_ttl)


def describe_stage_span(report: BatchReport, models: list[str]) -> None:
    """The unit's figures as attributes of the current (stage) span."""
    span = trace.get_current_span()
    span.set_attributes(
        {
            ATTR_STAGE: report.stage,
            ATTR_MODEL: ",".join(models),
            ATTR_BATCH_SIZE: report.chunks,
            ATTR_TOKENS: report.tokens,
            ATTR_LATENCY: round(report.latency_s, 6),
            ATTR_DEVICE: report.device,
            ATTR_PEAK: report.peak_memory_bytes,
            ATTR_PEAK_KIND: report.peak_memory_kind,
            ATTR_OOM: report.oom_count,
            "embed_fleet.unit": report.batch_id,
            "embed_fleet.hydrations": report.hydrations,
            "embed_fleet.evictions": report.evictions,
            "embed_fleet.model_batch_sizes": report.batch_sizes,
        }
    )


def settings() -> Settings:
    return _settings
