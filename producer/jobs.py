"""Turning a collection into a job: check everything, then hand the collection over.

By default the fleet prepares the collection (``--prepare-on fleet``): the producer cuts
it into read ranges (a seek per range, the file is not read) and enqueues one validate
unit per range; the fleet validates, finds duplicates, chunks and stages
(:mod:`workers.prepare`). So the producer's cost does not grow with the collection.

With ``--prepare-on producer`` (a source only this machine can read) the producer does
it all itself, reading the source twice: the first pass validates every record before
anything is enqueued, so a bad record under ``--on-bad-record fail`` costs no worker
time; the second chunks, stages each batch in the object store and enqueues a message
that carries only its keys.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import redis
from celery import Celery

from producer.queries import QuerySet, find_query_files, load_query_set
from shared.control.celery_app import EncodeUnits, advance, send_units
from shared.control.fairness import Priority
from shared.control.fusion_weights import default_weights, parse_weights
from shared.control.ledger import JobLedger
from shared.control.pipeline import GPU_UNIT_TOKENS
from shared.inputs import tokens
from shared.inputs.chunking import (
    Chunker,
    ChunkTally,
    chunk_batches,
    like_length_window,
    load_tokenizer,
    model_max_tokens,
)
from shared.inputs.models import BM25, resolve_model
from shared.inputs.sources import (
    MAX_LISTED_SKIPS,
    ReadProgress,
    Source,
    cut_ranges,
    documents,
    is_empty,
    listed_together,
    open_source,
)
from shared.records import ids
from shared.records.earlier_jobs import earlier_job, folder_of, refusal
from shared.records.errors import BadRecordError, EmbedFleetError, NoDocumentsError
from shared.records.job_store import JobLayout, JobStore
from shared.records.schemas import (
    DENSE_RANKING,
    QUERIES_PER_RERANK_TASK,
    BatchKind,
    BM25Params,
    Chunk,
    ChunkBatch,
    Document,
    ExportSpec,
    FieldMap,
    Fusion,
    InputLimits,
    JobRecord,
    JobSpec,
    LatencySummary,
    PrepareOn,
    PrepareUnit,
    ProducerReport,
    Qrels,
    ReadPlan,
    RetrievalSpec,
    SkippedRecord,
)
from shared.records.storage import ObjectStore, open_store


@dataclass(frozen=True)
class JobOptions:
    """What ``embed-collections run`` was asked for."""

    source: str
    output: str
    dense_models: list[str]
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    batch_chunks: int = 128
    max_batch_tokens: int | None = None
    unit_tokens: int = GPU_UNIT_TOKENS
    on_bad_record: Literal["fail", "skip"] = "fail"
    allow_empty: bool = False
    fields: FieldMap = field(default_factory=FieldMap)
    sparse_models: list[str] = field(default_factory=list)
    sparse_device: str = "cpu"
    bm25: BM25Params = field(default_factory=BM25Params)
    queries: str | None = None
    qrels: str | None = None
    no_queries: bool = False
    top_k: int = 100
    fusion: Fusion = "convex"
    alpha: float = 0.5
    fusion_weights: str | None = None
    rerank_model: str | None = None
    rerank_top: int = 50
    retrieve_chunks_per_task: int = 16384
    fuse_queries_per_task: int = 1024
    dtype: str = "auto"
    # Seconds the producer's writes to the store ride out an outage
    # (EMBED_FLEET_TRANSIENT_WINDOW); the first check of the store never waits.
    transient_window_s: float = 0.0
    export: ExportSpec = field(default_factory=ExportSpec)
    prepare_on: PrepareOn = "fleet"
    range_bytes: int = 8 * 2**20
    limits: InputLimits = field(default_factory=InputLimits)
    priority: Priority = "normal"
    max_in_flight: int = 0
    # An earlier job to take vectors from (``--reuse``): its id or its folder.
    reuse: str | None = None


# Id partitions of the fleet's duplicate check: at most one per range, and few enough
# that each unit reads a handful of small objects per range.
MAX_ID_PARTITIONS = 64


@dataclass
class Validation:
    documents: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    skipped_count: int = 0
    bytes_total: int = 0


@dataclass
class PreparedJob:
    """A job that passed every check and can be staged."""

    spec: JobSpec
    source: Source
    chunker: Chunker
    store: ObjectStore
    validation: Validation
    queries: QuerySet | None = None
    read_plan: ReadPlan | None = None  # the fleet prepares the collection

    @property
    def layout(self) -> JobLayout:
        return JobLayout(self.spec.collection, self.spec.job_id)

    @property
    def job_store(self) -> JobStore:
        return JobStore(self.store, self.spec.collection, self.spec.job_id)


def new_job_id() -> str:
    """Sortable by time, unique across producers: ``20261125-221304-9f3a1c``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def prepare(
    options: JobOptions, on_progress: Callable[[ReadProgress, int], None] | None = None
) -> PreparedJob:
    """Check the source, the output store and the models, then validate every record.

    Raises:
        EmbedFleetError: with the cause and the fix, before anything is enqueued.
    """
    source = open_source(options.source, options.fields, options.transient_window_s)
    if not options.allow_empty and is_empty(source):
        raise EmbedFleetError(
            f"{source.path} holds no documents: "
            + ("its file is empty or blank" if len(source.files) == 1 else "its files are empty"),
            "Point SOURCE at the collection's data, or pass --allow-empty to run an empty "
            "job anyway (a pipeline that may have nothing new)",
        )
    if not options.dense_models:
        raise EmbedFleetError("no dense model given", "Pass --dense-models NAME[,NAME...]")
    resolved = [resolve_model(name) for name in options.dense_models]
    sparse = [check_sparse_model(name) for name in options.sparse_models]
    tokenizer = load_tokenizer(str(resolved[0].path))
    chunk_tokens = options.chunk_tokens or model_max_tokens(resolved[0].path, tokenizer)
    chunker = Chunker(
        tokenizer, chunk_tokens, options.chunk_overlap, options.limits.max_document_chunks
    )
    if options.batch_chunks < 1 or (options.max_batch_tokens or chunk_tokens) < chunk_tokens:
        raise EmbedFleetError(
            f"--batch-chunks {options.batch_chunks} / "
            f"--max-batch-tokens {options.max_batch_tokens} "
            f"too small for {chunk_tokens}-token chunks",
            "Use --batch-chunks >= 1 and --max-batch-tokens >= --chunk-tokens",
        )
    query_set = _query_set(source, options)
    retrieval = _retrieval_spec(options, query_set, sparse) if query_set else None
    store = open_store(options.output, options.transient_window_s)
    store.check()
    reuse = _reuse_folder(options, store)
    read_plan = None
    if options.prepare_on == "fleet":
        ranges = cut_ranges(source, options.range_bytes)
        read_plan = ReadPlan(
            kind=source.kind, ranges=ranges, partitions=min(MAX_ID_PARTITIONS, len(ranges))
        )
        validation = Validation(bytes_total=source.bytes_total)
    else:
        validation = validate(source, options.on_bad_record, on_progress, options.limits)
        if validation.documents == 0 and not options.allow_empty:
            first = validation.skipped[0].named if validation.skipped else ""
            raise NoDocumentsError(str(source.path), validation.skipped_count, first)
    spec = JobSpec(
        job_id=new_job_id(),
        collection=source.name,
        source=str(source.path.resolve()),
        output=store.url,
        created_at=time.time(),
        dense_models=[r.name for r in resolved],
        chunk_tokens=chunk_tokens,
        chunk_overlap=options.chunk_overlap,
        batch_chunks=options.batch_chunks,
        max_batch_tokens=options.max_batch_tokens,
        unit_tokens=options.unit_tokens,
        on_bad_record=options.on_bad_record,
        allow_empty=options.allow_empty,
        stages=["dense", "sparse"] if sparse else ["dense"],
        sparse_models=sparse,
        sparse_device=options.sparse_device,
        bm25=options.bm25 if BM25 in sparse else None,
        retrieval=retrieval,
        dtype=options.dtype,
        export=options.export,
        prepare_on=options.prepare_on,
        fields=source.fields,
        limits=options.limits,
        priority=options.priority,
        max_in_flight=options.max_in_flight,
        reuse=reuse,
        sort_window=like_length_window(options.batch_chunks, options.export.part_rows),
    )
    return PreparedJob(spec, source, chunker, store, validation, query_set, read_plan)


def _reuse_folder(options: JobOptions, store: ObjectStore) -> str:
    """The folder of the job ``--reuse`` names ("" without it).

    Raises:
        EmbedFleetError: no such finished job, or a job prepared by its producer (the
            match runs on the fleet's prepare phases).
    """
    if not options.reuse:
        return ""
    if options.prepare_on != "fleet":
        raise EmbedFleetError(
            "--reuse needs --prepare-on fleet",
            "Drop --prepare-on producer: the fleet's prepare phases match the documents",
        )
    return folder_of(earlier_job(options.reuse, store, options.transient_window_s))


def reuse_verdict(spec: JobSpec) -> str:
    """One line on what ``--reuse`` can take, before the job starts: the earlier job,
    and which of this job's models it has vectors of (the workers take them only where
    their model's key, dtype included, is the same)."""
    job = earlier_job(spec.reuse, open_store(spec.output))
    manifest = job.manifest()
    refused = refusal(manifest)
    if refused:
        return f"reuse: none ({refused}); every chunk is encoded"
    assert manifest.chunks is not None
    keys = manifest.chunks.model_keys
    models = [*spec.dense_models, *(m for m in spec.sparse_models if m != BM25)]
    have = [m for m in models if m in keys]
    lacking = [m for m in models if m not in keys]
    line = (
        f"reuse: job {manifest.job_id} ({manifest.counts.chunks_exported:,} chunks) has "
        f"vectors of {', '.join(have) if have else 'none of these models'}"
    )
    if lacking:
        line += f"; {', '.join(lacking)} encoded afresh (not in that job)"
    return line + "; a worker takes them where its model and dtype match"


def _query_set(source: Source, options: JobOptions) -> QuerySet | None:
    queries_path, qrels_path = find_query_files(
        source, options.queries, options.qrels, options.no_queries, options.transient_window_s
    )
    if queries_path is None:
        if options.rerank_model:
            raise EmbedFleetError(
                "--enable-rerank needs queries, and none were found",
                "Pass --queries FILE (JSONL of {id, text}), or point SOURCE at a BEIR "
                "folder with queries.jsonl",
            )
        return None
    return load_query_set(queries_path, qrels_path)


def _retrieval_spec(options: JobOptions, queries: QuerySet, sparse: list[str]) -> RetrievalSpec:
    rankings = [DENSE_RANKING, *sparse]
    weights = (
        parse_weights(options.fusion_weights, rankings)
        if options.fusion_weights
        else default_weights(sparse, options.alpha)
    )
    rerank = check_model_folder(options.rerank_model, "rerank") if options.rerank_model else None
    if options.rerank_top > options.top_k:
        raise EmbedFleetError(
            f"--rerank-top {options.rerank_top} is larger than --top-k {options.top_k}",
            "Rerank at most the --top-k fused candidates",
        )
    return RetrievalSpec(
        queries_source=str(queries.path.resolve()),
        queries=len(queries.queries),
        query_batches=-(-len(queries.queries) // options.batch_chunks),
        qrels_source=str(queries.qrels_path.resolve()) if queries.qrels_path else None,
        top_k=options.top_k,
        fusion=options.fusion,
        weights=weights,
        rerank_model=rerank,
        rerank_top=options.rerank_top if rerank else 0,
        batches_per_retrieve_task=max(1, options.retrieve_chunks_per_task // options.batch_chunks),
        rerank_groups_per_fuse_task=-(-options.fuse_queries_per_task // QUERIES_PER_RERANK_TASK),
    )


ModelRole = Literal["sparse", "rerank"]
_ROLE_HELP = {
    "sparse": ("--sparse-models", "a complete SPLADE (masked-LM) model folder"),
    "rerank": ("--rerank-model", "a complete CrossEncoder (sequence-classification) folder"),
}


def check_sparse_model(name: str) -> str:
    return name if name == BM25 else check_model_folder(name, "sparse")


def check_model_folder(name: str, role: ModelRole) -> str:
    """Resolve a model and check its folder looks loadable, without loading it (the
    producer runs no model code): a config, weights and a tokenizer."""
    flag, what = _ROLE_HELP[role]
    resolved = resolve_model(name)
    folder = resolved.path
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not (folder / "config.json").is_file() or not has_weights:
        raise EmbedFleetError(
            f"{role} model {name!r} at {folder} is not loadable: it lacks config.json or "
            "weights (*.safetensors)",
            f"Point {flag} at {what}",
        )
    try:
        load_tokenizer(str(folder))
    except Exception as exc:
        raise EmbedFleetError(
            f"{role} model {name!r}: its tokenizer does not load ({type(exc).__name__})",
            f"Point {flag} at {what}",
        ) from None
    return resolved.name


def validate(
    source: Source,
    on_bad_record: Literal["fail", "skip"],
    on_progress: Callable[[ReadProgress, int], None] | None = None,
    limits: InputLimits | None = None,
) -> Validation:
    """First pass: every record parsed and checked; raises on the first bad one under
    ``fail``; under ``skip`` collects them."""
    result = Validation(bytes_total=source.bytes_total)
    progress = ReadProgress()
    for record in documents(source, on_bad_record, progress, limits):
        if isinstance(record, SkippedRecord):
            result.skipped_count += 1
            if len(result.skipped) < MAX_LISTED_SKIPS:
                result.skipped.append(record)
        else:
            result.documents += 1
        if on_progress and progress.documents % 256 == 0:
            on_progress(progress, result.bytes_total)
    if on_progress:
        on_progress(progress, result.bytes_total)
    return result


class Stager:
    """Second pass: chunk, stage batches, enqueue; then seal the job in the ledger.

    Runs in a thread of its own while the CLI follows the ledger, so workers start on
    the first batches while later ones are still being chunked. The job's record goes
    to the store first and the producer's report last, so the store alone says whether
    the job was fully submitted (see ``producer.recovery``).

    Args:
        already_staged: Resuming a job whose producer stopped while staging: these
            batches are in the store already and are not written again, and nothing is
            enqueued (the resume step that follows enqueues every unit whose output is
            missing). Chunking is deterministic, so the batch ids come out the same.
    """

    def __init__(
        self,
        job: PreparedJob,
        ledger: JobLedger,
        app: Celery,
        ledger_ttl: float = 7 * 24 * 3600,
        already_staged: set[str] | None = None,
    ) -> None:
        self.job = job
        self.store = job.job_store
        self.ledger_ttl = ledger_ttl
        self.ledger = ledger
        self.app = app
        self.already_staged = already_staged
        self.cancel = threading.Event()
        self.error: BaseException | None = None
        self.report: ProducerReport | None = None

    def run(self) -> None:
        try:
            self.report = self._run()
        except BaseException as exc:
            self.error = exc
            # Best effort: the ledger may be what failed (Redis gone, or back empty).
            with contextlib.suppress(EmbedFleetError, redis.RedisError):
                self.ledger.fail(f"producer stopped: {exc}", ttl=self.ledger_ttl)

    def _run(self) -> ProducerReport | None:
        if self.job.read_plan is not None:
            self._hand_to_fleet(self.job.read_plan)
            return None
        job, spec = self.job, self.job.spec
        started = time.time()
        progress = ReadProgress()
        latencies: list[float] = []
        tally = ChunkTally()
        batches = 0
        batch_started = time.time()

        if self.already_staged is None:
            self.store.put_job_record(
                JobRecord(spec, job.validation.documents, job.validation.bytes_total)
            )
        query_batches = self._stage_queries()

        def accepted() -> Iterator[Document]:
            for record in documents(job.source, spec.on_bad_record, progress, spec.limits):
                if self.cancel.is_set():
                    raise EmbedFleetError("interrupted", "Run the job again")
                if isinstance(record, Document):  # the rest: listed by the validation pass
                    yield record

        def too_long(record: SkippedRecord) -> None:
            if spec.on_bad_record == "fail":
                raise BadRecordError(record.path, record.line, record.reason)

        units = self._units("documents")
        runs = chunk_batches(
            job.chunker, accepted(), spec.batch_chunks, tally, too_long, spec.sort_window
        )
        for run in runs:
            chunks = run.chunks
            batch_id = ids.document_batch_id(batches)
            batch = run.staged(spec.job_id, batch_id)
            self._stage_batch(batch, units)
            self.ledger.record_staged(
                batch_id,
                len(chunks),
                progress.documents,
                progress.bytes_read,
                [chunk.chunk_id for chunk in chunks],
            )
            latencies.append(time.time() - batch_started)
            batches += 1
            batch_started = time.time()
        if units is not None:
            units.flush()
        self.ledger.record_read(progress.documents, progress.bytes_read)
        finished = time.time()
        report = ProducerReport(
            documents=tally.documents,
            chunks=tally.chunks,
            batches=batches,
            tokens=tally.tokens,
            empty_documents=tally.empty,
            skipped_records=listed_together(job.validation.skipped, tally.too_long),
            skipped_count=job.validation.skipped_count + len(tally.too_long),
            started_at=started,
            finished_at=finished,
            latency=LatencySummary.from_samples(latencies, tally.chunks, finished - started),
            queries=len(job.queries.queries) if job.queries else 0,
            query_batches=query_batches,
        )
        self.store.put_producer_report(report)
        if self.ledger.seal(report, check=self.already_staged is None):
            advance(self.app, spec, "encode")
        return report

    def _hand_to_fleet(self, plan: ReadPlan) -> None:
        """The job's record, its read plan and its queries in the store, then one
        validate unit per range: the fleet does the rest (the seal included)."""
        spec = self.job.spec
        self.store.put_job_record(JobRecord(spec, 0, self.job.validation.bytes_total))
        self.store.put_read_plan(plan)
        self._stage_queries()
        units = [
            PrepareUnit(job_id=spec.job_id, stage="validate", unit=ids.range_id(part.index))
            for part in plan.ranges
        ]
        send_units(self.app, self.ledger, spec, units)

    def _units(self, kind: BatchKind) -> EncodeUnits | None:
        """Where staged batches' encode units go (none for a resume's producer: the
        resume step that follows enqueues every unit whose output is missing)."""
        if self.already_staged is not None:
            return None
        return EncodeUnits(self.app, self.ledger, self.job.spec, kind)

    def _stage_batch(self, batch: ChunkBatch, units: EncodeUnits | None) -> None:
        """Write a batch to the store (unless a resume finds it there) and hand it to the
        encode units."""
        if self.already_staged is not None and batch.batch_id in self.already_staged:
            return
        self.store.put_batch(batch)
        if units is not None:
            staged = batch.tokens
            units.add(batch.batch_id, sum(staged.lengths) if staged else 0)

    def _stage_queries(self) -> int:
        """Stage the queries (first, so their encoding never waits behind the
        collection) and the judgements; return the number of query batches."""
        job, spec = self.job, self.job.spec
        if job.queries is None:
            return 0
        if job.queries.qrels is not None:
            self.store.put_qrels(Qrels(judgements=job.queries.qrels))
        chunker = job.chunker
        limit = spec.chunk_tokens - 2
        batches = 0
        queries = job.queries.queries
        units = self._units("queries")
        for start in range(0, len(queries), spec.batch_chunks):
            group = queries[start : start + spec.batch_chunks]
            # The ids the encoders will use, made once, as a chunk's are.
            found = chunker.tokenizer([q.text for q in group], add_special_tokens=False)
            query_ids: list[list[int]] = found["input_ids"]
            chunks = [
                Chunk(
                    chunk_id=q.id,
                    doc_id=q.id,
                    index=0,
                    text=q.text,
                    n_tokens=min(len(token_ids), limit),
                    span=(0, len(q.text)),
                )
                for q, token_ids in zip(group, query_ids, strict=True)
            ]
            batch_id = ids.query_batch_id(batches)
            staged = tokens.pack(chunker.identity, chunker.id_dtype, query_ids)
            self._stage_batch(
                ChunkBatch(job_id=spec.job_id, batch_id=batch_id, chunks=chunks, tokens=staged),
                units,
            )
            self.ledger.record_staged_queries(batch_id, len(chunks))
            batches += 1
        if units is not None:
            units.flush()
        return batches
