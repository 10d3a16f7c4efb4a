"""The fleet's tasks: one per pipeline stage (and retriever) and one per aggregator step.

Each body takes the worker context, the job and its validated message, does its stage's
work through the job's store, and returns what it did; validation, retries, spans, the
ledger and the phase hand-off are the hooks' (:mod:`workers.runtime.middleware`). Task
names and queues come from the pipeline table (:mod:`shared.control.pipeline`): a new stage is
an entry there plus a body here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shared.control import pipeline
from shared.control.celery_app import send_units
from shared.records.logs import get_logger
from shared.records.schemas import (
    ChunkBatch,
    EncodeBatch,
    ExportPart,
    FuseGroup,
    JobStep,
    PrepareUnit,
    RerankGroup,
    RetrieveGroup,
    UnitDone,
    Vocabulary,
)
from workers.app import app, settings
from workers.inference.earlier import Earlier
from workers.runtime.context import Job, WorkerContext
from workers.runtime.measure import StageFigures, UnitOutcome, UnitPart, peak_kind
from workers.runtime.middleware import Body, FleetTask

log = get_logger("tasks")


def _register(name: str, stage: str, message_type: type[Any], body: Body) -> Any:
    """One Celery task running ``body`` inside the hooks."""
    base = type(
        f"{body.__name__}_task",
        (FleetTask,),
        {"stage": stage, "message_type": message_type, "body": staticmethod(body)},
    )

    def run(self: FleetTask, payload: dict[str, Any]) -> None:
        self.execute(payload)

    run.__doc__ = body.__doc__
    return app.task(name=name, base=base, bind=True, max_retries=settings.max_retries)(run)


def unit_task(stage: str, variant: str = "") -> Callable[[Body], Body]:
    """Register a body as the task of a pipeline stage (and variant)."""

    def register(body: Body) -> Body:
        definition = pipeline.stage(stage)
        _register(definition.route(variant).task, stage, definition.message, body)
        return body

    return register


def step_task(step: pipeline.StepName) -> Callable[[Body], Body]:
    """Register a body as the task of an aggregator step."""

    def register(body: Body) -> Body:
        _register(pipeline.step(step).route.task, "", JobStep, body)
        return body

    return register


# --- prepare (the collection, on the fleet) -------------------------------------------


@unit_task("validate")
def validate_range(ctx: WorkerContext, job: Job, msg: PrepareUnit) -> UnitOutcome:
    """Parse and check every record of one read range; hand its ids to the dedupe phase."""
    from workers.prepare.validate import validate_range as validate

    window = ctx.settings.transient_window
    items = validate(job.spec, job.ledger, job.store, msg.unit, window)
    return UnitOutcome(items=items, device="cpu")


@step_task("plan_dedupe")
def plan_dedupe(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After validation: file lines of the skipped records, then the duplicate check."""
    from workers.prepare.validate import plan_dedupe as plan

    units = plan(job.ledger, job.store, app)
    log.info("dedupe planned", extra={"fields": {"job_id": msg.job_id, "tasks": units}})


@unit_task("dedupe")
def dedupe_ids(ctx: WorkerContext, job: Job, msg: PrepareUnit) -> UnitOutcome:
    """Duplicate ids across ranges, in one id partition."""
    from workers.prepare.dedupe import dedupe_partition

    window = ctx.settings.transient_window
    return UnitOutcome(items=dedupe_partition(job.spec, job.store, msg.unit, window), device="cpu")


@step_task("plan_chunk")
def plan_chunk(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After the duplicate check: each range's exclusions, then one chunk unit per range."""
    from workers.prepare.dedupe import plan_chunk as plan

    units = plan(job.ledger, job.store, app)
    log.info("chunking planned", extra={"fields": {"job_id": msg.job_id, "tasks": units}})


@unit_task("chunk")
def chunk_range(ctx: WorkerContext, job: Job, msg: PrepareUnit) -> UnitOutcome:
    """Chunk one read range and stage its batches, enqueueing their encode units."""
    from workers.prepare.chunk import chunk_range as chunk

    settings = ctx.settings
    done = chunk(
        job.spec,
        job.ledger,
        job.store,
        app,
        ctx.chunker(job),
        msg.unit,
        settings.transient_window,
        settings.text_claims,
    )
    return UnitOutcome(items=done.chunks, device="cpu", tokens=done.tokens)


@step_task("seal")
def seal(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After chunking: the report of what was read and staged; the encode phase's total."""
    from workers.prepare.chunk import seal as seal_job

    batches = seal_job(job.ledger, job.store, app)
    log.info("job sealed", extra={"fields": {"job_id": msg.job_id, "batches": batches}})


# --- encode --------------------------------------------------------------------------


def _paced(
    ctx: WorkerContext,
    job: Job,
    msg: EncodeBatch | RerankGroup,
    work: Callable[[list[str]], UnitOutcome],
) -> UnitOutcome:
    """What every stage whose messages hold several units shares (the encode stages'
    staged batches, the rerank stage's query groups): take as many of the message's
    units as this worker does in about ``EMBED_FLEET_UNIT_SECONDS``
    (:mod:`workers.runtime.pace`), do them together (``work`` reads them, runs the
    model and writes each unit's output to its deterministic key). Only then does the
    rest of the message go back to the queue, as one message: a unit that fails and is
    retried never sends it, and the message is acknowledged only once the outputs of
    what this worker took are durable (a copy redelivered after a crash sends the rest
    again: work done twice, never counted twice)."""
    units = msg.units
    taken = units[: ctx.pace.take(msg.stage, len(units))]
    loads = ctx.inference.models.stats.snapshot()
    started = time.monotonic()
    outcome = work(taken)
    if ctx.inference.models.stats.snapshot() == loads:  # a model's load is not its pace
        ctx.pace.record(msg.stage, len(taken), time.monotonic() - started)
    if rest := units[len(taken) :]:
        send_units(app, job.ledger, job.spec, [msg.of_units(rest)])
    return outcome


def _encode(
    ctx: WorkerContext,
    job: Job,
    msg: EncodeBatch,
    encode: Callable[[list[ChunkBatch]], UnitOutcome],
) -> UnitOutcome:
    """An encode unit: its staged batches read (in parallel), encoded together, and each
    batch's shard written to its deterministic key (in parallel), paced (:func:`_paced`)."""

    def work(taken: list[str]) -> UnitOutcome:
        batches = ctx.io.map(job.store.batch, taken)
        outcome = encode(batches)
        assert len(outcome.shards) == len(batches), "an encode stage returns a shard per batch"
        ctx.io.map(
            lambda pair: job.store.put_shard(msg.stage, *pair),
            list(zip(taken, outcome.shards, strict=True)),
        )
        return outcome

    return _paced(ctx, job, msg, work)


@unit_task("dense")
def embed_batch(ctx: WorkerContext, job: Job, msg: EncodeBatch) -> UnitOutcome:
    """Encode a unit's staged chunk batches with the job's dense ensemble."""
    from workers.inference import dense  # torch at import: only model workers pay for it

    spec = job.spec

    def encode(batches: list[ChunkBatch]) -> UnitOutcome:
        earlier = Earlier.read(job.store, batches)
        return dense.encode_batches(
            ctx.inference,
            batches,
            spec.dense_models,
            spec.max_batch_tokens,
            msg.kind,
            spec.dtype,
            earlier,
        )

    return _encode(ctx, job, msg, encode)


@unit_task("sparse")
def encode_sparse_batch(ctx: WorkerContext, job: Job, msg: EncodeBatch) -> UnitOutcome:
    """Sparse vectors (SPLADE, BM25 statistics) for a unit's staged chunk batches; the
    first unit of a job in a process also keeps each model's vocabulary beside the
    shards, for the Parquet export's sparse columns."""
    from workers.inference.sparse import SparseVectorGenerator

    spec = job.spec
    generator = SparseVectorGenerator(ctx.inference, spec.sparse_device, None, spec.dtype)

    def encode(batches: list[ChunkBatch]) -> UnitOutcome:
        earlier = Earlier.read(job.store, batches)
        return generator.encode_batches(batches, spec.sparse_models, msg.kind, earlier)

    outcome = _encode(ctx, job, msg, encode)
    for model, terms in generator.vocabularies.items():
        _keep_vocabulary(ctx, job, Vocabulary(model=model, terms=terms))
    return outcome


def _keep_vocabulary(ctx: WorkerContext, job: Job, vocabulary: Vocabulary) -> None:
    ctx.once_per_job(
        job, f"vocabulary:{vocabulary.model}", lambda: job.store.put_vocabulary(vocabulary)
    )


# --- retrieve ------------------------------------------------------------------------


def _retrieve(ctx: WorkerContext, job: Job, msg: RetrieveGroup) -> UnitOutcome:
    """Every query's top-k over one group of document shards, for one retriever."""
    from workers.aggregate.fuse import lists_by_fuse_unit
    from workers.ranking.retrieval import retrieve

    assert job.spec.retrieval is not None, "retrieve units exist only for jobs with queries"
    failed = {f.batch_id for f in job.ledger.failures(msg.retriever)}
    staged = job.ledger.staged_query_batches()
    queries = [b for b in staged if b not in failed]
    query_ids, hits = retrieve(
        job.store, job.spec, msg.retriever, queries, msg.batch_ids, job.spec.retrieval.top_k
    )
    # Split by fuse unit, so that each fuse unit reads only its own queries' lists.
    parts = lists_by_fuse_unit(job.spec, job.store.queries(staged), msg.unit, query_ids, hits)
    for part in parts:
        job.store.put_top_k(part)
    # Last: every output of the unit is there (what resume looks for).
    done = UnitDone(outputs=[part.fuse_unit for part in parts], items=len(query_ids))
    job.store.put_retrieved(msg.unit, done)
    return UnitOutcome(items=len(query_ids), device="cpu", kind="queries")


@unit_task("retrieve", variant="dense")
def retrieve_dense(ctx: WorkerContext, job: Job, msg: RetrieveGroup) -> UnitOutcome:
    """Dense (ensemble) top-k of every query over one group of document shards."""
    return _retrieve(ctx, job, msg)


@unit_task("retrieve", variant="sparse")
def retrieve_sparse(ctx: WorkerContext, job: Job, msg: RetrieveGroup) -> UnitOutcome:
    """Sparse top-k, per sparse model, of every query over one group of document shards."""
    return _retrieve(ctx, job, msg)


# --- rerank --------------------------------------------------------------------------


@unit_task("rerank")
def rerank_group(ctx: WorkerContext, job: Job, msg: RerankGroup) -> UnitOutcome:
    """CrossEncoder scores for the fused top candidates of a message's query groups
    (as many as this worker scores in its unit seconds, :func:`_paced`), all groups'
    pairs scored together; one shard per group."""
    from workers.inference import rerank  # torch at import: only rerank workers pay for it

    retrieval = job.spec.retrieval
    assert retrieval is not None and retrieval.rerank_model, "rerank units need a reranker"
    model = retrieval.rerank_model

    def work(taken: list[str]) -> UnitOutcome:
        groups = ctx.io.map(job.store.fused, taken)
        shards, info = rerank.rerank_fused(
            ctx.inference, groups, model, retrieval.rerank_top, job.spec.dtype
        )
        ctx.io.map(job.store.put_reranked, shards)
        stats = [shard.stats for shard in shards]
        run = stats[0]  # what the scoring call did as a whole goes with the first group
        return UnitOutcome(
            items=sum(s.pairs_asked for s in stats),
            device=info.device,
            parts=[UnitPart(s.group_id, s.stats.pairs_asked, s.stats.tokens) for s in shards],
            batch_sizes=run.batch_sizes,
            kind="queries",
            tokens=sum(s.tokens for s in stats),
            figures=StageFigures(
                peak_memory_bytes=run.peak_memory_bytes,
                peak_memory_kind=peak_kind(info.device),
                oom_count=run.oom_count,
                budgets={info.name: run.max_batch_tokens},
            ),
            models=[info],
            items_missed=sum(s.pairs_asked - s.pairs_scored for s in stats),
        )

    return _paced(ctx, job, msg, work)


# --- aggregator steps ------------------------------------------------------------------


@step_task("plan_retrieve")
def plan_retrieve(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After encoding: BM25 statistics once, then one retrieve unit per shard group."""
    from workers.aggregate.plan import plan_retrieve as plan

    units = plan(job.ledger, job.store, app)
    log.info("retrieve planned", extra={"fields": {"job_id": msg.job_id, "tasks": units}})


@step_task("plan_fuse")
def plan_fuse(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After retrieval: one fuse unit per run of query groups."""
    from workers.aggregate.fuse import plan_fuse as plan

    units = plan(job.ledger, job.store, app)
    log.info("fuse planned", extra={"fields": {"job_id": msg.job_id, "tasks": units}})


@unit_task("fuse")
def fuse_group(ctx: WorkerContext, job: Job, msg: FuseGroup) -> UnitOutcome:
    """Merge, fuse and write the candidates of one run of query groups."""
    from workers.aggregate.fuse import fuse_unit

    return UnitOutcome(items=fuse_unit(job.ledger, job.store, msg.unit), device="cpu")


@step_task("plan_rerank")
def plan_rerank(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After fusion: one rerank unit per fused query group (none without a reranker)."""
    from workers.aggregate.fuse import plan_rerank as plan

    units = plan(job.ledger, job.store, app)
    log.info("rerank planned", extra={"fields": {"job_id": msg.job_id, "tasks": units}})


@step_task("plan_export")
def plan_export(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """After the last phase with units: cut the chunks into parts, fan the export out."""
    from workers.aggregate.export import plan_export as plan

    parts = plan(job.ledger, job.store, app)
    log.info("export planned", extra={"fields": {"job_id": msg.job_id, "parts": parts}})


@unit_task("export")
def export_part(ctx: WorkerContext, job: Job, msg: ExportPart) -> UnitOutcome:
    """Write one part of the job's chunks (Parquet or JSONL) from its batches."""
    from workers.aggregate.export import write_part

    exported = write_part(job.ledger, job.store, msg)
    return UnitOutcome(items=exported.artifact.records, device="cpu")


@step_task("finish")
def finish_job(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """Write the results, the metrics and, last, the manifest; then, for a complete job,
    delete ``work/``."""
    from workers.aggregate.finish import Finisher

    status = job.ledger.status()
    if status not in ("complete", "partial"):
        manifest = Finisher(job.ledger, job.store).run()
        job.ledger.finish(manifest.status, ctx.settings.ledger_ttl)
        status = manifest.status
        log.info("job finished", extra={"fields": {"job_id": msg.job_id, "status": status}})
    # Also for a redelivered step of a finished job: its worker may have died mid-way. A
    # partial job keeps work/: `resume` takes it up from there.
    if status == "complete" and not job.spec.export.keep_work:
        job.store.delete_work()


@step_task("resume")
def resume_job(ctx: WorkerContext, job: Job, msg: JobStep) -> None:
    """Re-drive a job from its first unfinished phase (``embed-collections resume``)."""
    from workers.aggregate.resume import resume_job as resume

    resumed = resume(job.ledger, job.store, app)
    summary = (
        f"{resumed.phase}: "
        + ", ".join(f"{stage} {n} unit{'s' * (n != 1)}" for stage, n in resumed.units.items())
        if resumed.units
        else f"step {resumed.step}"
    )
    if resumed.recovered:
        summary += f" ({resumed.recovered} units found done in the store)"
    job.ledger.record_resume(summary)
    log.info("job resumed", extra={"fields": {"job_id": msg.job_id, "resumed": summary}})
