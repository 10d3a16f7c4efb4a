"""``embed-collections``: embed a collection with the fleet and follow it to the end."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NoReturn

import click
import msgspec
import redis
from kombu.exceptions import OperationalError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer.backlog import Exporter, FleetBacklog, read_backlog
from producer.follow import (
    FINISHED,
    counts_tasks,
    emit_json,
    follow,
    human_bytes,
    metrics_table,
    rerank_line,
    summary_table,
)
from producer.jobs import JobOptions, PreparedJob, Stager, prepare
from producer.local_fleet import LocalFleet, local_queues, preload_list
from producer.recovery import find_job, finish_staging, rebuild_ledger
from producer.search_exports import TARGETS, export_faiss, export_pyserini, finished_job
from producer.watchdog import Watchdog, redrive
from shared import logs, telemetry
from shared.celery_app import make_app
from shared.errors import EmbedFleetError, ExitCode
from shared.job_store import JobStore
from shared.leases import list_leases
from shared.ledger import JobLedger, connect, recent_jobs
from shared.locations import canonical
from shared.models import (
    BUNDLED_SPLADE,
    DEFAULT_DENSE_MODEL,
    DEFAULT_RERANK_MODEL,
    DEFAULT_SPARSE_MODELS,
)
from shared.pipeline import GPU_UNIT_TOKENS
from shared.schemas import BM25Params, ExportSpec, FieldMap, JobSpec, Manifest
from shared.settings import DEFAULT_OUTPUT, Settings, env_name, redact_url
from shared.sources import ReadProgress
from shared.storage import LocalStore, open_store, safe_name

EXIT_OK, EXIT_INCOMPLETE, EXIT_ERROR, EXIT_RUNNING, EXIT_INTERRUPTED = (
    ExitCode.OK,
    ExitCode.INCOMPLETE,
    ExitCode.BAD_INPUT,
    ExitCode.RUNNING,
    ExitCode.INTERRUPTED,
)

# Wide enough for any table when there is no terminal to fit.
LOG_WIDTH = 400


def make_console(stderr: bool = True) -> Console:
    """Rich on a terminal. With no terminal (a script, CI, a log file) rich would cut
    every line to 80 columns ("batc…"), so output there takes the width it needs,
    unless COLUMNS says otherwise."""
    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, width=LOG_WIDTH)


console = make_console()


def _fail(exc: EmbedFleetError, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


class Detached(Exception):
    """Ctrl-C while following a job on a shared fleet, after every batch was staged:
    the job goes on without this command."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class JobEnded(EmbedFleetError):
    """A job that was started ended without its artifacts (``failed``): exit 1, not 2."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embed-fleet")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Embed document collections with a Celery + Redis worker fleet.

    With REDIS_URL (or CELERY_BROKER_URL) set, jobs go to the workers of that broker,
    wherever they run. With neither set, `run` starts a private Redis and one worker
    per queue on this machine, runs the job, and stops them again.
    """
    try:
        settings = Settings.from_env()
    except EmbedFleetError as exc:
        _fail(exc)
    logs.configure(settings.log_level)
    ctx.obj = settings


def _settings() -> Settings:
    """The settings ``main`` read once for this command."""
    settings: Settings = click.get_current_context().find_root().obj
    return settings


@main.command()
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
    settings = _settings()
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
    )
    if resume_job:
        _resume_main(resume_job, output, detach, as_json, source=source)
    job: PreparedJob | None = None
    try:
        if settings.broker_url:
            client = connect(settings.broker_url, settings.transient_window)
            job = _prepare(options, as_json)
            code = _submit(job, settings, client, detach=detach, as_json=as_json)
        else:
            _no_detach_without_broker(detach)
            job = _prepare(options, as_json)
            with _embedded_fleet(settings, job.spec, as_json) as (local, client, check):
                code = _submit(
                    job, local, client, detach=False, as_json=as_json, on_tick=check, shared=False
                )
    except JobEnded as exc:
        _fail(exc, EXIT_INCOMPLETE)
    except EmbedFleetError as exc:
        _fail(exc)
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


def _no_detach_without_broker(detach: bool) -> None:
    if detach:
        raise EmbedFleetError(
            "--detach needs a shared broker: the embedded fleet stops when this command ends",
            "Set REDIS_URL to a Redis that your workers use",
        )


@contextlib.contextmanager
def _embedded_fleet(
    settings: Settings, spec: JobSpec, as_json: bool
) -> Iterator[tuple[Settings, redis.Redis, Callable[[], None]]]:
    """A private Redis and local workers for one job, stopped on the way out: the
    settings and client that reach them, and the check that raises if one died. The
    workers stage the job's models while the producer stages batches, and print spans
    where the producer does."""
    if not as_json:
        console.print("[dim]no REDIS_URL set: starting a private Redis and local workers[/]")
    env = {env_name("preload"): settings.preload or preload_list(spec)}
    if settings.trace_console:
        env[env_name("trace_console")] = "1"
    with LocalFleet(local_queues(spec), env) as fleet:
        local = dataclasses.replace(settings, broker_url=fleet.redis_url)
        yield local, connect(fleet.redis_url), fleet.check


def _sparse_models(enabled: bool, names: str | None) -> list[str]:
    if names is not None:
        return [m.strip() for m in names.split(",") if m.strip()]
    return list(DEFAULT_SPARSE_MODELS) if enabled else []


def _prepare(options: JobOptions, as_json: bool) -> PreparedJob:
    if as_json:
        return prepare(options)
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

    watchdog = Watchdog(ledger, app, settings.stall_timeout, _warn)

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
    _show_summary(manifest, store.locate(), as_json)
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


def _show_summary(manifest: Manifest, location: str, as_json: bool) -> None:
    if as_json:
        emit_json("summary", {"location": location, "manifest": manifest})
        return
    console.print(summary_table(manifest, location))
    rerank = rerank_line(manifest)
    if rerank:
        console.print(rerank, highlight=False)
    quality = metrics_table(manifest)
    if quality is not None:
        console.print(quality)
    for missing in manifest.missing[:10]:
        console.print(
            f"[yellow]missing[/] {missing.stage} batch {missing.batch_id} "
            f"({len(missing.chunk_ids)} chunks): {missing.reason}"
        )


@main.command()
@click.argument("job_id", required=False)
@click.option(
    "--output",
    "-o",
    default=None,
    metavar="URL",
    help="Without a broker, where to look for the job's manifest "
    f"(default: $EMBED_FLEET_OUTPUT or {DEFAULT_OUTPUT}).",
)
@click.option(
    "--follow",
    "-f",
    "follow_job",
    is_flag=True,
    help="Follow a running job with the live view (as `run` shows it) until it ends.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(job_id: str | None, output: str | None, follow_job: bool, as_json: bool) -> None:
    """Show a job's progress (or, without JOB_ID, the recent jobs).

    Reads the ledger of the broker in REDIS_URL; with no broker configured, reads the
    manifest of a finished job from the output folder. With --follow, shows the live
    view (progress, throughput, latency p50/p95, batch sizes, peak memory, rerank
    coverage) until the job ends. Exit code: 0 complete, 1 partial or failed, 3 still
    running.
    """
    settings = _settings()
    output = output or settings.output
    try:
        if not settings.broker_url:
            if not job_id:
                raise EmbedFleetError(
                    "no broker configured to list jobs from",
                    "Set REDIS_URL, or pass a JOB_ID of a finished local job",
                )
            store = _find_local_job(Path(output), job_id)
            manifest = store.manifest()
            _show_summary(manifest, store.locate(), as_json)
            sys.exit(EXIT_OK if manifest.status == "complete" else EXIT_INCOMPLETE)
        client = connect(settings.broker_url, settings.transient_window)
        if not job_id:
            for jid in recent_jobs(client):
                ledger = JobLedger(client, jid)
                state = ledger.status() if ledger.exists() else "expired"
                click.echo(
                    msgspec.json.encode({"job_id": jid, "status": state}).decode()
                    if as_json
                    else f"{jid}  {state}"
                )
            sys.exit(EXIT_OK)
        ledger = JobLedger(client, job_id)
        ledger.spec()  # an unknown job id fails here, saying what to do
        if follow_job:
            watchdog = Watchdog(ledger, make_app(settings), settings.stall_timeout, _warn)
            snap = follow(ledger, as_json=as_json, console=console, on_tick=watchdog)
        else:
            snap = ledger.progress(detail=True)
        if as_json and not follow_job:
            emit_json("progress", snap)
        elif not as_json:
            stages = ", ".join(
                f"{s.stage} {s.batches_done}/{s.total if s.total is not None else '?'} tasks"
                if counts_tasks(s.stage)
                else f"{s.stage} {s.chunks_done}/{snap.staged_chunks} chunks"
                for s in snap.stages
            )
            console.print(
                f"job {job_id} · {snap.status} · {snap.documents_read}/"
                f"{snap.documents_total} documents read · {stages}"
                + (f" · {snap.error}" if snap.error else "")
            )
        if snap.status in ("complete", "partial"):
            spec = ledger.spec()
            store = JobStore.of(spec)
            _show_summary(store.manifest(), store.locate(), as_json)
        if snap.status not in FINISHED:
            sys.exit(EXIT_RUNNING)
        sys.exit(EXIT_OK if snap.status == "complete" else EXIT_INCOMPLETE)
    except EmbedFleetError as exc:
        _fail(exc)


@main.command()
@click.argument("job_id")
@click.option(
    "--output",
    "-o",
    default=None,
    metavar="URL",
    help="Where the job wrote (default: $EMBED_FLEET_OUTPUT or "
    f"{DEFAULT_OUTPUT}). Read when the ledger no longer has the job (Redis lost its "
    "data; any job of the embedded fleet): the job is rebuilt from its objects there.",
)
@click.option("--detach", is_flag=True, help="Hand the job back to the fleet and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print progress as JSON lines.")
def resume(job_id: str, output: str | None, detach: bool, as_json: bool) -> None:
    """Take up a job that failed, ended partial, stalled or was cut short.

    The object store is the record of what is done. If the ledger (Redis) no longer
    has the job, it is rebuilt from the job's objects under --output. If the job's
    producer stopped before every batch was staged, the rest is staged now from the
    job's source (run this where the source is). Then the fleet's aggregator finds the
    first unfinished phase, enqueues exactly the units whose outputs are missing
    (failed ones included) or the step that was lost, and the job goes on to a fresh
    manifest; this command follows it as `status --follow` does. A complete job is left
    as it is.

    With REDIS_URL set, on that fleet; without, on the embedded fleet (a private Redis
    and local workers, as `run` starts them). Exit code: 0 complete, 1 partial or
    failed, 2 no such job or not resumable, 3 still running (--detach), 130 interrupted.
    """
    _resume_main(job_id, output, detach, as_json)


def _resume_main(
    job_id: str, output: str | None, detach: bool, as_json: bool, source: str | None = None
) -> NoReturn:
    """``resume`` (and ``run --resume``, which names the ``source`` it expects)."""
    settings = _settings()
    output = output or settings.output
    try:
        if settings.broker_url:
            client = connect(settings.broker_url, settings.transient_window)
            code = _resume(job_id, output, settings, client, detach, as_json, source)
        else:
            _no_detach_without_broker(detach)
            found = find_job(open_store(output, settings.transient_window), job_id)
            record = found.job_record()
            assert record is not None  # find_job found it by its record
            with _embedded_fleet(settings, record.spec, as_json) as (local, client, check):
                code = _resume(job_id, output, local, client, False, as_json, source, check)
    except JobEnded as exc:
        _fail(exc, EXIT_INCOMPLETE)
    except EmbedFleetError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/]: `embed-collections resume {job_id}` takes the job up again"
        )
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


def _resume(
    job_id: str,
    output: str,
    settings: Settings,
    client: redis.Redis,
    detach: bool,
    as_json: bool,
    source: str | None,
    on_tick: Callable[[], None] | None = None,
) -> int:
    """Rebuild the ledger if it lost the job, finish the staging if it never ended,
    hand the job to the resume step, and follow it (see ``producer.recovery``)."""
    ledger = JobLedger(client, job_id)
    app = make_app(settings)

    def say(text: str) -> None:
        if not as_json:
            console.print(text, highlight=False, soft_wrap=True)

    if ledger.exists():
        spec = ledger.spec()
        store = JobStore.of(spec, open_store(spec.output, settings.transient_window))
        if ledger.status() == "complete":
            say(f"job {job_id} is complete: nothing to resume")
            return EXIT_OK
    else:
        store = find_job(open_store(output, settings.transient_window), job_id)
        if store.store.exists(store.layout.manifest) and store.manifest().status == "complete":
            say(f"job {job_id} is complete ({store.locate()}): nothing to resume")
            return EXIT_OK
        rebuild_ledger(ledger, store)
        spec = ledger.spec()
        say(f"job {job_id}: the ledger did not have it; rebuilt from {store.locate()}")
    if source is not None and canonical(source) != spec.source:
        raise EmbedFleetError(
            f"job {job_id} is of {spec.source}, not of {source}",
            f"Run `embed-collections resume {job_id}`, or run {source} as a new job",
        )
    if spec.prepare_on == "producer" and not ledger.phase_opened("encode"):
        say(f"job {job_id} was not fully submitted: staging the rest from {spec.source}")
        ledger.mark_resuming()
        finish_staging(
            ledger, store, app, settings.ledger_ttl, transient_window_s=settings.transient_window
        )
    redrive(ledger, app)
    say(f"job {job_id} ({spec.collection}) handed back to the fleet")
    if detach:
        click.echo(job_id)
        return EXIT_RUNNING
    watchdog = Watchdog(ledger, app, settings.stall_timeout, _warn)

    def tick() -> None:
        if on_tick is not None:
            on_tick()
        watchdog()

    snap = follow(ledger, as_json=as_json, console=console, on_tick=tick)
    if snap.status == "failed":
        raise JobEnded(f"job {job_id} failed: {snap.error}", "See the worker logs")
    _show_summary(store.manifest(), store.locate(), as_json)
    return EXIT_OK if snap.status == "complete" else EXIT_INCOMPLETE


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Stop a job on the fleet in REDIS_URL.

    The job ends `failed` ("cancelled"): workers drop its queued units and steps as
    they reach them (a unit already running finishes), and nothing more is written.
    `resume JOB_ID` takes it up again. Exit code: 0 cancelled or already finished, 2 no
    such job or no broker.
    """
    settings = _settings()
    try:
        if not settings.broker_url:
            raise EmbedFleetError(
                "cancel needs the fleet's Redis (REDIS_URL); an embedded run stops with Ctrl-C",
                "Set REDIS_URL to the Redis your workers use",
            )
        ledger = JobLedger(connect(settings.broker_url, settings.transient_window), job_id)
        ledger.spec()  # an unknown or expired job fails here, saying what to do
        status = ledger.status()
        if status in FINISHED:
            console.print(f"job {job_id} is already {status}: nothing to cancel")
            sys.exit(EXIT_OK)
        ledger.fail("cancelled with `embed-collections cancel`", settings.ledger_ttl)
        console.print(
            f"job {job_id} cancelled; `embed-collections resume {job_id}` takes it up again"
        )
        sys.exit(EXIT_OK)
    except EmbedFleetError as exc:
        _fail(exc)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def leases(as_json: bool) -> None:
    """List the GPU leases of the fleet: which worker holds which physical GPU.

    GPU workers (queues dense, rerank) take a lease on a device, by its UUID, when they
    start and renew it while they run; a stopped worker gives it back, a crashed one's
    lease expires within its TTL (30 s). Host and cuda index are where the holder sees
    the device (a container's own hostname and numbering).
    """
    settings = _settings()
    try:
        if not settings.broker_url:
            raise EmbedFleetError(
                "no broker configured: leases live in the fleet's Redis",
                "Set REDIS_URL to the Redis your workers use",
            )
        held = list_leases(connect(settings.broker_url))
    except EmbedFleetError as exc:
        _fail(exc)
    if as_json:
        for lease in held:
            click.echo(msgspec.json.encode(lease).decode())
        return
    if not held:
        console.print("no GPU leases: no GPU worker is running (CPU workers take none)")
        return
    table = Table(title="GPU leases", title_justify="left")
    for column in ("GPU", "host", "device", "worker", "pid", "held s", "expires in s"):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for lease in held:
        table.add_row(
            lease.uuid,
            lease.host,
            f"cuda:{lease.device}",
            lease.worker,
            str(lease.pid),
            f"{lease.held_s:.0f}",
            f"{lease.expires_in_s:.0f}",
        )
    make_console(stderr=False).print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--serve",
    metavar="[HOST:]PORT",
    default=None,
    help="Serve the numbers over HTTP for autoscalers instead: /metrics (Prometheus), "
    "/queues (this JSON, for KEDA's metrics-api trigger), /healthz. Runs until stopped.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 30),
    default=1.0,
    show_default=True,
    help="Seconds to wait for workers to say which queues they consume.",
)
def queues(as_json: bool, serve: str | None, timeout: float) -> None:
    """Show the work waiting for the fleet, per queue: what an autoscaler scales on.

    waiting: messages in the queue's Redis list (what `LLEN` counts). unacked: messages
    a worker has taken and not yet acknowledged, running or reserved; they are not in
    the list, so `LLEN` reads 0 while workers are busy with the last units. backlog:
    waiting + unacked. workers: who consumes the queue (those that answer within
    --timeout). Exit code: 0, or 2 when no broker is configured or Redis cannot be
    reached.
    """
    settings = _settings()
    try:
        if not settings.broker_url:
            raise EmbedFleetError(
                "no broker configured: the queues live in the fleet's Redis",
                "Set REDIS_URL to the Redis your workers use",
            )
        client = connect(settings.broker_url)
        app = make_app(settings)
        if serve is not None:
            _serve_backlog(serve, lambda: read_backlog(client, app, timeout))
            return
        backlog = read_backlog(client, app, timeout)
    except (EmbedFleetError, redis.RedisError, OperationalError) as exc:
        _fail(exc if isinstance(exc, EmbedFleetError) else _redis_unreachable(exc, settings))
    if as_json:
        click.echo(msgspec.json.encode(backlog).decode())
        return
    table = Table(title="Fleet queues", title_justify="left")
    for column in ("queue", "waiting", "unacked", "backlog", "workers"):
        table.add_column(column, justify="left" if column in ("queue", "workers") else "right")
    for name, counts in backlog.queues.items():
        table.add_row(
            name,
            str(counts.waiting),
            str(counts.unacked),
            str(counts.backlog),
            ", ".join(counts.workers) or "-",
        )
    make_console(stderr=False).print(table)
    if backlog.workers_answered == 0:
        console.print(f"no worker answered within {timeout:g} s: is any running on this Redis?")


def _redis_unreachable(exc: Exception, settings: Settings) -> EmbedFleetError:
    return EmbedFleetError(
        f"the fleet's Redis at {redact_url(settings.broker_url or '')} did not answer "
        f"({type(exc).__name__})",
        "Check REDIS_URL and that Redis is running",
    )


def _serve_backlog(address: str, read: Callable[[], FleetBacklog]) -> None:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise EmbedFleetError(
            f"--serve {address!r} is not [HOST:]PORT", "Give a port, e.g. --serve 9808"
        )
    read()  # fail now, with the reason, if Redis cannot be read
    # Every interface by default: in a container, the port is what the platform publishes.
    server = Exporter(read).server(host or "0.0.0.0", int(port))  # noqa: S104
    bound_host, bound_port = server.server_address[:2]
    console.print(f"serving the fleet's backlog on http://{bound_host!s}:{bound_port}/metrics")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@main.command("export")
@click.argument("job_id")
@click.option(
    "--to",
    "target",
    type=click.Choice(TARGETS),
    required=True,
    help="pyserini-sparse: Anserini JsonVectorCollection files (a folder per sparse "
    "model, a file per part). faiss: a FAISS inner-product index per dense model, and "
    "ids.txt (line i: the chunk id of vector i).",
)
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--output",
    default=None,
    help="Where the job wrote (default: EMBED_FLEET_OUTPUT, else ./embed-out).",
)
@click.option(
    "--quantize",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="pyserini-sparse: weights are written as round(weight * N), zeros dropped "
    "(Anserini's impact indexes take integers).",
)
def export_command(
    job_id: str, target: str, out_dir: Path, output: str | None, quantize: int
) -> None:
    """Write a finished job's vectors where a search engine loads them.

    Then, e.g.: `python -m pyserini.index.lucene --collection JsonVectorCollection
    --input DIR/<model> --index idx --generator DefaultLuceneDocumentGenerator --impact
    --pretokenized`, or `faiss.read_index("DIR/<model>.faiss")` with DIR/ids.txt.
    Exit code: 0 written, 2 no such job or nothing of that kind to export.
    """
    settings = _settings()
    try:
        store = open_store(output or settings.output, settings.transient_window)
        job = finished_job(store, job_id)
        if target == "faiss":
            report = export_faiss(job, out_dir)
        else:
            report = export_pyserini(job, out_dir, quantize)
    except EmbedFleetError as exc:
        _fail(exc)
    for written in report.files:
        console.print(f"{written.path}  {written.records} records  {written.model}".rstrip())
    console.print(f"{report.chunks} chunks of job {job_id} exported to {out_dir} ({target})")


def _find_local_job(root: Path, job_id: str) -> JobStore:
    """The finished job of that id in a local output folder (any collection)."""
    for path in sorted(root.expanduser().glob(f"*/{safe_name(job_id)}/manifest.json")):
        return JobStore(LocalStore(root), path.parent.parent.name, job_id)
    raise EmbedFleetError(
        f"no manifest for job {job_id!r} under {root}",
        "Pass --output where the job wrote, or set REDIS_URL to ask the fleet's ledger",
    )


if __name__ == "__main__":
    main()
