"""ExportRuntime: streams the job's artifacts to the store, then the manifest, last.

Artifacts are written record by record to a local temporary file while their sha256,
byte count and record count are taken, then uploaded in one piece (multipart for large
files), so memory stays flat however large the collection. ``manifest.json`` goes up
only after every artifact is in place: its presence means the job's data is complete.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import msgspec

from shared.ledger import JobLedger
from shared.models import BM25
from shared.schemas import (
    FORMAT_VERSION,
    Artifact,
    BatchFailure,
    ChunkBatch,
    ChunkRecord,
    Counts,
    CrossEncoderRerankRun,
    FusedGroup,
    LatencySummary,
    Manifest,
    Metrics,
    Missing,
    ProducerReport,
    Qrels,
    RankingMetrics,
    RerankShard,
    RerankStats,
    RetrievalSpec,
    SparseInferenceRun,
)
from shared.storage import JobLayout, ObjectStore, open_store
from workers.aggregate import query_groups, read_queries
from workers.evaluation import evaluate
from workers.results_export import RankingCollector, query_result, rerank_run
from workers.retrieval import JobShards
from workers.sparse_export import BM25Statistics, SparseRunBuilder, rounded


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


class ExportRuntime:
    """Writes one job's ``chunks.jsonl`` and ``manifest.json``.

    Running it twice writes the same bytes to the same keys, so a redelivered export
    task is harmless.
    """

    def __init__(self, ledger: JobLedger, store: ObjectStore | None = None) -> None:
        self.ledger = ledger
        self.spec = ledger.spec()
        self.store = store or open_store(self.spec.output)
        self.layout = JobLayout(self.spec.collection, self.spec.job_id)
        self.shards = JobShards(self.store, self.spec)

    def run(self) -> Manifest:
        started = time.time()
        failed = {f.batch_id: f for stage in self.spec.stages for f in self.ledger.failures(stage)}
        batch_ids = [b for b in self.ledger.staged_batches() if b not in failed]
        missing = [self._missing(failure) for failure in failed.values()]
        self.bm25 = self._bm25_statistics(batch_ids)
        self.sparse_run = SparseRunBuilder(self.spec.sparse_models) if self.sparse else None
        self.rerank_run: CrossEncoderRerankRun | None = None
        self.metrics: Metrics | None = None
        artifacts: list[Artifact] = []
        with tempfile.TemporaryDirectory(prefix="embed-fleet-export-") as tmp:
            path = Path(tmp) / "chunks.jsonl"
            with path.open("wb") as handle:
                chunks = ArtifactWriter(handle)
                for batch_id in batch_ids:
                    self._write_batch(self.shards.batch(batch_id), chunks)
            chunks_key = self.layout.artifact("chunks.jsonl")
            self.store.put_file(chunks_key, path)
            artifacts.append(chunks.artifact(chunks_key))
            if self.spec.retrieval is not None:
                artifacts += self._write_results(Path(tmp), self.spec.retrieval, missing)
        producer = self.ledger.producer_report()
        assert producer is not None, "export runs only after the producer sealed the job"
        stages = self._stages(producer)
        artifacts.append(self._write_metrics(stages))
        manifest = self._manifest(artifacts, missing, started, producer, stages)
        # Last write of the job: readers take the manifest's presence as "complete".
        self.store.put_bytes(
            self.layout.manifest, msgspec.json.format(msgspec.json.encode(manifest), indent=2)
        )
        return manifest

    @property
    def sparse(self) -> bool:
        return "sparse" in self.spec.stages

    def _bm25_statistics(self, batch_ids: list[str]) -> BM25Statistics | None:
        """First pass over the sparse shards: merge every batch's BM25 statistics."""
        if not self.sparse or BM25 not in self.spec.sparse_models:
            return None
        planned = self.shards.bm25()
        if planned is not None:  # merged by the retrieve phase's plan step: same numbers
            return planned
        return self.shards.merge_bm25(batch_ids)

    def _sparse_vectors(self, batch: ChunkBatch) -> list[dict[str, dict[str, float]]] | None:
        if self.sparse_run is None:
            return None
        shard = self.shards.sparse(batch.batch_id)
        if shard.chunk_ids != [c.chunk_id for c in batch.chunks]:
            raise RuntimeError(f"sparse shard {batch.batch_id} does not match its chunk batch")
        self.sparse_run.add_shard(shard)
        vectors: list[dict[str, dict[str, float]]] = [{} for _ in batch.chunks]
        for model, rows in shard.rows.items():
            for position, row in enumerate(rows):
                if model == BM25 and self.bm25 is not None:
                    exported = self.bm25.weights(row)
                else:
                    exported = rounded(row)
                self.sparse_run.add_vector(model, row, exported)
                if row.source != "missing":
                    vectors[position][model] = exported
        return vectors

    def _missing(self, failure: BatchFailure) -> Missing:
        """What a failed batch leaves out; its chunk ids if its staged batch is readable
        (the failure may be that it is not)."""
        try:
            ids = [chunk.chunk_id for chunk in self.shards.batch(failure.batch_id).chunks]
        except Exception:
            ids = []
        return Missing(
            stage=failure.stage, batch_id=failure.batch_id, reason=failure.reason, chunk_ids=ids
        )

    def _write_batch(self, batch: ChunkBatch, out: ArtifactWriter) -> None:
        shard = self.shards.dense(batch.batch_id)
        if shard.chunk_ids != [c.chunk_id for c in batch.chunks]:
            raise RuntimeError(f"dense shard {batch.batch_id} does not match its chunk batch")
        # float32 -> Python float is exact; JSON then holds each float32 value exactly.
        matrices = {name: m.to_numpy().tolist() for name, m in shard.vectors.items()}
        sparse = self._sparse_vectors(batch)
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

    def _sparse_run(self, stages: dict[str, LatencySummary]) -> SparseInferenceRun | None:
        if self.sparse_run is None:
            return None
        return self.sparse_run.build(
            self.ledger.models(), self.ledger.reports("sparse"), stages["sparse"], self.bm25
        )

    def _write_results(
        self, tmp: Path, retrieval: RetrievalSpec, missing: list[Missing]
    ) -> list[Artifact]:
        """``results.jsonl`` (one line per query, final order); with judgements, the
        retrieval quality that ``metrics.json`` will carry."""
        queries = read_queries(self.ledger, self.shards)
        reranked = retrieval.rerank_model is not None and retrieval.rerank_top > 0
        failed_reranks = {f.batch_id: f for f in self.ledger.failures("rerank")}
        missing += [self._missing(f) for f in self.ledger.failures("retrieve")]
        missing += [self._missing(f) for f in failed_reranks.values()]
        stats: list[RerankStats] = []
        collector = RankingCollector()
        path = tmp / "results.jsonl"
        with path.open("wb") as handle:
            results = ArtifactWriter(handle)
            for group_id, _ in query_groups(self.spec, queries):
                data = self.store.get_bytes(self.layout.fused(group_id))
                group = msgspec.msgpack.decode(data, type=FusedGroup)
                scores: dict[str, list[float | None]] = {}
                if reranked and group_id not in failed_reranks:
                    data = self.store.get_bytes(self.layout.reranked(group_id))
                    shard = msgspec.msgpack.decode(data, type=RerankShard)
                    scores = shard.scores
                    stats.append(shard.stats)
                for query in group.queries:
                    result = query_result(query, scores.get(query.query_id))
                    collector.add(query, result, reranked)
                    results.write(result)
        key = self.layout.artifact("results.jsonl")
        self.store.put_file(key, path)
        artifacts = [results.artifact(key)]
        if reranked:
            models = [m for m in self.ledger.models() if m.kind == "rerank"]
            self.rerank_run = rerank_run(
                stats,
                models[0] if models else None,
                len(queries),
                LatencySummary.from_reports(self.ledger.reports("rerank")),
            )
        if self.store.exists(self.layout.qrels):
            qrels = msgspec.msgpack.decode(self.store.get_bytes(self.layout.qrels), type=Qrels)
            rankings, evaluator = evaluate(qrels.judgements, collector.runs)
            self.metrics = Metrics(
                job_id=self.spec.job_id,
                collection=self.spec.collection,
                qrels=retrieval.qrels_source or "",
                queries_judged=max((m.queries for m in rankings.values()), default=0),
                rankings=rankings,
                fusion=retrieval.fusion,
                weights=retrieval.weights,
                evaluator=evaluator,
            )
        return artifacts

    def _stages(self, producer: ProducerReport) -> dict[str, LatencySummary]:
        """Every stage's figures, summed from the units its workers recorded."""
        stages: dict[str, LatencySummary] = {"produce": producer.latency}
        for stage in self.spec.stages:  # the collection's batches (queries are tiny)
            reports = [r for r in self.ledger.reports(stage) if r.kind == "documents"]
            stages[stage] = LatencySummary.from_reports(reports)
        if self.spec.retrieval is not None:
            stages["retrieve"] = LatencySummary.from_reports(self.ledger.reports("retrieve"))
        if self.rerank_run is not None:
            stages["rerank"] = self.rerank_run.latency
        return stages

    def _write_metrics(self, stages: dict[str, LatencySummary]) -> Artifact:
        """``metrics.json``: the stages' figures, and retrieval quality with judgements."""
        metrics = self.metrics or Metrics(job_id=self.spec.job_id, collection=self.spec.collection)
        metrics.stages = stages
        body = msgspec.json.format(msgspec.json.encode(metrics), indent=2) + b"\n"
        key = self.layout.artifact("metrics.json")
        self.store.put_bytes(key, body)
        return Artifact(
            key=key,
            bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            records=1,
            content_type="application/json",
        )

    def _manifest(
        self,
        artifacts: list[Artifact],
        missing: list[Missing],
        started: float,
        producer: ProducerReport,
        stages: dict[str, LatencySummary],
    ) -> Manifest:
        chunks = artifacts[0]
        elapsed = time.time() - started
        stages["export"] = LatencySummary.from_samples([elapsed], chunks.records, elapsed)
        return Manifest(
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
            sparse_run=self._sparse_run(stages),
            rerank_run=self.rerank_run,
            metrics=self._metrics(),
        )

    def _metrics(self) -> dict[str, RankingMetrics] | None:
        return self.metrics.rankings if self.metrics else None
