"""What every command shares: the ``embed-collections`` group, the console, how an error
ends a command (one line and an exit code), the embedded fleet of a run without a
broker, and the summary a finished job prints."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import ClassVar, NoReturn

import click
import redis
from rich.console import Console

from producer.follow import emit_json, metrics_table, rerank_line, reuse_lines, summary_table
from producer.local_fleet import LocalFleet, local_queues, preload_list
from shared.control.ledger import connect
from shared.control.settings import Settings, env_name
from shared.records import logs
from shared.records.errors import EmbedFleetError, ExitCode
from shared.records.schemas import JobSpec, Manifest

# The exit codes of every command (see ExitCode for what each means).
EXIT_OK = ExitCode.OK
EXIT_INCOMPLETE = ExitCode.INCOMPLETE
EXIT_RUNNING = ExitCode.RUNNING
EXIT_INTERRUPTED = ExitCode.INTERRUPTED

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


class ByteSize(click.ParamType[int, object]):
    """A size as bytes (``1048576``) or with a binary or decimal unit (``512KiB``,
    ``64MiB``, ``1GiB``, ``10MB``; case and a space before the unit do not matter)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        number = text.rstrip("kmgib ")
        unit = text[len(number) :].strip()
        try:
            size = int(float(number) * self._UNITS[unit])
        except (KeyError, ValueError):
            self.fail(f"{value!r} is not a size (try 1048576, 512KiB, 64MiB or 1GiB)", param, ctx)
        if size < 1:
            self.fail(f"{value!r} must be at least 1 byte", param, ctx)
        return size


def fail(exc: EmbedFleetError, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    sys.exit(code)


def warn(message: str) -> None:
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

    SIGTERM (``kill``, ``timeout``, a CI runner) is taken as Ctrl-C: exit 130.
    """
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        settings = Settings.from_env()
    except EmbedFleetError as exc:
        fail(exc)
    logs.configure(settings.log_level)
    ctx.obj = settings


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C, so a command told to stop leaves nothing behind: Python's
    default would end the process at once, before the embedded fleet's workers and
    Redis are stopped (they would outlive it) and without the message saying how to
    resume."""
    raise KeyboardInterrupt


def current_settings() -> Settings:
    """The settings ``main`` read once for this command."""
    settings: Settings = click.get_current_context().find_root().obj
    return settings


def no_detach_without_broker(detach: bool) -> None:
    if detach:
        raise EmbedFleetError(
            "--detach needs a shared broker: the embedded fleet stops when this command ends",
            "Set REDIS_URL to a Redis that your workers use",
        )


@contextlib.contextmanager
def embedded_fleet(
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


def show_summary(manifest: Manifest, location: str, as_json: bool) -> None:
    if as_json:
        emit_json("summary", {"location": location, "manifest": manifest})
        return
    console.print(summary_table(manifest, location))
    rerank = rerank_line(manifest)
    if rerank:
        console.print(rerank, highlight=False)
    for line in reuse_lines(manifest):
        console.print(line, highlight=False, soft_wrap=True)
    quality = metrics_table(manifest)
    if quality is not None:
        console.print(quality)
    for missing in manifest.missing[:10]:
        console.print(
            f"[yellow]missing[/] {missing.stage} batch {missing.batch_id} "
            f"({len(missing.chunk_ids)} chunks): {missing.reason}"
        )
