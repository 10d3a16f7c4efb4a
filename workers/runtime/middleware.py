"""Cross-cutting task behaviour: one task base class and named hooks, in one ordered list.

In the spirit of dramatiq's middleware, a task body only does its stage's work and
returns what it did (a :class:`UnitOutcome`); everything around it is a hook of
:data:`MIDDLEWARE`, each with the same three points:

- ``around(unit)``: a context manager the body runs in (entered in list order);
- ``after(unit, outcome)``: once the body returned (in reverse list order);
- ``gave_up(task, payload, exc)``: once Celery's retries are spent.

The hooks, in order:

1. **Retries** are Celery's own (``autoretry_for`` with exponential backoff, set on
   :class:`FleetTask`); a message that does not validate is not retried.
2. :class:`HeapTrimming` (outermost, so it runs after everything else, done or
   failed): hands the memory the allocator kept back to the system once the process's
   RSS passed its ceiling (``workers.runtime.heap``), so a worker's memory does not grow
   with the work it has done.
3. :class:`CollectorFreezing`: after a run in which the process loaded a model,
   the objects alive then are kept out of Python's garbage collector, whose full
   collections would otherwise walk half a million of them, several times a unit
   (``workers.runtime.collector``).
4. :class:`Tracing`: the ``embed_fleet.stage.<stage>`` span around every run (a child of
   Celery's ``run`` span), with the unit's figures as attributes.
5. :class:`ModelActivity`: notes the model manager's counters, so a unit reports its
   loads, hydrations and evictions; and records in the ledger the out-of-memory errors
   of a try that failed (a retried unit's report would otherwise lose them).
6. :class:`TorchThreads`: a model stage's process takes its share of the host's cores
   among the workers that have work (``workers.runtime.threads``).
7. :class:`LedgerReporting`: skips units of a failed job, records a finished unit (and
   its models; each staged batch of a unit that encoded several) in the ledger, in one
   round trip, and, when that completes its phase, enqueues what follows; records a
   unit that kept failing so the job can still finish (``partial``), after sending each
   unit of a message of several (staged batches, query groups) again on its own, so
   that one bad unit fails alone.
8. :class:`InFlightQuota`: a job run with ``--max-in-flight N`` runs at most ``N``
   units of a stage at once; a unit over it is parked, not run, and each try that ends
   publishes the job's next parked unit (``shared.control.quotas``). After the ledger's
   hook, so a unit of a failed job is skipped, not parked.
9. :class:`Deliveries` (innermost, around the body alone): counts each delivery of a
   unit in the ledger and notes when it ends by itself, so that a delivery that never
   did is known as its worker's death; fails a unit on which the worker died
   ``EMBED_FLEET_MAX_DELIVERIES`` times in a row instead of running it again
   (``workers.runtime.deaths``, whose request class tells the ledger how the worker
   died). Innermost, so that a unit a hook skips (its job failed) is never counted.

The GPU lease is a worker-level hook, taken at worker start (``workers.runtime.gpu_lease``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
from celery import Task
from opentelemetry import trace

from shared.control import pipeline
from shared.control.celery_app import advance, send_units
from shared.control.quotas import JobQuota, ParkedUnit
from shared.control.telemetry import tracer
from shared.records import serializer
from shared.records.errors import BadInputError, EmbedFleetError
from shared.records.logs import get_logger
from shared.records.schemas import (
    BatchFailure,
    BatchReport,
    JobStep,
    Struct,
    UnitMessage,
)
from workers.runtime.collector import freeze_long_lived
from workers.runtime.context import Job, WorkerContext, context_of
from workers.runtime.deaths import (
    FleetRequest,
    WorkerDied,
    simulate_worker_death,
    unit_path,
    worker_died,
)
from workers.runtime.heap import MIB, rss
from workers.runtime.measure import (
    ATTR_BATCH_SIZE,
    ATTR_DEVICE,
    ATTR_LATENCY,
    ATTR_MODEL,
    ATTR_OOM,
    ATTR_PEAK,
    ATTR_PEAK_KIND,
    ATTR_STAGE,
    ATTR_TOKENS,
    UnitOutcome,
)
from workers.runtime.threads import balance_torch_threads, unit_finished

log = get_logger("worker")


@dataclass
class UnitRun:
    """One run of a task, as the hooks see it.

    Attributes:
        context: The worker process's context.
        task: The Celery task.
        stage: The pipeline stage (``""`` for an aggregator step).
        unit: The unit's id (the step's name for a step).
        job: The job.
        message: The validated message.
        started: When the body started.
        notes: What a hook keeps for its own ``after`` (by hook name).
        report: The ledger record of a finished unit (set by :class:`LedgerReporting`).
    """

    context: WorkerContext
    task: FleetTask
    stage: str
    unit: str
    job: Job
    message: Struct
    started: float = field(default_factory=time.time)
    notes: dict[str, Any] = field(default_factory=dict)
    report: BatchReport | None = None


class SkipUnit(Exception):
    """Raised by a hook's ``around`` to skip the body (e.g. the job failed)."""


class Middleware:
    """A named cross-cutting concern; every hook point does nothing by default."""

    name = ""

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        yield

    def after(self, unit: UnitRun, outcome: UnitOutcome | None) -> None:
        return None

    def gave_up(self, task: FleetTask, payload: dict[str, Any], exc: BaseException) -> None:
        return None


class Tracing(Middleware):
    """The stage span around every run, with the unit's figures as attributes."""

    name = "tracing"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        stage = unit.stage or "aggregate"
        attributes = {ATTR_STAGE: stage, "celery.task_name": unit.task.name}
        with tracer().start_as_current_span(f"embed_fleet.stage.{stage}", attributes=attributes):
            yield

    def after(self, unit: UnitRun, outcome: UnitOutcome | None) -> None:
        report = unit.report
        if report is None or outcome is None:
            return
        trace.get_current_span().set_attributes(
            {
                ATTR_STAGE: report.stage,
                ATTR_MODEL: ",".join(info.name for info in outcome.models),
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


class ModelActivity(Middleware):
    """The model manager's counters before the body, for the unit's report; the
    out-of-memory errors of a try that raised, into the ledger."""

    name = "model-activity"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        inference = unit.context.inference
        unit.notes[self.name] = inference.models.stats.snapshot()
        ooms_before = inference.budgets.oom_total()
        try:
            yield
        except Exception:
            lost = inference.budgets.oom_total() - ooms_before
            if lost and unit.stage:
                unit.job.ledger.record_failed_try_ooms(unit.stage, lost)
            raise


class TorchThreads(Middleware):
    """A model stage's process takes its share of the host's cores before each unit."""

    name = "torch-threads"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        if not (unit.stage and pipeline.stage(unit.stage).runs_models):
            yield
            return
        balance_torch_threads(unit.context.redis, unit.context.settings.torch_threads)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a figure of speed, never the unit's fate
                unit_finished(unit.context.redis)


class LedgerReporting(Middleware):
    """Finished units into the ledger (and the phase hand-off); given-up units too."""

    name = "ledger"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        status = unit.job.ledger.status()
        if status == "failed":
            raise SkipUnit("the job failed; nothing will read this unit's output")
        # A late copy of a unit or step of a job that is done (its message redelivered
        # after a visibility timeout, say) would hand on to a phase already run, whose
        # inputs in work/ are deleted. A finish step still runs: it deletes work/ again
        # in case its first run died doing it.
        if status == "complete" and unit.unit != "finish":
            raise SkipUnit("the job is complete; a late copy of its work changes nothing")
        yield

    def after(self, unit: UnitRun, outcome: UnitOutcome | None) -> None:
        if outcome is None or not unit.stage:
            return
        ledger = unit.job.ledger
        for info in outcome.models:
            unit.context.keep_model(unit.job, info)
        activity = unit.context.inference.models.stats.since(unit.notes.get(ModelActivity.name))
        unit.report = BatchReport(
            batch_id=unit.unit,
            stage=unit.stage,
            chunks=outcome.items,
            tokens=outcome.tokens,
            started_at=unit.started,
            finished_at=time.time(),
            worker=f"{unit.context.host}:{unit.task.request.hostname or ''}",
            device=outcome.device,
            batch_sizes=outcome.batch_sizes,
            kind=outcome.kind,
            items_missed=outcome.items_missed,
            **activity,
            # peak memory, OOM count, learned budgets: the report's fields of those names
            **dataclasses.asdict(outcome.figures),
        )
        reports = _part_reports(unit.report, outcome)
        if ledger.record_done_many(reports, outcome.models, delivery(unit.task)):
            advance(unit.task.app, unit.job.spec, pipeline.stage(unit.stage).phase)

    def gave_up(self, task: FleetTask, payload: dict[str, Any], exc: BaseException) -> None:
        job_id = payload.get("job_id")
        if not job_id:
            return
        context = context_of(task.app)
        ledger = context.ledger(job_id)
        reason = str(exc) if isinstance(exc, EmbedFleetError) else f"{type(exc).__name__}: {exc}"
        reason = reason[:2000]
        if ledger.status() in ("complete", "partial"):
            # What is done stays done: a late copy that failed after the job ended (it
            # ran while the job finished) is no failure of the job's.
            fields = {"job_id": job_id, "task": task.name, "error": reason}
            log.warning("a late copy failed after the job ended", extra={"fields": fields})
            return
        stage = payload.get("stage")
        if isinstance(exc, BadInputError) or (
            task.stage and stage and pipeline.stage(stage).failure_ends_job
        ):
            # Nothing of a job that fails while preparing is worth keeping: its
            # staged batches go with the rest of work/, the failure stays. work/ goes
            # first: once the job reads failed, `run` stops its embedded fleet, which
            # would cut a deletion still under way short.
            context.job(job_id).store.delete_work()
            ledger.fail(
                reason, context.settings.ledger_ttl, bad_input=isinstance(exc, BadInputError)
            )
            return
        several = _several_units(stage, payload) if task.stage and stage else None
        if several is not None:
            # A message of several units (staged batches, query groups) that keeps
            # failing is likely one bad unit (a chunk out of memory alone, a lost
            # object): each goes again on its own, so only a unit that fails alone is
            # recorded as failed. Each counts its deliveries afresh (the first has the
            # message's id): a unit that kills its worker alone is the one that fails.
            units = several.units
            ledger.forget_tries(several.stage, units)
            alone = [several.of_units([unit]) for unit in units]
            send_units(task.app, ledger, ledger.spec(), alone)
            fields = {"job_id": job_id, "stage": stage, "units": len(units)}
            log.warning(
                "a message kept failing; its units go again one by one",
                extra={"fields": {**fields, "error": reason}},
            )
            return
        if task.stage and stage:
            failure = BatchFailure(
                batch_id=str(payload.get("unit", "?")), stage=stage, reason=reason
            )
            if ledger.record_failed(failure, delivery(task)):
                advance(task.app, ledger.spec(), pipeline.stage(stage).phase)
        else:
            ledger.fail(f"{task.name} failed: {reason}", context.settings.ledger_ttl)


def _several_units(stage: str, payload: dict[str, Any]) -> UnitMessage | None:
    """The message of a stage's task that gave up, where it holds several units."""
    try:
        message = msgspec.convert(payload, pipeline.stage(stage).message)
    except (KeyError, msgspec.ValidationError):
        return None
    return message if len(message.units) > 1 else None


def delivery(task: FleetTask) -> str:
    """Who claims a phase guard for the message a task runs: its Celery task id, which
    a redelivery (or a retry) of the same message keeps and another copy of the unit
    does not (see ``JobLedger.record_done_many``); the unit's own name where the task
    runs without one."""
    task_id = getattr(getattr(task, "request", None), "id", None)
    return f"task:{task_id}" if task_id else ""


def _part_reports(report: BatchReport, outcome: UnitOutcome) -> list[BatchReport]:
    """The ledger's records of a unit: itself, or one per staged batch of a unit that
    encoded several. Each batch counts its own chunks and tokens and the unit's time
    (it took that long to come back); what was the unit's as a whole (its model
    batches, out-of-memory errors, model loads) goes with its first batch only, so a
    stage's sums stay what its workers did."""
    if not outcome.parts:
        return [report]
    first, *rest = outcome.parts
    head = msgspec.structs.replace(
        report,
        batch_id=first.unit,
        chunks=first.items,
        tokens=first.tokens,
        items_reused=first.reused,
    )
    return [head] + [
        msgspec.structs.replace(
            report,
            batch_id=part.unit,
            chunks=part.items,
            tokens=part.tokens,
            items_reused=part.reused,
            batch_sizes=[],
            oom_count=0,
            items_missed=0,
            model_loads=0,
            hydrations=0,
            evictions=0,
        )
        for part in rest
    ]


class CollectorFreezing(Middleware):
    """After a run in which the process loaded a model, the objects alive then are kept
    out of Python's garbage collector (``workers.runtime.collector``). Loads only: a
    model moved to its device again (a hydration, on a GPU worker that takes turns
    between models) brings no new objects, and the freeze's full collection would cost
    it a few hundred milliseconds a unit."""

    name = "collector"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        stats = unit.context.inference.models.stats
        before = stats.loads
        try:
            yield
        finally:
            if stats.loads != before:
                frozen = freeze_long_lived()
                log.debug("long-lived objects frozen", extra={"fields": {"objects": frozen}})


class HeapTrimming(Middleware):
    """After every run, done or failed, the process's RSS checked against its ceiling."""

    name = "heap"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        try:
            yield
        finally:
            heap = unit.context.heap
            before = rss() if log.isEnabledFor(logging.DEBUG) else 0
            # A message's batches, though a worker may take fewer and hand the rest
            # back: the warm-up then ends sooner, and a ceiling set too low is raised
            # by the first trim that does not bring RSS under it.
            message = unit.message
            batches = len(message.units) if isinstance(message, UnitMessage) else 1
            if heap.after_unit(batches) and before:
                fields = {"before_mib": before // MIB, "after_mib": rss() // MIB}
                log.debug("heap trimmed", extra={"fields": {**fields, "trims": heap.trims}})


class InFlightQuota(Middleware):
    """A job's cap on the units of a stage that run at once (``run --max-in-flight``):
    a unit over it is parked instead of run; a try that ends, done or failed, publishes
    the job's next parked unit of its stage again, at its own priority level."""

    name = "quota"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        limit = unit.job.spec.max_in_flight
        if not (unit.stage and limit):
            yield
            return
        quota = unit.job.ledger.quota()
        info = getattr(unit.task.request, "delivery_info", None) or {}
        parked = ParkedUnit(
            task=unit.task.name,
            level=int(info.get("priority") or 0),
            message=serializer.dumps(unit.message),
        )
        stale_after = unit.context.settings.visibility_timeout
        if not quota.admit(unit.stage, unit.unit, parked, stale_after):
            raise SkipUnit(
                f"its job runs at most {limit} units of {unit.stage} at once "
                "(run --max-in-flight): parked until one of them ends"
            )
        try:
            yield
        finally:
            _release_next(unit, quota)


def _release_next(unit: UnitRun, quota: JobQuota) -> None:
    """Publish the job's next parked unit of the stage, as its place frees up. A
    failure here leaves that unit parked with nothing to release it: the job stalls,
    which the watchdog and ``resume`` redo; the unit that ran keeps its outcome."""
    try:
        following = quota.release(unit.stage, unit.unit)
        if following is not None:
            unit.task.app.send_task(
                following.task,
                args=[serializer.loads(following.message)],
                queue=pipeline.routes()[following.task],
                priority=following.level,
            )
    except Exception as exc:
        fields = {"job_id": unit.job.spec.job_id, "stage": unit.stage, "error": repr(exc)}
        log.warning("a parked unit was not released", extra={"fields": fields})


class Deliveries(Middleware):
    """Each delivery of a unit counted as it starts, and noted when it ends by itself;
    a unit whose worker died on it too often in a row is failed, not run."""

    name = "deliveries"

    @contextlib.contextmanager
    def around(self, unit: UnitRun) -> Iterator[None]:
        ledger, settings = unit.job.ledger, unit.context.settings
        start = ledger.start_try(unit.stage, unit.unit, settings.max_deliveries)
        if not start.counted:
            raise worker_died(unit.job.spec.job_id, start.deaths, start.last_death)
        path = unit_path(unit.job.spec.collection, unit.job.spec.job_id, unit.stage, unit.unit)
        simulate_worker_death(settings.simulate_worker_death, path)
        try:
            yield
        finally:
            # Unmarked, this delivery would pass for one death too many, never more: a
            # unit that ran is not failed for it.
            with contextlib.suppress(Exception):
                ledger.end_try(unit.stage, unit.unit)


MIDDLEWARE: list[Middleware] = [
    HeapTrimming(),
    CollectorFreezing(),
    Tracing(),
    ModelActivity(),
    TorchThreads(),
    LedgerReporting(),
    InFlightQuota(),
    Deliveries(),
]
"""The hooks every fleet task runs, in order (see the module doc)."""

Body = Callable[[WorkerContext, Job, Any], "UnitOutcome | None"]


class FleetTask(Task):  # type: ignore[misc]
    """Base of every fleet task: validates the message, runs the body inside the
    hooks of :data:`MIDDLEWARE`, and retries with exponential backoff (Celery's
    ``autoretry_for``) up to ``EMBED_FLEET_MAX_RETRIES`` times.

    Subclasses (made by :func:`workers.tasks.unit_task` and ``step_task``) set
    :attr:`stage` (``""`` for an aggregator step), :attr:`message_type` and :attr:`body`.
    """

    abstract = True
    # In the worker's main process: records how a pool process that died running the
    # task ended (workers.runtime.deaths).
    Request = FleetRequest
    stage: ClassVar[str] = ""
    message_type: ClassVar[type[Struct]] = JobStep
    body: ClassVar[Body]
    autoretry_for = (Exception,)
    # Bad input is bad on every try; a unit that killed its worker each time would again.
    dont_autoretry_for = (msgspec.ValidationError, BadInputError, WorkerDied)
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True

    def execute(self, payload: dict[str, Any]) -> None:
        """Run the body of one message inside the hooks."""
        message: Any = msgspec.convert(payload, self.message_type)
        context = context_of(self.app)
        unit = UnitRun(
            context=context,
            task=self,
            stage=self.stage,
            unit=message.unit if self.stage else message.step,
            job=context.job(message.job_id),
            message=message,
        )
        try:
            with contextlib.ExitStack() as stack:
                for hook in MIDDLEWARE:
                    stack.enter_context(hook.around(unit))
                unit.started = time.time()
                outcome = type(self).body(context, unit.job, message)
                for hook in reversed(MIDDLEWARE):
                    hook.after(unit, outcome)
        except SkipUnit as skipped:
            log.info("unit skipped", extra={"fields": {"unit": unit.unit, "why": str(skipped)}})
            return
        fields = {"job_id": unit.job.spec.job_id, "stage": unit.stage, "unit": unit.unit}
        log.info("unit done", extra={"fields": fields})

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        payload = args[0] if args and isinstance(args[0], dict) else {}
        fields = {"task": self.name, "task_id": task_id, "job_id": payload.get("job_id")}
        log.error("task failed after retries", exc_info=exc, extra={"fields": fields})
        for hook in MIDDLEWARE:
            hook.gave_up(self, payload, exc)
