"""The Celery app as both sides see it, and the two ways work is published.

The producer publishes by task *name* (``send_task``), so it never imports worker code;
workers register their tasks on the app this module builds. Task names and queues come
from the pipeline table (:mod:`shared.control.pipeline`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar, cast

from celery import Celery

from shared.control import fairness, pipeline
from shared.control.ledger import RETRY_CAP_S, RETRY_FIRST_S, JobLedger, retries_for
from shared.control.pipeline import PhaseName
from shared.control.redis_urls import celery_broker
from shared.control.settings import Settings
from shared.records import serializer
from shared.records.schemas import BatchKind, EncodeBatch, JobSpec, JobStep, UnitMessage

Unit = TypeVar("Unit", bound=UnitMessage)


def make_app(settings: Settings) -> Celery:
    """Build the fleet's Celery app.

    Reliability: a task is acknowledged only after it ran (``acks_late``), a worker
    killed mid-task hands it back (``reject_on_worker_lost``), each worker process
    reserves one task at a time (prefetch 1), and no result backend is used because the
    job ledger is the source of truth.
    """
    serializer.register_serializer()
    broker, transport = celery_broker(settings.worker_broker_url)
    app = Celery("embed_fleet", broker=broker, set_as_current=False)
    transport["visibility_timeout"] = settings.visibility_timeout
    # Ten priority lists per queue, the highest taken first: how jobs take turns
    # (shared.control.fairness).
    transport["priority_steps"] = list(range(fairness.LEVELS))
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


def fan_out(
    app: Celery,
    ledger: JobLedger,
    spec: JobSpec,
    phase: PhaseName,
    units: Sequence[Unit],
    variant: Callable[[Unit], str] | None = None,
) -> int:
    """Start ``phase`` with ``units``, the one rule of every planning step: the phase's
    total is set before any unit is sent (so no unit can finish a phase that does not
    yet know its size), a phase without units hands on to the next step at once, and
    then each unit goes to its stage's queue. ``variant``: which of the stage's tasks a
    unit goes to (a retrieve group's retriever). A stage whose messages hold several
    units (``units_per_message``) gets them gathered in order; the phase still counts
    each. Returns how many units were sent."""
    if ledger.open_phase(phase, len(units)):
        advance(app, spec, phase)
    send_units(app, ledger, spec, gathered(units), variant)
    return len(units)


def gathered(units: Sequence[Unit]) -> list[Unit]:
    """Consecutive units of a stage whose messages hold several, as one message per
    ``units_per_message`` of them (the first unit's message, for all); other units as
    they are."""
    out: list[Unit] = []
    run: list[Unit] = []

    def close() -> None:
        if run:
            several = len(run) > 1
            out.append(cast(Unit, run[0].of_units([u.unit for u in run])) if several else run[0])
            run.clear()

    for unit in units:
        size = pipeline.stage(unit.stage).units_per_message
        if run and (run[0].stage != unit.stage or len(run) >= size):
            close()
        run.append(unit)
        if size == 1:
            close()
    close()
    return out


def send_units(
    app: Celery,
    ledger: JobLedger,
    spec: JobSpec,
    units: Sequence[Unit],
    variant: Callable[[Unit], str] | None = None,
) -> None:
    """Publish units of a job, each to its stage's queue at the priority level of its
    place in the job (``shared.control.fairness``); ``variant``: which of a stage's
    tasks a unit goes to. One ledger round trip per stage for their places."""
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit.stage] = counts.get(unit.stage, 0) + 1
    places = {stage: ledger.claim_ordinals(stage, count) for stage, count in counts.items()}
    for unit in units:
        ordinal = places[unit.stage]
        places[unit.stage] += 1
        level = fairness.level(spec.priority, ordinal)
        send_unit(app, unit, variant(unit) if variant else "", level)


def send_unit(app: Celery, message: UnitMessage, variant: str = "", level: int = 0) -> None:
    """Publish one unit of a stage to the queue of its task at a priority ``level``
    (``variant``: which of a stage's tasks, e.g. the retriever of a retrieve group)."""
    route = pipeline.stage(message.stage).route(variant)
    app.send_task(route.task, args=[message], queue=route.queue, priority=level)


@dataclass
class _Gathering:
    """The batches one encode stage's next message will hold."""

    stage: pipeline.Stage
    unit_tokens: int
    batch_ids: list[str] = field(default_factory=list)
    tokens: int = 0
    # The most batches the next message holds: 1 for the first, then twice the last.
    next_batches: int = 1

    def full(self) -> bool:
        return self.tokens >= self.unit_tokens or len(self.batch_ids) >= min(
            self.next_batches, pipeline.UNIT_MAX_BATCHES
        )

    def take(self, spec: JobSpec, kind: BatchKind) -> EncodeBatch:
        """The message of the gathered batches; the next one may hold twice as many."""
        batch_ids = self.batch_ids
        first = EncodeBatch(job_id=spec.job_id, stage=self.stage.name, unit=batch_ids[0], kind=kind)
        self.next_batches = 2 * len(batch_ids)
        self.batch_ids, self.tokens = [], 0
        return first.of_units(batch_ids)


class EncodeUnits:
    """The encode units of batches as they are staged, one message per stage and unit.

    A stage whose unit is one batch (a CPU stage) gets a message per batch at once; a
    GPU stage's batches are gathered until they hold the stage's ``unit_tokens``
    (:data:`~shared.control.pipeline.GPU_UNIT_TOKENS`) or
    :data:`~shared.control.pipeline.UNIT_MAX_BATCHES`,
    then sent as one message. Leaving the ``with`` block sends what is gathered; after
    an error nothing more is sent (the unit that stages is retried, stages the same
    batches under the same ids and sends the same messages). Staging is deterministic,
    so a redelivered chunk unit gathers the same batches again.

    The first message of a range holds its first batch alone, and each next one at most
    twice as many as the last (1, 2, 4, ... up to the unit): a worker starts on a range,
    and loads its model, while the range is still being chunked, instead of waiting for
    a whole unit's batches to be staged: a unit of 32 model batches is most of a range
    (the README demo's one range of 15 batches takes about 4.5 s to chunk on a 2-core
    CPU, at its chunk stage's 418 chunks/s), and a worker without a pace of its own
    takes one batch of its first message anyway (``workers.runtime.pace``).
    """

    def __init__(self, app: Celery, ledger: JobLedger, spec: JobSpec, kind: BatchKind) -> None:
        self.app = app
        self.ledger = ledger
        self.spec = spec
        self.kind = kind
        self._stages = [
            _Gathering(stage, stage.unit_tokens(spec))
            for stage in pipeline.job_stages(spec, "encode")
        ]

    def __enter__(self) -> EncodeUnits:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.flush()

    def add(self, batch_id: str, tokens: int) -> None:
        """A batch was staged (``tokens``: its chunks' tokens)."""
        for gathering in self._stages:
            gathering.batch_ids.append(batch_id)
            gathering.tokens += tokens
            if gathering.full():
                self._send(gathering)

    def flush(self) -> None:
        """Send every stage's gathered batches."""
        for gathering in self._stages:
            if gathering.batch_ids:
                self._send(gathering)

    def _send(self, gathering: _Gathering) -> None:
        send_units(self.app, self.ledger, self.spec, [gathering.take(self.spec, self.kind)])


def gathered_again(spec: JobSpec, units: Sequence[Unit], chunks: dict[str, int]) -> list[Unit]:
    """Units sent again (a phase ``resume`` re-drives), in messages as their stages
    gather them when first sent, not one a message: a resumed GPU stage or reranker
    would otherwise pay a message's fixed cost for every staged batch or query group.

    A stage whose messages hold several units (rerank) gets :func:`gathered`. An encode
    stage that gathers staged batches by their tokens (a GPU's) gets its own rule, at
    full size from the first message (everything is staged already), each batch counted
    at its chunks (``chunks``, the ledger's) times the job's ``chunk_tokens``: the most
    it can hold, as the ledger keeps no token counts, so a message holds at most what a
    first send's did. Other units go as they are."""

    def by_tokens(unit: Unit) -> BatchKind | None:
        """The kind of an encode batch whose stage gathers by tokens, else None."""
        stage = pipeline.stage(unit.stage)
        return unit.kind if isinstance(unit, EncodeBatch) and stage.unit_tokens(spec) else None

    out: list[Unit] = []
    for (name, kind), run in itertools.groupby(units, lambda u: (u.stage, by_tokens(u))):
        if kind is None:
            out += gathered(list(run))
            continue
        stage = pipeline.stage(name)
        gathering = _Gathering(
            stage, stage.unit_tokens(spec), next_batches=pipeline.UNIT_MAX_BATCHES
        )
        for batch_id in (batch_id for unit in run for batch_id in unit.units):
            gathering.batch_ids.append(batch_id)
            gathering.tokens += chunks.get(batch_id, 0) * spec.chunk_tokens
            if gathering.full():
                out.append(cast(Unit, gathering.take(spec, kind)))
        if gathering.batch_ids:
            out.append(cast(Unit, gathering.take(spec, kind)))
    return out


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
        step.route.task,
        args=[JobStep(job_id=spec.job_id, step=step.name)],
        queue=step.route.queue,
        priority=fairness.step_level(spec.priority),
    )
