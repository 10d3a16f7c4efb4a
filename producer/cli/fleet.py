"""The fleet itself: ``leases`` (which worker holds which GPU), ``queues`` (the work
waiting, as an autoscaler reads it) and ``jobs`` (the jobs sharing it)."""

from __future__ import annotations

from collections.abc import Callable

import click
import msgspec
import redis
from kombu.exceptions import OperationalError
from rich.table import Table

from producer.backlog import Exporter, FleetBacklog, read_backlog
from producer.cli.app import console, current_settings, fail, make_console
from producer.fleet_jobs import running_jobs
from shared.control.celery_app import make_app
from shared.control.leases import list_leases
from shared.control.ledger import connect
from shared.control.settings import Settings, redact_url
from shared.records.errors import EmbedFleetError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def leases(as_json: bool) -> None:
    """List the GPU leases of the fleet: which worker holds which physical GPU.

    GPU workers (queues dense, rerank) take a lease on a device, by its UUID, when they
    start and renew it while they run; a stopped worker gives it back, a crashed one's
    lease expires within its TTL (30 s). Host and cuda index are where the holder sees
    the device (a container's own hostname and numbering).
    """
    settings = current_settings()
    try:
        held = list_leases(_fleet_redis(settings, "leases"))
    except EmbedFleetError as exc:
        fail(exc)
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


@click.command()
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
    settings = current_settings()
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
        fail(exc if isinstance(exc, EmbedFleetError) else _redis_unreachable(exc, settings))
    if as_json:
        click.echo(msgspec.json.encode(backlog).decode())
        return
    table = Table(title="Fleet queues", title_justify="left")
    for column in ("queue", "waiting", "unacked", "parked", "backlog", "workers"):
        table.add_column(column, justify="left" if column in ("queue", "workers") else "right")
    for name, counts in backlog.queues.items():
        table.add_row(
            name,
            str(counts.waiting),
            str(counts.unacked),
            str(counts.parked),
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def jobs(as_json: bool) -> None:
    """List the jobs the fleet is running: priority, share, progress and ETA.

    A job's share is its part of the units the workers hold right now (taken and not
    yet acknowledged), so it says what the job gets of the fleet, not what it asked for;
    see `run --priority` for how jobs take turns and `run --max-in-flight` for a job's
    cap on the units it runs at once. Progress and ETA are those of the job's
    current stage, at its rate so far. Finished jobs are not listed (`status` lists the
    recent ones).
    """
    settings = current_settings()
    try:
        client = _fleet_redis(settings, "a fleet's jobs", settings.transient_window)
        running = running_jobs(client)
    except EmbedFleetError as exc:
        fail(exc)
    if as_json:
        for job in running:
            click.echo(msgspec.json.encode(job).decode())
        return
    if not running:
        console.print("no job is running on this fleet")
        return
    table = Table(title="jobs on the fleet", title_justify="left")
    for column in ("job", "collection", "priority", "status", "stage", "progress", "share", "ETA"):
        table.add_column(column, justify="right" if column in ("share", "ETA") else "left")
    for job in running:
        total = f"{job.total:,}" if job.total is not None else "?"
        table.add_row(
            job.job_id,
            job.collection,
            job.priority,
            job.status,
            job.phase,
            f"{job.done:,}/{total}",
            f"{job.share:.0%} ({job.in_flight}"
            + (f", at most {job.max_in_flight} a stage)" if job.max_in_flight else ")"),
            f"{job.eta_s:,.0f} s" if job.eta_s is not None else "-",
        )
    console.print(table)


def _fleet_redis(settings: Settings, what: str, window_s: float = 0.0) -> redis.Redis:
    """The fleet's Redis, where ``what`` lives (calls ride out ``window_s`` of outage);
    an error saying so without a broker."""
    if not settings.broker_url:
        raise EmbedFleetError(
            f"no broker configured: {what} live in the fleet's Redis",
            "Set REDIS_URL to the Redis your workers use",
        )
    return connect(settings.broker_url, window_s)
