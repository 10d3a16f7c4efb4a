"""``embed-collections run``: validate a collection, stage it for the fleet and follow the
job to its manifest."""

from __future__ import annotations

import contextvars
import dataclasses
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import click
import redis
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from producer.cli.app import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ByteSize,
    Detached,
    JobEnded,
    console,
    current_settings,
    embedded_fleet,
    fail,
    no_detach_without_broker,
    show_summary,
    warn,
)
from producer.cli.job import resume_main
from producer.consumers import unconsumed, unconsumed_line
from producer.follow import emit_json, follow, human_bytes
from producer.jobs import JobOptions, PreparedJob, Stager, prepare, reuse_verdict
from producer.watchdog import Watchdog
from shared.control import pipeline, telemetry
from shared.control.celery_app import make_app
from shared.control.fairness import PRIORITIES, Priority
from shared.control.ledger import JobLedger, connect
from shared.control.pipeline import GPU_UNIT_TOKENS
from shared.control.settings import DEFAULT_OUTPUT, Settings
from shared.inputs.models import (
    BUNDLED_SPLADE,
    DEFAULT_DENSE_MODEL,
    DEFAULT_RERANK_MODEL,
    DEFAULT_SPARSE_MODELS,
)
from shared.inputs.sources import ReadProgress
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.schemas import (
    DEFAULT_MAX_DOCUMENT_CHUNKS,
    DEFAULT_MAX_RECORD_BYTES,
    BM25Params,
    ExportSpec,
    FieldMap,
    InputLimits,
)


@click.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option(
    "--output",
    "-o",
    default=None,
    metavar="URL",
    help="Where artifacts go: s3://BUCKET/PREFIX (endpoint from S3_ENDPOINT_URL) or a "
    f"folder. Default: $EMBED_FLEET_OUTPUT or {DEFAULT_OUTPUT}. With a shared "
    "broker, a folder must be visible to every worker.",
)
@click.option(
    "--dense-models",
    default=DEFAULT_DENSE_MODEL,
    show_default=True,
    metavar="A,B",
    help="Comma-separated sentence-transformers models (hub names, HF-cache names or "
    "folders); every chunk is embedded by each.",
)
@click.option(
    "--chunk-tokens",
    type=click.IntRange(16),
    default=None,
    help="Tokens per chunk, counted by the first model's tokenizer, special tokens "
    "included. Default: the first model's max sequence length.",
)
@click.option(
    "--chunk-overlap",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Tokens shared by consecutive chunks of a document.",
)
@click.option(
    "--batch-chunks",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="Chunks per staged batch (one task message each).",
)
@click.option(
    "--unit-tokens",
    type=click.IntRange(0),
    default=GPU_UNIT_TOKENS,
    show_default=True,
    help="Tokens of staged chunks in one message of the dense stage (and of sparse with "
    "--sparse-device cuda/auto): several staged batches a message, so a message's fixed "
    "cost stays small beside a GPU's time on it. 0: one batch a message (sparse on the "
    "CPU always takes one).",
)
@click.option(
    "--max-batch-tokens",
    type=click.IntRange(16),
    default=None,
    help="Token budget of one model batch (batch size x longest chunk). Default: "
    "chosen by each worker for its device (4096 on CPU, 32768 on CUDA).",
)
@click.option(
    "--enable-sparse",
    is_flag=True,
    help="Add sparse vectors (queue `sparse`, CPU workers): by default the bundled "
    f"SPLADE model ({BUNDLED_SPLADE}) and BM25.",
)
@click.option(
    "--sparse-models",
    default=None,
    metavar="A,B",
    help="Comma-separated sparse models: SPLADE models (hub names, HF-cache names or "
    "folders) and/or `bm25`. Implies --enable-sparse.",
)
@click.option(
    "--sparse-device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where sparse workers run SPLADE; auto: CUDA when present.",
)
@click.option(
    "--bm25-k1",
    type=click.FloatRange(0, min_open=True),
    default=1.2,
    show_default=True,
    help="BM25 term-frequency saturation (Lucene variant).",
)
@click.option(
    "--bm25-b",
    type=click.FloatRange(0, 1),
    default=0.75,
    show_default=True,
    help="BM25 length normalisation.",
)
@click.option(
    "--queries",
    default=None,
    metavar="FILE",
    help="Queries to retrieve for (JSONL of {id, text}). Default: a BEIR folder's "
    "queries.jsonl. Each query gets --top-k fused candidates in results.jsonl.",
)
@click.option(
    "--no-queries",
    is_flag=True,
    help="Only embed: ignore a BEIR folder's queries.jsonl.",
)
@click.option(
    "--qrels",
    default=None,
    metavar="FILE",
    help="Relevance judgements (BEIR TSV or TREC qrels) for metrics.json: nDCG@10, "
    "Recall@100, MRR@10 per ranking. Default: a BEIR folder's qrels/test.tsv.",
)
@click.option(
    "--top-k",
    type=click.IntRange(1, 10000),
    default=100,
    show_default=True,
    help="Candidates per query from each retriever, and fused candidates kept.",
)
@click.option(
    "--fusion",
    type=click.Choice(["convex", "rrf"]),
    default="convex",
    show_default=True,
    help="convex: weighted sum of min-max normalised scores (Bruch et al. 2023); "
    "rrf: weighted reciprocal rank fusion, k=60.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Dense weight of the fusion; the sparse models share the rest equally.",
)
@click.option(
    "--fusion-weights",
    default=None,
    metavar="NAME=W,...",
    help="Explicit weights per ranking, e.g. dense=0.5,splade-tiny=0.25,bm25=0.25 "
    "(normalised to sum 1). Overrides --alpha.",
)
@click.option(
    "--enable-rerank",
    is_flag=True,
    help="Rerank each query's fused top candidates with a CrossEncoder (queue `rerank`, "
    f"served by the dense workers). Default model: {DEFAULT_RERANK_MODEL}.",
)
@click.option(
    "--rerank-model",
    default=None,
    metavar="NAME",
    help="CrossEncoder for --enable-rerank (hub name, HF-cache name or folder). "
    "Implies --enable-rerank.",
)
@click.option(
    "--rerank-top",
    type=click.IntRange(1),
    default=50,
    show_default=True,
    help="How many fused candidates per query are reranked.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Compute dtype of the models. auto: bf16 where the hardware runs it natively "
    "(CUDA Ampere+, CPUs with AMX/AVX512-BF16) and a probe shows no loss, else fp32. "
    "Vectors are exported as float32 either way.",
)
@click.option(
    "--retrieve-chunks-per-task",
    type=click.IntRange(1),
    default=16384,
    show_default=True,
    help="Document chunks one retrieve task searches (memory per task ~ this x vector "
    "size); more tasks spread retrieval over more workers.",
)
@click.option(
    "--fuse-queries-per-task",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Queries one fuse task merges, fuses and finds candidate texts for (rounded up "
    "to whole rerank groups of 16); more tasks spread fusion over more aggregate workers.",
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["parquet", "jsonl"]),
    default="parquet",
    show_default=True,
    help="How the chunks are written: Parquet parts (dense vectors as "
    "fixed_size_list<float32>[dim] columns, sparse as struct<indices, values> over "
    "vocab/<model>.json; what LanceDB, DuckDB, HF datasets and Milvus read) or JSONL "
    "parts (one record per line, vectors as JSON). Parts are written in parallel by the "
    "aggregate workers.",
)
@click.option(
    "--part-rows",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="The most chunks one part file holds.",
)
@click.option(
    "--part-mb",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="About the most MiB one part file holds (estimated from the vectors' sizes; "
    "a part never splits a staged batch).",
)
@click.option(
    "--keep-work",
    is_flag=True,
    help="Keep OUTPUT/<collection>/<job_id>/work/ (staged batches and per-batch shards) "
    "after the manifest is written; by default it is deleted then.",
)
@click.option(
    "--prepare-on",
    type=click.Choice(["fleet", "producer"]),
    default="fleet",
    show_default=True,
    help="Who reads, validates and chunks SOURCE. fleet: the workers of the `prepare` "
    "queue, one read range each, in parallel (SOURCE must be readable at the same absolute "
    "path on them: a shared volume, the same host, or an s3:// SOURCE); producer: this "
    "command, alone (for a SOURCE only this machine can read).",
)
@click.option(
    "--range-mb",
    type=click.FloatRange(min=0.001),
    default=8.0,
    show_default=True,
    help="With --prepare-on fleet: about how many MiB of SOURCE one prepare unit reads (a "
    "JSONL file is cut at line starts; a folder's files are grouped whole).",
)
@click.option(
    "--on-bad-record",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="fail: stop at the first bad record, before anything is enqueued. skip: "
    "skip it; skipped records are counted and listed in the manifest.",
)
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default="normal",
    show_default=True,
    help="How this job takes turns with others on a shared fleet. Jobs of one priority "
    "share the workers: a new job's first units go ahead of a long job's later ones, so a "
    "small job is not stuck behind a backfill. urgent: ahead of every normal job's bulk; "
    "batch: after a normal job's first units, in turn with its bulk (never starved).",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="The most units of this job that the fleet runs at once on each stage (N dense "
    "units, N sparse units, ...), so that one job cannot take every GPU of a shared fleet; "
    "the workers it leaves free take other jobs' units. 0: no cap.",
)
@click.option(
    "--reuse",
    default=None,
    metavar="JOB",
    help="Take vectors from an earlier job instead of encoding them again: its id (under "
    "the same --output) or its folder (OUTPUT/COLLECTION/JOB_ID, local or s3://). A chunk "
    "takes the earlier vector where its document id and text are the same and the "
    "worker's model is the same (name, weights, tokenizer, dtype); the rest is encoded. "
    "The new job's output is complete on its own, and its manifest's `changes` says what "
    "was added, changed, removed and reused (`export --to delta` writes the upserts).",
)
@click.option(
    "--max-record-bytes",
    type=ByteSize(),
    default=f"{DEFAULT_MAX_RECORD_BYTES // 2**20}MiB",
    show_default=True,
    metavar="SIZE",
    help="The most one record may hold (a JSONL line after decompression, a CSV/TSV row, "
    "a text file, a Parquet row's text and title), as bytes or with a unit (512KiB, 64MiB, "
    "1GiB). A larger record is a bad record (see --on-bad-record): it is read past, never "
    "held in memory.",
)
@click.option(
    "--max-document-chunks",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_DOCUMENT_CHUNKS,
    show_default=True,
    help="The most chunks one document may be cut into. A longer document is a bad record "
    "(see --on-bad-record), found when it is chunked: cutting stops at one chunk more.",
)
@click.option(
    "--id-field",
    default=None,
    metavar="COLUMN",
    help="CSV/TSV or Parquet SOURCE: the column holding each document's id "
    "(default: id, else _id).",
)
@click.option(
    "--text-field",
    default="text",
    show_default=True,
    metavar="COLUMN",
    help="CSV/TSV or Parquet SOURCE: the column holding the text.",
)
@click.option(
    "--title-field",
    default=None,
    metavar="COLUMN",
    help="CSV/TSV or Parquet SOURCE: the column holding the title (default: title, "
    "when there is one).",
)
@click.option(
    "--metadata-fields",
    default=None,
    metavar="A,B",
    help="CSV/TSV or Parquet SOURCE: columns copied into every chunk's metadata.",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Run a job even when SOURCE holds no documents (a pipeline that may have "
    "nothing new); by default that is an error, exit code 2.",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Stage and enqueue, print the job id and return (needs a shared broker). "
    "Follow later with `status JOB_ID`.",
)
@click.option(
    "--resume",
    "resume_job",
    default=None,
    metavar="JOB_ID",
    help="Take up job JOB_ID of this SOURCE again instead of starting a new one (as "
    "`embed-collections resume JOB_ID` does; the other options are the job's own).",
)
@click.option(
    "--model-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="The one model cache (HF_HOME) for dense, sparse and rerank models, for this "
    "command and the local workers it starts. Default: $HF_HOME, else "
    "~/.cache/huggingface. Workers of a shared fleet read their own HF_HOME.",
)
@click.option(
    "--trace-console",
    is_flag=True,
    help="Print OpenTelemetry spans on stderr (the producer's; local workers' go to "
    "their logs). OTLP export is set by the standard OTEL_* variables.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print progress (with live per-stage figures) and the summary as JSON lines on stdout.",
)
def run(
    source: str,
    output: str | None,
    dense_models: str,
    chunk_tokens: int | None,
    chunk_overlap: int,
    batch_chunks: int,
    unit_tokens: int,
    max_batch_tokens: int | None,
    enable_sparse: bool,
    sparse_models: str | None,
    sparse_device: str,
    bm25_k1: float,
    bm25_b: float,
    queries: str | None,
    no_queries: bool,
    qrels: str | None,
    top_k: int,
    fusion: Literal["convex", "rrf"],
    alpha: float,
    fusion_weights: str | None,
    enable_rerank: bool,
    rerank_model: str | None,
    rerank_top: int,
    dtype: str,
    retrieve_chunks_per_task: int,
    fuse_queries_per_task: int,
    export_format: Literal["parquet", "jsonl"],
    part_rows: int,
    part_mb: int,
    keep_work: bool,
    prepare_on: Literal["fleet", "producer"],
    range_mb: float,
    on_bad_record: Literal["fail", "skip"],
    priority: Priority,
    max_in_flight: int,
    reuse: str | None,
    max_record_bytes: int,
    max_document_chunks: int,
    id_field: str | None,
    text_field: str,
    title_field: str | None,
    metadata_fields: str | None,
    allow_empty: bool,
    detach: bool,
    resume_job: str | None,
    model_cache: str | None,
    trace_console: bool,
    as_json: bool,
) -> None:
    """Embed SOURCE: a BEIR folder, a JSONL file (.jsonl or .ndjson, optionally .gz or
    .zst compressed), a CSV/TSV file with a header, a Parquet file or a folder of them,
    or a folder of .txt/.md files; on disk, or in S3 as s3://BUCKET/PREFIX (read with
    the output's endpoint and credentials: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY).

    With queries (a BEIR folder's queries.jsonl, or --queries), each query is retrieved
    by the dense ensemble and every sparse model, the rankings are fused, and (with
    --enable-rerank) the fused top candidates are reranked by a CrossEncoder.

    Artifacts land in OUTPUT/<collection>/<job_id>/: chunks/part-NNNNN.parquet (or
    .jsonl), vocab/<sparse model>.json, results.jsonl, metrics.json, report.html (the
    job's charts, one page that opens offline), then manifest.json, which lists every
    file and says which column holds which model.
    Exit code: 0 complete, 1 partial or failed, 2 bad input or configuration, 130
    interrupted.
    """
    if model_cache:
        os.environ["HF_HOME"] = str(Path(model_cache).expanduser().resolve())
    settings = current_settings()
    if trace_console:
        settings = dataclasses.replace(settings, trace_console=True)
    telemetry.configure("embed-fleet-producer", settings)
    options = JobOptions(
        source=source,
        output=output or settings.output,
        dense_models=[m.strip() for m in dense_models.split(",") if m.strip()],
        chunk_tokens=chunk_tokens,
        chunk_overlap=chunk_overlap,
        batch_chunks=batch_chunks,
        unit_tokens=unit_tokens,
        max_batch_tokens=max_batch_tokens,
        on_bad_record=on_bad_record,
        allow_empty=allow_empty,
        fields=FieldMap(
            id=id_field,
            text=text_field,
            title=title_field,
            metadata=[m.strip() for m in (metadata_fields or "").split(",") if m.strip()],
        ),
        sparse_models=_sparse_models(enable_sparse, sparse_models),
        sparse_device=sparse_device,
        bm25=BM25Params(k1=bm25_k1, b=bm25_b),
        queries=queries,
        qrels=qrels,
        no_queries=no_queries,
        top_k=top_k,
        fusion=fusion,
        alpha=alpha,
        fusion_weights=fusion_weights,
        rerank_model=rerank_model or (DEFAULT_RERANK_MODEL if enable_rerank else None),
        rerank_top=min(rerank_top, top_k),
        retrieve_chunks_per_task=retrieve_chunks_per_task,
        fuse_queries_per_task=fuse_queries_per_task,
        dtype=dtype,
        transient_window_s=settings.transient_window,
        export=ExportSpec(
            format=export_format,
            part_rows=part_rows,
            part_bytes=part_mb * 2**20,
            keep_work=keep_work,
        ),
        prepare_on=prepare_on,
        range_bytes=max(1, int(range_mb * 2**20)),
        priority=priority,
        max_in_flight=max_in_flight,
        reuse=reuse,
        limits=InputLimits(
            max_record_bytes=max_record_bytes, max_document_chunks=max_document_chunks
        ),
    )
    if resume_job:
        resume_main(resume_job, output, detach, as_json, source=source)
    job: PreparedJob | None = None
    try:
        if settings.broker_url:
            client = connect(settings.broker_url, settings.transient_window)
            job = _prepare(options, as_json)
            code = _submit(job, settings, client, detach=detach, as_json=as_json)
        else:
            no_detach_without_broker(detach)
            job = _prepare(options, as_json)
            with embedded_fleet(settings, job.spec, as_json) as (local, client, check):
                code = _submit(
                    job, local, client, detach=False, as_json=as_json, on_tick=check, shared=False
                )
    except JobEnded as exc:
        fail(exc, EXIT_INCOMPLETE)
    except EmbedFleetError as exc:
        fail(exc)
    except Detached as detached:
        job_id = detached.job_id
        console.print(
            f"[yellow]detached[/]: job {job_id} goes on on the fleet. Follow it: "
            f"`embed-collections status {job_id} --follow`; stop it: `embed-collections "
            f"cancel {job_id}`; if it fails: `embed-collections resume {job_id}`",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        where = "" if settings.broker_url else f" --output {options.output}"
        later = (
            f"`embed-collections resume {job.spec.job_id}{where}` continues it"
            if job is not None
            else "nothing was submitted"
        )
        if settings.broker_url:
            console.print(
                f"[yellow]interrupted[/] while staging: the job stopped; {later} (the "
                "source must be there to stage the rest)",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print(
                "[yellow]interrupted[/]: workers stopped; nothing half-written is kept "
                f"as complete (no manifest); {later}",
                highlight=False,
                soft_wrap=True,
            )
        sys.exit(EXIT_INTERRUPTED)
    finally:
        telemetry.shutdown()
    sys.exit(code)


def _sparse_models(enabled: bool, names: str | None) -> list[str]:
    if names is not None:
        return [m.strip() for m in names.split(",") if m.strip()]
    return list(DEFAULT_SPARSE_MODELS) if enabled else []


def _prepare(options: JobOptions, as_json: bool) -> PreparedJob:
    if as_json:
        return prepare(options)
    job = _prepare_shown(options)
    if job.spec.reuse:
        console.print(reuse_verdict(job.spec), highlight=False, soft_wrap=True)
    return job


def _prepare_shown(options: JobOptions) -> PreparedJob:
    """Prepare with a bar over the source's validation (when the producer reads it)."""
    with Progress(
        TextColumn("[bold]validate"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bars:
        task = bars.add_task("validate", total=None)

        def show(progress: ReadProgress, total: int) -> None:
            bars.update(task, completed=progress.bytes_read, total=total)

        return prepare(options, show)


def _submit(
    job: PreparedJob,
    settings: Settings,
    client: redis.Redis,
    *,
    detach: bool,
    as_json: bool,
    on_tick: Callable[[], None] | None = None,
    shared: bool = True,
) -> int:
    attributes = {
        "embed_fleet.job_id": job.spec.job_id,
        "embed_fleet.collection": job.spec.collection,
    }
    with telemetry.tracer().start_as_current_span("embed_fleet.run", attributes=attributes):
        return _submit_traced(job, settings, client, detach, as_json, on_tick, shared)


def _submit_traced(
    job: PreparedJob,
    settings: Settings,
    client: redis.Redis,
    detach: bool,
    as_json: bool,
    on_tick: Callable[[], None] | None,
    shared: bool,
) -> int:
    """Stage and follow; ``shared``: the fleet outlives this command (Ctrl-C after the
    staging detaches instead of stopping the job)."""
    app = make_app(settings)
    ledger = JobLedger(client, job.spec.job_id)
    queues = pipeline.job_queues(job.spec) if shared else []
    if nobody := unconsumed(app, queues) if queues else []:
        warn(unconsumed_line(nobody, f"job {job.spec.job_id} will wait on"))
    plan = job.read_plan
    ranges = len(plan.ranges) if plan else 0
    ledger.open(job.spec, job.validation.documents, job.validation.bytes_total, ranges)
    stager = Stager(job, ledger, app, settings.ledger_ttl)
    # The stager's thread publishes under the run span: it needs this context.
    staging = contextvars.copy_context()
    thread = threading.Thread(target=staging.run, args=(stager.run,), name="stager", daemon=True)
    thread.start()
    if not as_json:
        size = (
            f"{human_bytes(job.validation.bytes_total)} in {ranges} read range"
            + "s" * (ranges != 1)
            if plan
            else f"{job.validation.documents} documents"
        )
        console.print(
            f"job [bold]{job.spec.job_id}[/] · {job.spec.collection} · {size} → "
            f"{job.store.locate(job.layout.root)}"
        )
    if detach:
        thread.join()
        _raise_stager_error(stager)
        if as_json:
            emit_json("submitted", {"job_id": job.spec.job_id})
        else:
            click.echo(job.spec.job_id)
        return EXIT_OK

    watchdog = Watchdog(ledger, app, settings.stall_timeout, warn, queues, settings.queue_wait)

    def tick() -> None:
        if on_tick is not None:
            on_tick()
        _raise_stager_error(stager)
        watchdog()

    try:
        snap = follow(ledger, as_json=as_json, console=console, on_tick=tick)
    except KeyboardInterrupt:
        if shared and not thread.is_alive() and stager.error is None:
            raise Detached(job.spec.job_id) from None  # staged: the fleet carries on
        stager.cancel.set()
        if shared:  # half staged, it can never complete: end it now
            thread.join(timeout=30)
            ledger.fail("interrupted while staging", settings.ledger_ttl)
        raise
    except BaseException:
        stager.cancel.set()
        raise
    thread.join(timeout=30)
    _raise_stager_error(stager)
    if snap.status == "failed" and snap.bad_input:
        raise EmbedFleetError(snap.error)  # the fleet found a bad record: cause and fix
    if snap.status == "failed":
        raise JobEnded(f"job {job.spec.job_id} failed: {snap.error}", "See the worker logs")
    store = JobStore(job.store, job.spec.collection, job.spec.job_id)
    manifest = store.manifest()
    show_summary(manifest, store.locate(), as_json)
    return EXIT_OK if manifest.status == "complete" else EXIT_INCOMPLETE


def _raise_stager_error(stager: Stager) -> None:
    if stager.error is not None:
        # The job was open: it failed, whatever stopped the staging.
        if isinstance(stager.error, EmbedFleetError):
            raise JobEnded(stager.error.cause, stager.error.fix)
        raise JobEnded(
            f"staging failed: {type(stager.error).__name__}: {stager.error}",
            "Check the output store and the broker, then run again",
        )
