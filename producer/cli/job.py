"""A job once it has started: ``status``, ``resume`` and ``cancel``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click
import msgspec
import redis

from producer.cli import app as cli
from producer.consumers import stuck, unconsumed_line
from producer.follow import FINISHED, counts_tasks, emit_json, follow
from producer.recovery import find_job, finish_staging, rebuild_ledger
from producer.watchdog import Watchdog, redrive
from shared.control import pipeline
from shared.control.celery_app import make_app
from shared.control.ledger import JobLedger, connect, recent_jobs
from shared.control.settings import DEFAULT_OUTPUT, Settings
from shared.inputs.locations import canonical
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.storage import LocalStore, open_store, safe_name


@click.command()
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
    settings = cli.current_settings()
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
            cli.show_summary(manifest, store.locate(), as_json)
            sys.exit(cli.EXIT_OK if manifest.status == "complete" else cli.EXIT_INCOMPLETE)
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
            sys.exit(cli.EXIT_OK)
        ledger = JobLedger(client, job_id)
        ledger.spec()  # an unknown job id fails here, saying what to do
        app = make_app(settings)
        queues = pipeline.job_queues(ledger.spec())
        if follow_job:
            wait_s = settings.queue_wait
            watchdog = Watchdog(ledger, app, settings.stall_timeout, cli.warn, queues, wait_s)
            snap = follow(ledger, as_json=as_json, console=cli.console, on_tick=watchdog)
        else:
            snap = ledger.progress(detail=True)
            if snap.status not in FINISHED and (nobody := stuck(client, app, queues)):
                cli.warn(unconsumed_line(nobody, f"job {job_id} waits on"))
        if as_json and not follow_job:
            emit_json("progress", snap)
        elif not as_json:
            stages = ", ".join(
                f"{s.stage} {s.batches_done}/{s.total if s.total is not None else '?'} tasks"
                if counts_tasks(s.stage)
                else f"{s.stage} {s.chunks_done}/{snap.staged_chunks} chunks"
                for s in snap.stages
            )
            cli.console.print(
                f"job {job_id} · {snap.status} · {snap.documents_read}/"
                f"{snap.documents_total} documents read · {stages}"
                + (f" · {snap.error}" if snap.error else "")
            )
        if snap.status in ("complete", "partial"):
            spec = ledger.spec()
            store = JobStore.of(spec)
            cli.show_summary(store.manifest(), store.locate(), as_json)
        if snap.status not in FINISHED:
            sys.exit(cli.EXIT_RUNNING)
        sys.exit(cli.EXIT_OK if snap.status == "complete" else cli.EXIT_INCOMPLETE)
    except EmbedFleetError as exc:
        cli.fail(exc)


@click.command()
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
    resume_main(job_id, output, detach, as_json)


def resume_main(
    job_id: str, output: str | None, detach: bool, as_json: bool, source: str | None = None
) -> NoReturn:
    """``resume`` (and ``run --resume``, which names the ``source`` it expects)."""
    settings = cli.current_settings()
    output = output or settings.output
    try:
        if settings.broker_url:
            client = connect(settings.broker_url, settings.transient_window)
            code = _resume(job_id, output, settings, client, detach, as_json, source)
        else:
            cli.no_detach_without_broker(detach)
            found = find_job(open_store(output, settings.transient_window), job_id)
            record = found.job_record()
            assert record is not None  # find_job found it by its record
            with cli.embedded_fleet(settings, record.spec, as_json) as (local, client, check):
                code = _resume(job_id, output, local, client, False, as_json, source, check)
    except cli.JobEnded as exc:
        cli.fail(exc, cli.EXIT_INCOMPLETE)
    except EmbedFleetError as exc:
        cli.fail(exc)
    except KeyboardInterrupt:
        cli.console.print(
            f"[yellow]interrupted[/]: `embed-collections resume {job_id}` takes the job up again"
        )
        sys.exit(cli.EXIT_INTERRUPTED)
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
            cli.console.print(text, highlight=False, soft_wrap=True)

    if ledger.exists():
        spec = ledger.spec()
        store = JobStore.of(spec, open_store(spec.output, settings.transient_window))
        if ledger.status() == "complete":
            say(f"job {job_id} is complete: nothing to resume")
            return cli.EXIT_OK
    else:
        store = find_job(open_store(output, settings.transient_window), job_id)
        if store.store.exists(store.layout.manifest) and store.manifest().status == "complete":
            say(f"job {job_id} is complete ({store.locate()}): nothing to resume")
            return cli.EXIT_OK
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
        return cli.EXIT_RUNNING
    queues = pipeline.job_queues(spec)
    watchdog = Watchdog(ledger, app, settings.stall_timeout, cli.warn, queues, settings.queue_wait)

    def tick() -> None:
        if on_tick is not None:
            on_tick()
        watchdog()

    snap = follow(ledger, as_json=as_json, console=cli.console, on_tick=tick)
    if snap.status == "failed":
        raise cli.JobEnded(f"job {job_id} failed: {snap.error}", "See the worker logs")
    cli.show_summary(store.manifest(), store.locate(), as_json)
    return cli.EXIT_OK if snap.status == "complete" else cli.EXIT_INCOMPLETE


@click.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Stop a job on the fleet in REDIS_URL.

    The job ends `failed` ("cancelled"): workers drop its queued units and steps as
    they reach them (a unit already running finishes), and nothing more is written.
    `resume JOB_ID` takes it up again. Exit code: 0 cancelled or already finished, 2 no
    such job or no broker.
    """
    settings = cli.current_settings()
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
            cli.console.print(f"job {job_id} is already {status}: nothing to cancel")
            sys.exit(cli.EXIT_OK)
        ledger.fail("cancelled with `embed-collections cancel`", settings.ledger_ttl)
        cli.console.print(
            f"job {job_id} cancelled; `embed-collections resume {job_id}` takes it up again"
        )
        sys.exit(cli.EXIT_OK)
    except EmbedFleetError as exc:
        cli.fail(exc)


def _find_local_job(root: Path, job_id: str) -> JobStore:
    """The finished job of that id in a local output folder (any collection)."""
    for path in sorted(root.expanduser().glob(f"*/{safe_name(job_id)}/manifest.json")):
        return JobStore(LocalStore(root), path.parent.parent.name, job_id)
    raise EmbedFleetError(
        f"no manifest for job {job_id!r} under {root}",
        "Pass --output where the job wrote, or set REDIS_URL to ask the fleet's ledger",
    )
