"""The fleet's Celery tasks. Each converts its message to the Struct it expects, does
its stage's work, and reports to the ledger; retries and failure live in FleetTask."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec

from shared.celery_app import TASK_EMBED_DENSE, TASK_ENCODE_SPARSE, TASK_EXPORT
from shared.logs import get_logger
from shared.schemas import BatchReport, ChunkBatch, EmbedBatch, ExportJob
from shared.storage import ObjectStore, open_store
from workers import dense
from workers.app import app
from workers.export import ExportRuntime
from workers.hooks import FleetTask, ledger_client, settings
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
    report = BatchReport(
        batch_id=msg.batch_id,
        stage=task.stage,
        chunks=len(batch.chunks),
        tokens=result.tokens,
        started_at=started,
        finished_at=time.time(),
        worker=f"{socket.gethostname()}:{task.request.hostname or ''}",
        device=result.device,
        batch_sizes=result.batch_sizes,
    )
    fields = {
        "job_id": msg.job_id,
        "batch_id": msg.batch_id,
        "stage": task.stage,
        "chunks": report.chunks,
        "latency_s": round(report.latency_s, 3),
    }
    log.info("batch encoded", extra={"fields": fields})
    if ledger.record_done(report):
        task.start_export(msg.job_id)


@app.task(name=TASK_EMBED_DENSE, base=DenseTask, bind=True)
def embed_batch(self: DenseTask, payload: dict[str, Any]) -> None:
    """Encode one staged chunk batch with the job's dense ensemble."""
    run_stage(
        self,
        payload,
        lambda batch, msg: dense.encode_batch(batch, msg.models, msg.max_batch_tokens),
    )


@app.task(name=TASK_ENCODE_SPARSE, base=SparseTask, bind=True)
def encode_sparse_batch(self: SparseTask, payload: dict[str, Any]) -> None:
    """Sparse vectors (SPLADE, BM25 statistics) for one staged chunk batch."""
    run_stage(
        self,
        payload,
        lambda batch, msg: SparseVectorGenerator(msg.device, msg.max_batch_tokens).encode(
            batch, msg.models
        ),
    )


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
