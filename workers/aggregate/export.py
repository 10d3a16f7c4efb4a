"""ExportRuntime: streams the job's artifacts to the store, then the manifest, last.

Artifacts are written record by record to a local temporary file while their sha256,
byte count and record count are taken, then uploaded in one piece (multipart for large
files), so memory stays flat however large the collection. ``manifest.json`` goes up
only after every artifact is in place: its presence means the job's data is complete.

Each step takes what it needs and returns what it made; :meth:`ExportRuntime.run` is
the whole order of things, read top to bottom.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from shared import pipeline
from shared.job_store import JobStore
from shared.ledger import JobLedger
from shared.models import BM25
from shared.schemas import (
    FORMAT_VERSION,
    Artifact,
    BatchFailure,
    BM25Params,
    ChunkBatch,
    ChunkRecord,
    Counts,
    CrossEncoderRerankRun,
    JobSpec,
    LatencySummary,
    Manifest,
    Metrics,
    Missing,
    ProducerReport,
    RerankStats,
    RetrievalSpec,
)
from workers.aggregate.fuse import query_groups
from workers.aggregate.results import RankingCollector, query_result, rerank_run
from workers.aggregate.sparse_run import SparseRunBuilder
from workers.ranking.evaluation import evaluate
from workers.ranking.sparse_weights import BM25Statistics, collection_bm25, merge_bm25, rounded


class ArtifactWriter:
    """A JSONL file being written: counts records, bytes and the sha256 as it goes."""

    def __init__(self, handle: IO[bytes], content_type: str = "application/x-ndjson") -> None:
        self.handle = handle
        self.content_type = content_type
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.records = 0
        self._encoder = msgspec.json.Encoder()

    def write(self, record: Any) -> None:
        line = self._encoder.encode(record) + b"\n"
        self.handle.write(line)
        self.digest.update(line)
        self.bytes += len(line)
        self.records += 1

    def artifact(self, key: str) -> Artifact:
        return Artifact(
            key=key,
            bytes=self.bytes,
            sha256=self.digest.hexdigest(),
            records=self.records,
            content_type=self.content_type,
        )


@dataclass
class ResultsOutcome:
    """What writing ``results.jsonl`` produced besides the file itself.

    Attributes:
        artifact: ``results.jsonl``.
        missing: Retrieve and rerank units that failed.
        rerank_run: The manifest's ``rerank_run`` (when the job reranked).
        quality: Retrieval quality per ranking (when the job had judgements).
    """

    artifact: Artifact
    missing: list[Missing]
    rerank_run: CrossEncoderRerankRun | None
    quality: Metrics | None


class ExportRuntime:
    """Writes one job's ``chunks.jsonl`` (and ``results.jsonl``, ``metrics.json``), then
    ``manifest.json``.

    Running it twice writes the same bytes to the same keys, so a redelivered export
    task is harmless.
    """

    def __init__(self, ledger: JobLedger, store: JobStore) -> None:
        self.ledger = ledger
        self.spec: JobSpec = ledger.spec()
        self.store = store

    def run(self) -> Manifest:
        started = time.time()
        failed = {f.batch_id: f for stage in self.spec.stages for f in self.ledger.failures(stage)}
        batch_ids = [b for b in self.ledger.staged_batches() if b not in failed]
        missing = [self._missing(failure) for failure in failed.values()]
        bm25 = self._bm25_statistics(batch_ids)
        sparse_run = SparseRunBuilder(self.spec.sparse_models) if self._sparse else None
        with tempfile.TemporaryDirectory(prefix="embed-fleet-export-") as tmp:
            chunks = self._write_chunks(Path(tmp), batch_ids, bm25, sparse_run)
            results = (
                self._write_results(Path(tmp), self.spec.retrieval)
                if self.spec.retrieval is not None
                else None
            )
        artifacts = [chunks, *([results.artifact] if results else [])]
        missing += results.missing if results else []
        rerank = results.rerank_run if results else None
        producer = self.ledger.producer_report()
        assert producer is not None, "export runs only after the producer sealed the job"
        stages = self._stages(producer, rerank, chunks.records, started)
        metrics = (results.quality if results else None) or Metrics(
            job_id=self.spec.job_id, collection=self.spec.collection
        )
        metrics.stages = stages
        artifacts.append(self._write_metrics(metrics))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            job_id=self.spec.job_id,
            collection=self.spec.collection,
            status="partial" if missing else "complete",
            spec=self.spec,
            models=self.ledger.models(),
            counts=Counts(
                documents=producer.documents,
                chunks=producer.chunks,
                chunks_exported=chunks.records,
                batches=producer.batches,
                empty_documents=len(producer.empty_documents),
                skipped_records=producer.skipped_count,
                failed_batches=len(missing),
            ),
            stages=stages,
            artifacts=artifacts,
            missing=missing,
            empty_documents=producer.empty_documents,
            skipped_records=producer.skipped_records,
            created_at=self.spec.created_at,
            finished_at=time.time(),
            sparse_run=(
                sparse_run.build(
                    self.ledger.models(), self.ledger.reports("sparse"), stages["sparse"], bm25
                )
                if sparse_run is not None
                else None
            ),
            rerank_run=rerank,
            metrics=results.quality.rankings if results and results.quality else None,
        )
        # Last write of the job: readers take the manifest's presence as "complete".
        self.store.put_manifest(manifest)
        return manifest

    @property
    def _sparse(self) -> bool:
        return "sparse" in self.spec.stages

    def _bm25_statistics(self, batch_ids: list[str]) -> BM25Statistics | None:
        """The collection's BM25 statistics: as the retrieve phase's plan step merged
        them (same numbers), else merged now from every batch's sparse shard."""
        if not self._sparse or BM25 not in self.spec.sparse_models:
            return None
        return collection_bm25(self.store) or merge_bm25(
            self.store, self.spec.bm25 or BM25Params(), batch_ids
        )

    def _missing(self, failure: BatchFailure) -> Missing:
        """What a failed unit leaves out: an encode stage's batch lists its chunk ids,
        from the ledger's record of the staging (the failure may be that the staged
        object is gone). A retrieve or rerank group has no chunks of its own."""
        chunk_ids: list[str] = []
        if pipeline.stage(failure.stage).phase == "encode":
            chunk_ids = self.ledger.staged_chunk_ids(failure.batch_id)
        return Missing(
            stage=failure.stage,
            batch_id=failure.batch_id,
            reason=failure.reason,
            chunk_ids=chunk_ids,
        )

    # --- chunks.jsonl --------------------------------------------------------------------

    def _write_chunks(
        self,
        tmp: Path,
        batch_ids: list[str],
        bm25: BM25Statistics | None,
        sparse_run: SparseRunBuilder | None,
    ) -> Artifact:
        path = tmp / "chunks.jsonl"
        with path.open("wb") as handle:
            out = ArtifactWriter(handle)
            for batch_id in batch_ids:
                self._write_batch(self.store.batch(batch_id), out, bm25, sparse_run)
        return out.artifact(self.store.upload_artifact("chunks.jsonl", path))

    def _write_batch(
        self,
        batch: ChunkBatch,
        out: ArtifactWriter,
        bm25: BM25Statistics | None,
        sparse_run: SparseRunBuilder | None,
    ) -> None:
        shard = self.store.dense(batch.batch_id)
        if shard.chunk_ids != [c.chunk_id for c in batch.chunks]:
            raise RuntimeError(f"dense shard {batch.batch_id} does not match its chunk batch")
        # float32 -> Python float is exact; JSON then holds each float32 value exactly.
        matrices = {name: m.to_numpy().tolist() for name, m in shard.vectors.items()}
        sparse = self._sparse_vectors(batch, bm25, sparse_run) if sparse_run else None
        for row, chunk in enumerate(batch.chunks):
            out.write(
                ChunkRecord(
                    chunk_id=chunk.chunk_id,
                    doc_id=chunk.doc_id,
                    chunk_index=chunk.index,
                    text=chunk.text,
                    span=chunk.span,
                    metadata=chunk.metadata,
                    dense={name: rows[row] for name, rows in matrices.items()},
                    sparse=sparse[row] if sparse is not None else None,
                )
            )

    def _sparse_vectors(
        self, batch: ChunkBatch, bm25: BM25Statistics | None, sparse_run: SparseRunBuilder
    ) -> list[dict[str, dict[str, float]]]:
        shard = self.store.sparse(batch.batch_id)
        if shard.chunk_ids != [c.chunk_id for c in batch.chunks]:
            raise RuntimeError(f"sparse shard {batch.batch_id} does not match its chunk batch")
        sparse_run.add_shard(shard)
        vectors: list[dict[str, dict[str, float]]] = [{} for _ in batch.chunks]
        for model, rows in shard.rows.items():
            for position, row in enumerate(rows):
                exported = bm25.weights(row) if model == BM25 and bm25 else rounded(row)
                sparse_run.add_vector(model, row, exported)
                if row.source != "missing":
                    vectors[position][model] = exported
        return vectors

    # --- results.jsonl ---------------------------------------------------------------------

    def _write_results(self, tmp: Path, retrieval: RetrievalSpec) -> ResultsOutcome:
        """``results.jsonl`` (one line per query, final order); with judgements, the
        retrieval quality that ``metrics.json`` will carry."""
        queries = self.store.queries(self.ledger.staged_query_batches())
        reranked = retrieval.rerank_model is not None and retrieval.rerank_top > 0
        failed_reranks = {f.batch_id: f for f in self.ledger.failures("rerank")}
        missing = [self._missing(f) for f in self.ledger.failures("retrieve")]
        missing += [self._missing(f) for f in failed_reranks.values()]
        stats: list[RerankStats] = []
        collector = RankingCollector()
        path = tmp / "results.jsonl"
        with path.open("wb") as handle:
            out = ArtifactWriter(handle)
            for group_id, _ in query_groups(self.spec, queries):
                group = self.store.fused(group_id)
                scores: dict[str, list[float | None]] = {}
                if reranked and group_id not in failed_reranks:
                    shard = self.store.reranked(group_id)
                    scores = shard.scores
                    stats.append(shard.stats)
                for query in group.queries:
                    result = query_result(query, scores.get(query.query_id))
                    collector.add(query, result, reranked)
                    out.write(result)
        artifact = out.artifact(self.store.upload_artifact("results.jsonl", path))
        rerank: CrossEncoderRerankRun | None = None
        if reranked:
            models = [m for m in self.ledger.models() if m.kind == "rerank"]
            rerank = rerank_run(
                stats,
                models[0] if models else None,
                len(queries),
                LatencySummary.from_reports(self.ledger.reports("rerank")),
            )
        qrels = self.store.qrels()
        quality = None
        if qrels is not None:
            rankings, evaluator = evaluate(qrels.judgements, collector.runs)
            quality = Metrics(
                job_id=self.spec.job_id,
                collection=self.spec.collection,
                qrels=retrieval.qrels_source or "",
                queries_judged=max((m.queries for m in rankings.values()), default=0),
                rankings=rankings,
                fusion=retrieval.fusion,
                weights=retrieval.weights,
                evaluator=evaluator,
            )
        return ResultsOutcome(artifact, missing, rerank, quality)

    # --- figures -------------------------------------------------------------------------

    def _stages(
        self,
        producer: ProducerReport,
        rerank: CrossEncoderRerankRun | None,
        exported: int,
        started: float,
    ) -> dict[str, LatencySummary]:
        """Every stage's figures, summed from the units its workers recorded, and the
        export's own (so far: everything but the metrics and the manifest)."""
        stages: dict[str, LatencySummary] = {"produce": producer.latency}
        for stage in self.spec.stages:
            reports = self.ledger.reports(stage)
            # Throughput and latency: the collection's batches (queries are tiny).
            summary = LatencySummary.from_reports([r for r in reports if r.kind == "documents"])
            # Model activity: every unit's, since a query batch may be the one that
            # loaded or hydrated the model.
            summary.model_loads = sum(r.model_loads for r in reports)
            summary.hydrations = sum(r.hydrations for r in reports)
            summary.evictions = sum(r.evictions for r in reports)
            summary.oom_count += self.ledger.failed_try_ooms(stage)
            stages[stage] = summary
        if self.spec.retrieval is not None:
            stages["retrieve"] = LatencySummary.from_reports(self.ledger.reports("retrieve"))
        if rerank is not None:
            stages["rerank"] = rerank.latency
        elapsed = time.time() - started
        stages["export"] = LatencySummary.from_samples([elapsed], exported, elapsed)
        return stages

    def _write_metrics(self, metrics: Metrics) -> Artifact:
        """``metrics.json``: the stages' figures, and retrieval quality with judgements."""
        body = msgspec.json.format(msgspec.json.encode(metrics), indent=2) + b"\n"
        return Artifact(
            key=self.store.put_artifact("metrics.json", body),
            bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            records=1,
            content_type="application/json",
        )
