"""The pipeline, defined once: its phases, the stages that do their units, the Celery
tasks and queues that run them, and the aggregator steps between phases.

::

    phase     stages: what a unit is, where it runs          opened by      then
    validate  validate (a read range; queue prepare)          the producer   plan_dedupe
    dedupe    dedupe (an id partition; queue prepare)         plan_dedupe    plan_chunk
    chunk     chunk (a read range; queue prepare)             plan_chunk     seal
    encode    dense  (staged batches; queue dense)            seal (or the   plan_retrieve or
              sparse (a staged batch; queue sparse)           producer)      plan_export
    retrieve  retrieve (a group of shards; dense or sparse)   plan_retrieve  plan_fuse
    fuse      fuse (a run of query groups; queue aggregate)   plan_fuse      plan_rerank
    rerank    rerank (a group of queries; queue rerank)       plan_rerank    plan_export
    export    export (a group of batches -> one part file)    plan_export    finish

The first three prepare the collection on the fleet (``--prepare-on fleet``, the
default): every record validated, duplicate ids found across ranges, then chunked and
staged; a chunk unit enqueues its batches' encode units as it stages them, so encoding
starts before chunking ends, and ``seal`` counts the batches once every range is chunked.
A chunk unit also claims its chunks' texts in the ledger: a chunk whose text an earlier
chunk of the job holds is served that chunk's vectors, not encoded, with no stage of its
own (:mod:`shared.records.served_rows`).
A job prepared by its producer (``--prepare-on producer``) starts at ``encode``. A job
that reuses an earlier job's vectors (``--reuse``) does its matching on the same three
phases, with no stage of its own: validate units also index the earlier job's parts,
dedupe units (at least one) join them with the new ids, and chunk units copy the
earlier vectors beside each batch they stage (``workers.prepare.reuse``).

A phase is complete when every unit of each of its stages is accounted for (done, or
failed after retries); the caller that finds it so first wins its guard and enqueues
the step that opens the next phase the job has, or, after the last, ``finish`` (the
results, the metrics and, last, the manifest). The ledger
(:mod:`shared.control.ledger`) keeps the counts; this table says what they mean. Routes, the
phase hand-off, the task hooks and the live view all read it, so adding a stage is one
:class:`Stage` entry here plus its task in ``workers.tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from shared.records.schemas import (
    EncodeBatch,
    ExportPart,
    FuseGroup,
    JobSpec,
    JobStatus,
    JobStep,
    PrepareUnit,
    RerankGroup,
    RetrieveGroup,
    UnitMessage,
)

PhaseName = Literal["validate", "dedupe", "chunk", "encode", "retrieve", "fuse", "rerank", "export"]
StepName = Literal[
    "plan_dedupe",
    "plan_chunk",
    "seal",
    "plan_retrieve",
    "plan_fuse",
    "plan_rerank",
    "plan_export",
    "finish",
    "resume",
]

QUEUE_PREPARE = "prepare"
QUEUE_DENSE = "dense"
QUEUE_SPARSE = "sparse"
QUEUE_RERANK = "rerank"
QUEUE_AGGREGATE = "aggregate"
QUEUES = (QUEUE_DENSE, QUEUE_RERANK, QUEUE_SPARSE, QUEUE_PREPARE, QUEUE_AGGREGATE)
"""Every queue of the fleet: GPU work, CPU work, then the aggregators' steps."""


class Route(NamedTuple):
    """A Celery task and the queue its messages go to."""

    task: str
    queue: str


@dataclass(frozen=True)
class Stage:
    """A kind of unit that workers do, counted unit by unit in the ledger.

    Attributes:
        name: The stage's name in the ledger, reports, spans and the live view.
        phase: The phase whose completion waits for this stage's units.
        routes: The task running one unit, by variant: ``""`` for a stage with one
            task; the retrieve stage has one per encode stage it searches.
        message: The task message's type.
        counts: What the live view's bar counts: the job's ``chunks`` (per-batch stages)
            or the stage's ``tasks``.
        applies: Whether a job has this stage at all.
        runs_models: Whether its units run torch models (and so take a share of the
            host's cores before each unit).
        failure_ends_job: A unit that keeps failing fails the job at once (preparing:
            a collection with a range missing is not worth encoding); otherwise the job
            goes on without it and ends ``partial``.
        unit_tokens: For a per-batch stage, how many tokens of staged chunks one of its
            messages gathers (several staged batches; see :data:`GPU_UNIT_TOKENS`), or
            0: one batch a message.
        units_per_message: How many of a planned stage's units one message holds
            (:data:`RERANK_UNIT_GROUPS`; 1 for most); a worker takes as many as its pace
            allows and sends the rest back.
    """

    name: str
    phase: PhaseName
    routes: dict[str, Route]
    message: type[UnitMessage]
    counts: Literal["chunks", "tasks"]
    applies: Callable[[JobSpec], bool]
    runs_models: bool = True
    failure_ends_job: bool = False
    unit_tokens: Callable[[JobSpec], int] = lambda spec: 0
    units_per_message: int = 1

    def route(self, variant: str = "") -> Route:
        return self.routes[variant]


@dataclass(frozen=True)
class Step:
    """An aggregator step: one task per job, between two phases (or at the end).

    Attributes:
        status: The job's status from the moment the step is due.
    """

    name: StepName
    route: Route
    status: JobStatus
    message: type[JobStep] = JobStep


@dataclass(frozen=True)
class Phase:
    """A set of units that must all be accounted for before the job moves on.

    Attributes:
        opened_by: The step that plans the phase's units (``None``: the producer,
            which stages the encode phase's batches itself).
        status: The job's status while the phase's units run.
        total_field: The ledger's state field holding how many units the phase has.
        applies: Whether a job has this phase.
        fed_early: Its units are enqueued while the phase before still runs (the chunk
            units enqueue the encode batches they stage), so re-driving an earlier phase
            keeps what this one recorded.
    """

    name: PhaseName
    opened_by: StepName | None
    status: JobStatus
    total_field: str
    applies: Callable[[JobSpec], bool]
    fed_early: bool = False


def _always(spec: JobSpec) -> bool:
    """Every job."""
    return True


def _fleet_prepares(spec: JobSpec) -> bool:
    """A job prepared on the fleet (`--prepare-on fleet`, the default)."""
    return spec.prepare_on == "fleet"


def _has_queries(spec: JobSpec) -> bool:
    """A job with queries."""
    return spec.retrieval is not None


def _has_sparse(spec: JobSpec) -> bool:
    """A job with sparse models."""
    return "sparse" in spec.stages


def _has_rerank(spec: JobSpec) -> bool:
    """A job with queries and a rerank model."""
    return spec.retrieval is not None and spec.retrieval.rerank_model is not None


GPU_UNIT_TOKENS = 32 * 32_768
"""What one message of a GPU stage holds by default: 32 model batches at the GPU's
padded-token budget (``workers.inference.devices``), about 6,400 Cranfield chunks (at
most :data:`UNIT_MAX_BATCHES` staged batches).

Measured with a model whose forward costs almost nothing, at the GPU's budget, on a
2-core CPU (``bench/feed.py``): a message of 13 staged batches (1,664 chunks) took the
worker 66 ms, of which the model 25 ms; the rest (the broker's round trips and the
task's events, the ledger, reading the batches and writing their shards) is paid per
message and per batch. At eight model batches a message the fleet ran at 21,900
chunks/s, at 32 at 26,900. A GPU encoding MiniLM at 20,000 chunks/s spends about 0.3 s
on such a message, so a retry re-encodes a fraction of a second, well inside the
visibility timeout; a slower worker takes only what it encodes in about 2.5 s
(``EMBED_FLEET_UNIT_SECONDS``) and hands the rest back (``workers.runtime.pace``), so a
message never holds a CPU for minutes. CPU stages keep one batch a message, so a slow
model spreads over many workers and a worker's share of the cores is looked at often
(``workers.runtime.threads``)."""

# At most this many staged batches in one message, however few tokens they hold (a
# batch of 128 queries holds only a few thousand): a unit's reads stay bounded.
UNIT_MAX_BATCHES = 64

RERANK_UNIT_GROUPS = 16
"""Query groups in one rerank message (at the default 16 queries a group and top 50,
12,800 pairs). A message's fixed cost (the broker, the ledger, reading the fused groups,
writing the scores) was about 28 ms on a 2-core CPU, as long as scoring a group's 800
pairs with a model whose forward costs almost nothing: at one group a message the fleet
reached half of what the same worker scores in one process (``bench/feed.py``). A GPU
scoring a real CrossEncoder at 10,000 pairs/s spends about 1.3 s on a full message; a
CPU worker takes only what it scores in ``EMBED_FLEET_UNIT_SECONDS`` (one group, for a
real model) and sends the rest back (``workers.runtime.pace``)."""


def _gpu_unit(spec: JobSpec) -> int:
    return spec.unit_tokens


def _sparse_unit(spec: JobSpec) -> int:
    """SPLADE on a GPU gathers as dense does; on the CPU (the default) one batch."""
    return spec.unit_tokens if spec.sparse_device != "cpu" else 0


def _per_batch(
    name: str,
    task: str,
    queue: str,
    applies: Callable[[JobSpec], bool],
    unit_tokens: Callable[[JobSpec], int],
) -> Stage:
    """An encode stage: every staged batch (documents and queries) goes through it."""
    return Stage(
        name,
        "encode",
        {"": Route(task, queue)},
        EncodeBatch,
        "chunks",
        applies,
        unit_tokens=unit_tokens,
    )


def _prepare(name: PhaseName, task: str) -> Stage:
    """A prepare stage (its own phase): CPU work on the collection, one unit per read
    range or id partition."""
    route = Route(f"embed_fleet.prepare.{task}", QUEUE_PREPARE)
    return Stage(name, name, {"": route}, PrepareUnit, "tasks", _fleet_prepares, False, True)


STAGES: tuple[Stage, ...] = (
    _prepare("validate", "validate_range"),
    _prepare("dedupe", "dedupe_ids"),
    _prepare("chunk", "chunk_range"),
    _per_batch("dense", "embed_fleet.dense.embed_batch", QUEUE_DENSE, _always, _gpu_unit),
    _per_batch(
        "sparse", "embed_fleet.sparse.encode_batch", QUEUE_SPARSE, _has_sparse, _sparse_unit
    ),
    Stage(
        name="retrieve",
        phase="retrieve",
        routes={
            "dense": Route("embed_fleet.dense.retrieve", QUEUE_DENSE),
            "sparse": Route("embed_fleet.sparse.retrieve", QUEUE_SPARSE),
        },
        message=RetrieveGroup,
        counts="tasks",
        applies=_has_queries,
        runs_models=False,
    ),
    Stage(
        name="fuse",
        phase="fuse",
        routes={"": Route("embed_fleet.aggregate.fuse_group", QUEUE_AGGREGATE)},
        message=FuseGroup,
        counts="tasks",
        applies=_has_queries,
        runs_models=False,
    ),
    Stage(
        name="rerank",
        phase="rerank",
        routes={"": Route("embed_fleet.rerank.rerank_group", QUEUE_RERANK)},
        message=RerankGroup,
        counts="tasks",
        applies=_has_rerank,
        units_per_message=RERANK_UNIT_GROUPS,
    ),
    Stage(
        name="export",
        phase="export",
        routes={"": Route("embed_fleet.aggregate.export_part", QUEUE_AGGREGATE)},
        message=ExportPart,
        counts="chunks",
        applies=_always,
        runs_models=False,
    ),
)

STEPS: tuple[Step, ...] = (
    Step("plan_dedupe", Route("embed_fleet.aggregate.plan_dedupe", QUEUE_AGGREGATE), "preparing"),
    Step("plan_chunk", Route("embed_fleet.aggregate.plan_chunk", QUEUE_AGGREGATE), "preparing"),
    Step("seal", Route("embed_fleet.aggregate.seal", QUEUE_AGGREGATE), "running"),
    Step(
        "plan_retrieve", Route("embed_fleet.aggregate.plan_retrieve", QUEUE_AGGREGATE), "retrieving"
    ),
    Step("plan_fuse", Route("embed_fleet.aggregate.plan_fuse", QUEUE_AGGREGATE), "fusing"),
    Step("plan_rerank", Route("embed_fleet.aggregate.plan_rerank", QUEUE_AGGREGATE), "reranking"),
    Step("plan_export", Route("embed_fleet.aggregate.plan_export", QUEUE_AGGREGATE), "exporting"),
    Step("finish", Route("embed_fleet.aggregate.finish_job", QUEUE_AGGREGATE), "exporting"),
    # Not between two phases: `embed-collections resume` sends it to re-drive a job from
    # its first unfinished phase (workers.aggregate.resume).
    Step("resume", Route("embed_fleet.aggregate.resume_job", QUEUE_AGGREGATE), "resuming"),
)

PHASES: tuple[Phase, ...] = (
    Phase("validate", None, "preparing", "total:validate", _fleet_prepares),
    Phase("dedupe", "plan_dedupe", "preparing", "total:dedupe", _fleet_prepares),
    Phase("chunk", "plan_chunk", "preparing", "total:chunk", _fleet_prepares),
    # Sealed (its total set) by `seal`, or by the producer when it prepares the job.
    Phase("encode", "seal", "running", "total_batches", _always, fed_early=True),
    Phase("retrieve", "plan_retrieve", "retrieving", "total:retrieve", _has_queries),
    Phase("fuse", "plan_fuse", "fusing", "total:fuse", _has_queries),
    # plan_rerank opens the rerank phase whether or not the job reranks: with no
    # reranker it opens it with no units, and the phase is complete at once.
    Phase("rerank", "plan_rerank", "reranking", "total:rerank", _has_queries),
    # Every job ends with its chunks written as parts, in parallel, before `finish`.
    Phase("export", "plan_export", "exporting", "total:export", _always),
)

# The phases that prepare a collection on the fleet (before any batch is encoded).
PREPARE_PHASES: tuple[PhaseName, ...] = ("validate", "dedupe", "chunk")

_STAGES = {s.name: s for s in STAGES}
_STEPS = {s.name: s for s in STEPS}
_PHASES = {p.name: p for p in PHASES}


def stage(name: str) -> Stage:
    """The stage of that name (``KeyError`` for an unknown one: a programming error)."""
    return _STAGES[name]


def step(name: StepName) -> Step:
    return _STEPS[name]


def phase(name: PhaseName) -> Phase:
    return _PHASES[name]


def job_stages(spec: JobSpec, phase_name: PhaseName | None = None) -> list[Stage]:
    """The stages a job has (of one phase, or all), in pipeline order."""
    return [s for s in STAGES if s.applies(spec) and (phase_name is None or s.phase == phase_name)]


def job_queues(spec: JobSpec) -> list[str]:
    """The queues a job's units and steps go to, in the fleet's queue order (a stage's
    variant counts where the job has the stage it is named for: the sparse retriever
    only with sparse models)."""
    stages = job_stages(spec)
    names = {s.name for s in stages}
    used = {
        route.queue
        for s in stages
        for variant, route in s.routes.items()
        if not variant or variant in names
    }
    used |= {s.route.queue for s in STEPS}
    return [queue for queue in QUEUES if queue in used]


def next_step(spec: JobSpec, after: PhaseName) -> Step:
    """The step to enqueue once phase ``after`` is complete: the opener of the next
    phase the job has, else ``finish``."""
    names = [p.name for p in PHASES]
    for later in PHASES[names.index(after) + 1 :]:
        if later.applies(spec) and later.opened_by is not None:
            return step(later.opened_by)
    return step("finish")


def routes() -> dict[str, str]:
    """Celery task name -> queue, for every task of the pipeline."""
    out = {route.task: route.queue for s in STAGES for route in s.routes.values()}
    out.update({s.route.task: s.route.queue for s in STEPS})
    return out
