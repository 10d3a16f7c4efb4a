"""The fleet's Celery tasks. Each converts its message to the Struct it expects, does
its stage's work, and reports to the ledger; retries and failure live in FleetTask."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from shared.celery_app import (
    TASK_EMBED_DENSE,
    TASK_ENCODE_SPARSE,
    TASK_EXPORT,
    TASK_FUSE,
    TASK_PLAN_RETRIEVE,
    TASK_RERANK,
    TASK_RETRIEVE_DENSE,
    TASK_RETRIEVE_SPARSE,
)
from shared.logs import get_logger
from shared.schemas import (
    ChunkBatch,
    EmbedBatch,
    ExportJob,
    FusedGroup,
    RerankGroup,
    RetrieveGroup,
    TopKShard,
)
from shared.storage import JobLayout, ObjectStore, open_store
from workers import aggregate, dense
from workers.app import app
from workers.export import ExportRuntime
from workers.hooks import FleetTask, ledger_client, settings
from workers.measure import StageFigures, peak_kind
from workers.retrieval import JobShards, retrieve
from workers.sparse import SparseVectorGenerator
from workers.stage import StageResult, balance_torch_threads

log = get_logger("tasks")
_stores: dict[str, ObjectStore] = {}


def store_for(url: str) -> ObjectStore:
    if url not in _stores:
        _stores[url] = open_store(url)
    return _stores[url]


class DenseTask(FleetTask):
    stage = "dense"


class SparseTask(FleetTask):
    stage = "sparse"


class RetrieveTask(FleetTask):
    stage = "retrieve"


class RerankTask(FleetTask):
    stage = "rerank"


def run_stage(
    task: FleetTask,
    payload: dict[str, Any],
    encode: Callable[[ChunkBatch, EmbedBatch], StageResult],
) -> None:
    """The flow every per-batch stage shares: read the staged batch, encode it, write the
    shard to its deterministic key, then report the batch to the ledger (the last one
    to finish hands the job to the aggregator)."""
    msg = msgspec.convert(payload, EmbedBatch)
    ledger = task.ledger(msg.job_id)
    if ledger.status() == "failed":
        return  # the producer gave up on this job; nothing will read the shard
    started = time.time()
    balance_torch_threads(ledger_client())
    store = store_for(msg.store_url)
    batch = msgspec.msgpack.decode(store.get_bytes(msg.batch_key), type=ChunkBatch)
    result = encode(batch, msg)
    store.put_bytes(msg.shard_key, msgspec.msgpack.encode(result.shard))
    for info in result.models:
        ledger.record_model(info)
    report = task.report_done(
        ledger,
        unit=msg.batch_id,
        items=len(batch.chunks),
        started=started,
        device=result.device,
        batch_sizes=result.batch_sizes,
        kind=msg.kind,
        tokens=result.tokens,
        figures=result.figures,
        models=[info.name for info in result.models],
    )
    fields = {
        "job_id": msg.job_id,
        "batch_id": msg.batch_id,
        "stage": task.stage,
        "chunks": report.chunks,
        "latency_s": round(report.latency_s, 3),
    }
    log.info("batch encoded", extra={"fields": fields})


@app.task(name=TASK_EMBED_DENSE, base=DenseTask, bind=True)
def embed_batch(self: DenseTask, payload: dict[str, Any]) -> None:
    """Encode one staged chunk batch with the job's dense ensemble."""
    run_stage(
        self,
        payload,
        lambda batch, msg: dense.encode_batch(
            batch, msg.models, msg.max_batch_tokens, msg.kind, msg.dtype
        ),
    )


@app.task(name=TASK_ENCODE_SPARSE, base=SparseTask, bind=True)
def encode_sparse_batch(self: SparseTask, payload: dict[str, Any]) -> None:
    """Sparse vectors (SPLADE, BM25 statistics) for one staged chunk batch."""
    run_stage(
        self,
        payload,
        lambda batch, msg: SparseVectorGenerator(
            msg.device, msg.max_batch_tokens, msg.dtype
        ).encode(batch, msg.models, msg.kind),
    )


def run_retrieve(task: FleetTask, payload: dict[str, Any], stage: str) -> None:
    """Every query's top-k over one group of document shards, for one retriever."""
    msg = msgspec.convert(payload, RetrieveGroup)
    ledger = task.ledger(msg.job_id)
    started = time.time()
    spec = ledger.spec()
    shards = JobShards(store_for(msg.store_url), spec)
    queries = aggregate.encoded_query_batches(ledger, stage)
    query_ids, hits = retrieve(shards, stage, queries, msg.batch_ids, msg.top_k)
    shard = TopKShard(job_id=msg.job_id, group_id=msg.group_id, query_ids=query_ids, hits=hits)
    shards.store.put_bytes(shards.layout.top_k(stage, msg.group_id), msgspec.msgpack.encode(shard))
    task.report_done(
        ledger,
        unit=msg.group_id,
        items=len(query_ids),
        started=started,
        device="cpu",
        batch_sizes=[],
        kind="queries",
    )


@app.task(name=TASK_RETRIEVE_DENSE, base=RetrieveTask, bind=True)
def retrieve_dense(self: RetrieveTask, payload: dict[str, Any]) -> None:
    """Dense (ensemble) top-k of every query over one group of document shards."""
    run_retrieve(self, payload, "dense")


@app.task(name=TASK_RETRIEVE_SPARSE, base=RetrieveTask, bind=True)
def retrieve_sparse(self: RetrieveTask, payload: dict[str, Any]) -> None:
    """Sparse top-k, per sparse model, of every query over one group of document shards."""
    run_retrieve(self, payload, "sparse")


@app.task(name=TASK_RERANK, base=RerankTask, bind=True)
def rerank_group(self: RerankTask, payload: dict[str, Any]) -> None:
    """CrossEncoder scores for the fused top candidates of one group of queries."""
    msg = msgspec.convert(payload, RerankGroup)
    ledger = self.ledger(msg.job_id)
    started = time.time()
    store = store_for(msg.store_url)
    layout = JobLayout(msg.collection, msg.job_id)
    group = msgspec.msgpack.decode(store.get_bytes(layout.fused(msg.group_id)), type=FusedGroup)
    balance_torch_threads(ledger_client())
    from workers import rerank  # torch at import: only rerank workers pay for it

    shard, info = rerank.rerank_fused(group, msg, settings().rerank_batch_timeout)
    store.put_bytes(layout.reranked(msg.group_id), msgspec.msgpack.encode(shard))
    ledger.record_model(info)
    stats = shard.stats
    self.report_done(
        ledger,
        unit=msg.group_id,
        items=stats.pairs_asked,
        started=started,
        device=info.device,
        batch_sizes=stats.batch_sizes,
        kind="queries",
        tokens=stats.tokens,
        figures=StageFigures(
            peak_memory_bytes=stats.peak_memory_bytes,
            peak_memory_kind=peak_kind(info.device),
            oom_count=stats.oom_count,
            budgets={info.name: stats.max_batch_tokens},
        ),
        models=[info.name],
        items_missed=stats.pairs_asked - stats.pairs_scored,
    )


def run_aggregator_step(
    task: FleetTask, payload: dict[str, Any], step: Callable[..., int], event: str
) -> None:
    """A fan-out step of the aggregator: it gets the job and returns how many tasks it
    enqueued."""
    msg = msgspec.convert(payload, ExportJob)
    ledger = task.ledger(msg.job_id)
    tasks = step(ledger, store_for(ledger.spec().output), task.app)
    log.info(event, extra={"fields": {"job_id": msg.job_id, "tasks": tasks}})


@app.task(name=TASK_PLAN_RETRIEVE, base=FleetTask, bind=True)
def plan_retrieve(self: FleetTask, payload: dict[str, Any]) -> None:
    """After encoding: BM25 statistics once, then one retrieve task per shard group."""
    run_aggregator_step(self, payload, aggregate.plan_retrieve, "retrieve planned")


@app.task(name=TASK_FUSE, base=FleetTask, bind=True)
def fuse(self: FleetTask, payload: dict[str, Any]) -> None:
    """After retrieval: merge top-k lists, fuse rankings, fan reranking out."""
    run_aggregator_step(self, payload, aggregate.fuse_job, "rankings fused")


@app.task(name=TASK_EXPORT, base=FleetTask, bind=True)
def export_job(self: FleetTask, payload: dict[str, Any]) -> None:
    """Write the job's artifacts and, last, its manifest."""
    msg = msgspec.convert(payload, ExportJob)
    ledger = self.ledger(msg.job_id)
    if ledger.status() in ("complete", "partial"):
        return  # a redelivered export of a finished job
    manifest = ExportRuntime(ledger, store_for(ledger.spec().output)).run()
    ledger.finish(manifest.status, settings().ledger_ttl)
    log.info("job exported", extra={"fields": {"job_id": msg.job_id, "status": manifest.status}})
