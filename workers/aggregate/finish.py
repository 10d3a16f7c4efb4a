"""The job's last step: ``results.jsonl``, ``metrics.json``, ``report.html`` and, last,
``manifest.json``.

The chunks are already written, as parts, by the export phase (``workers.aggregate.
export``); this step reads what each part recorded (its artifact, its sparse tally),
writes the query results, the figures and the report, then the manifest, which goes up
only after every artifact is in place: its presence means the job's data is complete.
Then ``work/`` is deleted, unless the job keeps it.

Each step takes what it needs and returns what it made; :meth:`Finisher.run` is the
whole order of things, read top to bottom.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from shared.control import pipeline
from shared.control.ledger import JobLedger
from shared.inputs.models import BM25
from shared.records.job_store import JobLayout, JobStore
from shared.records.logs import get_logger
from shared.records.schemas import (
    FORMAT_VERSION,
    Artifact,
    BatchFailure,
    BatchReport,
    ChunksLayout,
    Counts,
    CrossEncoderRerankRun,
    ExportedPart,
    ExportPlan,
    JobSpec,
    LatencySummary,
    Manifest,
    Metrics,
    Missing,
    ProducerReport,
    RerankStats,
    RetrievalSpec,
    SparseInferenceRun,
    Vocabulary,
)
from workers.aggregate.changes import changes
from workers.aggregate.export import vocabulary_json
from workers.aggregate.fuse import fused_groups, query_groups
from workers.aggregate.parts import JsonlWriter, column_names
from workers.aggregate.report import render_report
from workers.aggregate.results import RankingCollector, query_result, rerank_run
from workers.aggregate.sparse_run import SparseRunBuilder
from workers.ranking.evaluation import evaluate
from workers.ranking.sparse_weights import BM25Statistics, collection_bm25

log = get_logger("finish")


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


class Finisher:
    """Writes one job's ``results.jsonl``, ``metrics.json`` and ``report.html``, then
    ``manifest.json``, then deletes ``work/`` (unless the job keeps it).

    Running it twice writes the same bytes to the same keys, so a redelivered step is
    harmless.
    """

    def __init__(self, ledger: JobLedger, store: JobStore) -> None:
        self.ledger = ledger
        self.spec: JobSpec = ledger.spec()
        self.store = store

    def run(self) -> Manifest:
        failed = {f.batch_id: f for stage in self.spec.stages for f in self.ledger.failures(stage)}
        missing = [self._missing(failure) for failure in failed.values()]
        plan = self.store.export_plan()
        lost_parts = {f.batch_id: f for f in self.ledger.failures("export")}
        missing += [self._missing(f, plan) for f in lost_parts.values()]
        parts = [
            self.store.exported_part(part.unit)
            for part in plan.parts
            if part.unit not in lost_parts
        ]
        exported = sum(part.artifact.records for part in parts)
        bm25 = collection_bm25(self.store) if BM25 in self.spec.sparse_models else None
        with tempfile.TemporaryDirectory(prefix="embed-fleet-results-") as tmp:
            results = (
                self._write_results(Path(tmp), self.spec.retrieval)
                if self.spec.retrieval is not None
                else None
            )
        layout = self._layout(parts)
        artifacts = [part.artifact for part in parts] + self._vocabulary_artifacts(layout)
        artifacts += [results.artifact] if results else []
        missing += results.missing if results else []
        rerank = results.rerank_run if results else None
        producer = self.ledger.producer_report()
        assert producer is not None, "finish runs only after the producer sealed the job"
        reports = self._unit_reports(rerank)
        stages = self._stages(producer, rerank, reports)
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
                chunks_exported=exported,
                batches=producer.batches,
                empty_documents=len(producer.empty_documents),
                skipped_records=producer.skipped_count,
                failed_batches=len(missing),
                encoded=dict(sum((Counter(part.encoded) for part in parts), Counter())),
            ),
            stages=stages,
            artifacts=artifacts,
            missing=missing,
            empty_documents=producer.empty_documents,
            skipped_records=producer.skipped_records,
            created_at=self.spec.created_at,
            finished_at=time.time(),
            sparse_run=self._sparse_run(parts, stages, bm25, reports.get("sparse", [])),
            rerank_run=rerank,
            metrics=results.quality.rankings if results and results.quality else None,
            chunks=layout,
            changes=changes(self.spec, self.store, parts),
        )
        # The report shows the manifest, so it is drawn from it, then listed in it.
        report = write_report(self.store, manifest, metrics, reports)
        manifest.artifacts += [report] if report else []
        # Last write of the job: readers take the manifest's presence as "complete".
        self.store.put_manifest(manifest)
        return manifest

    def _layout(self, parts: list[ExportedPart]) -> ChunksLayout:
        """What the parts hold and where each vector is (see ``ChunksLayout``)."""
        sparse = self.spec.sparse_models if self._sparse else []
        parquet = self.spec.export.format == "parquet"
        dense = [m.name for m in self.ledger.models() if m.kind == "dense"]
        ordered = [m for m in self.spec.dense_models if m in dense] + [
            m for m in dense if m not in self.spec.dense_models
        ]
        return ChunksLayout(
            format=self.spec.export.format,
            parts=[part.artifact.key for part in parts],
            dense_columns=(
                {c: m for m, c in column_names("dense", ordered).items()} if parquet else {}
            ),
            sparse_columns=(
                {c: m for m, c in column_names("sparse", sparse).items()} if parquet else {}
            ),
            vocabularies=(
                {m: self.store.layout.artifact(JobLayout.vocabulary_name(m)) for m in sparse}
                if parquet
                else {}
            ),
            model_keys={
                m.name: m.key
                for m in self.ledger.models()
                if m.key and (m.kind == "dense" or m.name in sparse)
            },
        )

    def _vocabulary_artifacts(self, layout: ChunksLayout) -> list[Artifact]:
        """The vocabularies ``plan_export`` wrote (same bytes, so their records here)."""
        out = []
        for model, key in layout.vocabularies.items():
            vocabulary = self.store.vocabulary(model) or Vocabulary(model=model, terms=[])
            body = vocabulary_json(vocabulary)
            out.append(
                Artifact(
                    key=key,
                    bytes=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    records=len(vocabulary.terms),
                    content_type="application/json",
                )
            )
        return out

    def _sparse_run(
        self,
        parts: list[ExportedPart],
        stages: dict[str, LatencySummary],
        bm25: BM25Statistics | None,
        reports: list[BatchReport],
    ) -> SparseInferenceRun | None:
        """The manifest's ``sparse_run``, summed from every part's tally."""
        if not self._sparse:
            return None
        run = SparseRunBuilder(self.spec.sparse_models)
        for part in parts:
            if part.sparse is not None:
                run.merge(part.sparse)
        return run.build(self.ledger.models(), reports, stages["sparse"], bm25)

    @property
    def _sparse(self) -> bool:
        return "sparse" in self.spec.stages

    def _missing(self, failure: BatchFailure, plan: ExportPlan | None = None) -> Missing:
        """What a failed unit leaves out: an encode stage's batch or an export part lists
        its chunk ids, from the ledger's record of the staging (the failure may be that
        the staged object is gone). A retrieve, fuse or rerank group has no chunks of
        its own."""
        chunk_ids: list[str] = []
        phase = pipeline.stage(failure.stage).phase
        if phase == "encode":
            chunk_ids = self.ledger.staged_chunk_ids(failure.batch_id)
        elif phase == "export" and plan is not None:
            for part in plan.parts:
                if part.unit == failure.batch_id:
                    for batch_id in part.batch_ids:
                        chunk_ids += self.ledger.staged_chunk_ids(batch_id)
        return Missing(
            stage=failure.stage,
            batch_id=failure.batch_id,
            reason=failure.reason,
            chunk_ids=chunk_ids,
        )

    # --- results.jsonl ---------------------------------------------------------------------

    def _write_results(self, tmp: Path, retrieval: RetrievalSpec) -> ResultsOutcome:
        """``results.jsonl`` (one line per query, final order); with judgements, the
        retrieval quality that ``metrics.json`` will carry."""
        queries = self.store.queries(self.ledger.staged_query_batches())
        reranked = retrieval.rerank_model is not None and retrieval.rerank_top > 0
        failed_reranks = {f.batch_id: f for f in self.ledger.failures("rerank")}
        missing = [self._missing(f) for f in self.ledger.failures("retrieve")]
        missing += [self._missing(f) for f in self.ledger.failures("fuse")]
        missing += [self._missing(f) for f in failed_reranks.values()]
        # A fuse unit that kept failing fused none of its query groups: they have no
        # results (its failure, under `missing`, says why).
        fused = set(fused_groups(self.ledger, self.spec, queries))
        stats: list[RerankStats] = []
        collector = RankingCollector()
        path = tmp / "results.jsonl"
        with path.open("wb") as handle:
            out = JsonlWriter(handle)
            for group_id, _ in query_groups(self.spec, queries):
                if group_id not in fused:
                    continue
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

    def _unit_reports(self, rerank: CrossEncoderRerankRun | None) -> dict[str, list[BatchReport]]:
        """Every stage's units as its workers recorded them, in pipeline order, read from
        the ledger once: the figures, the sparse run and the report all use them."""
        names = [
            s.name for s in pipeline.job_stages(self.spec) if s.phase in pipeline.PREPARE_PHASES
        ]
        names += self.spec.stages
        names += ["retrieve", "fuse"] if self.spec.retrieval is not None else []
        names += ["rerank"] if rerank is not None else []
        return {name: self.ledger.reports(name) for name in [*names, "export"]}

    def _stages(
        self,
        producer: ProducerReport,
        rerank: CrossEncoderRerankRun | None,
        units: dict[str, list[BatchReport]],
    ) -> dict[str, LatencySummary]:
        """Every stage's figures, summed from the units its workers recorded."""
        stages: dict[str, LatencySummary] = {"produce": producer.latency}
        for prepare in pipeline.job_stages(self.spec):
            if prepare.phase in pipeline.PREPARE_PHASES:  # the fleet prepared the collection
                stages[prepare.name] = LatencySummary.from_reports(units[prepare.name])
        for stage in self.spec.stages:
            reports = units[stage]
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
            stages["retrieve"] = LatencySummary.from_reports(units["retrieve"])
            stages["fuse"] = LatencySummary.from_reports(units["fuse"])
        if rerank is not None:
            stages["rerank"] = rerank.latency
        stages["export"] = LatencySummary.from_reports(units["export"])
        return stages

    def _write_metrics(self, metrics: Metrics) -> Artifact:
        """``metrics.json``: the stages' figures, and retrieval quality with judgements."""
        body = msgspec.json.format(msgspec.json.encode(metrics), indent=2) + b"\n"
        return put_document(self.store, "metrics.json", body, "application/json")


def write_report(
    store: JobStore,
    manifest: Manifest,
    metrics: Metrics,
    reports: Mapping[str, Sequence[BatchReport]],
) -> Artifact | None:
    """``report.html`` (see :mod:`workers.aggregate.report`), or ``None`` when it could
    not be drawn: the report is a view of the figures, not the job's data, so a chart
    that fails costs the report (with a warning saying why), never the job. Writing it
    fails as any artifact's write does."""
    try:
        body = render_report(manifest, metrics, reports).encode()
    except Exception as error:
        fields = {"job_id": manifest.job_id, "error": f"{type(error).__name__}: {error}"}
        log.warning("report.html not written: drawing it failed", extra={"fields": fields})
        return None
    return put_document(store, "report.html", body, "text/html")


def put_document(store: JobStore, name: str, body: bytes, content_type: str) -> Artifact:
    """Write a one-record artifact (a JSON document, a page) and describe it."""
    return Artifact(
        key=store.put_artifact(name, body),
        bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        records=1,
        content_type=content_type,
    )
