"""Following a job through the ledger: the live view, then a summary table.

Each stage gets a progress bar and its live figures beside it: throughput, latency
p50/p95 per unit, model batch sizes (min/p50/max), peak memory (GPU, or the worker's
RSS on a CPU), out-of-memory retries and, for reranking, coverage. The same snapshots
(with the figures) go out as JSON lines with ``--json``, for scripts and dashboards.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from producer.backlog import share_of
from shared.control import pipeline
from shared.control.ledger import JobLedger
from shared.records.schemas import JobProgress, LatencySummary, Manifest

# human_bytes is the CLI's too (it imports it from here).
from shared.records.text import human_bytes as human_bytes
from shared.records.text import peak_text

FINISHED = ("complete", "partial", "failed")


def counts_tasks(stage: str) -> bool:
    """Whether a stage's bar counts its tasks (known once its phase opened) rather than
    the job's chunks (see :mod:`shared.control.pipeline`)."""
    return pipeline.stage(stage).counts == "tasks"


def emit_json(event: str, payload: object) -> None:
    line = msgspec.json.encode({"event": event, **msgspec.to_builtins(payload)})
    sys.stdout.write(line.decode() + "\n")
    sys.stdout.flush()


def follow(
    ledger: JobLedger,
    *,
    as_json: bool,
    console: Console,
    on_tick: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> JobProgress:
    """Poll the ledger until the job finishes; return the last snapshot.

    Ctrl-C raises ``KeyboardInterrupt`` between polls, never inside a Redis call or a
    redraw: an interrupt that lands while rich holds its display lock would leave the
    lock taken and hang the exit.

    Args:
        on_tick: Called every poll; raising from it stops following (the embedded
            fleet uses it to notice a dead worker).
    """
    with _interrupt_between_polls() as interrupted:

        def tick() -> None:
            if on_tick:
                on_tick()
            if interrupted.wait(poll_s):
                raise KeyboardInterrupt

        return _follow(ledger, as_json=as_json, console=console, tick=tick)


# What interrupts a follower: Ctrl-C, and SIGTERM, which every command takes as Ctrl-C.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _interrupt_between_polls() -> Iterator[threading.Event]:
    """SIGINT (and SIGTERM) sets an event instead of raising wherever the main thread
    happens to be."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = {
        sig: signal.signal(sig, lambda signum, frame: interrupted.set()) for sig in INTERRUPTS
    }
    try:
        yield interrupted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _follow(
    ledger: JobLedger, *, as_json: bool, console: Console, tick: Callable[[], None]
) -> JobProgress:
    if as_json:
        last = b""
        while True:
            snap = _snapshot(ledger)
            encoded = msgspec.json.encode(snap)
            if encoded != last:
                emit_json("progress", snap)
                last = encoded
            if snap.status in FINISHED:
                return snap
            tick()

    if not console.is_terminal:
        return _follow_plain(ledger, console=console, tick=tick)
    columns = (
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[figures]}"),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        shown: dict[str, TaskID] = {}
        while True:
            snap = _snapshot(ledger)
            for row in progress_rows(snap):
                if row.name not in shown:
                    shown[row.name] = bars.add_task(row.name, total=None, unit=row.unit, figures="")
                bars.update(
                    shown[row.name], completed=row.done, total=row.total, figures=row.figures
                )
            if snap.status in FINISHED:
                return snap
            tick()


def _snapshot(ledger: JobLedger) -> JobProgress:
    """The ledger's snapshot with the job's share of the fleet's units in hand."""
    snap = ledger.progress(detail=True)
    if snap.status not in FINISHED:
        snap.fleet_share = share_of(ledger.client, ledger.job_id)
    return snap


# With no terminal (a script, CI, a log file): one plain line this often, and on every
# change of the job's status.
PLAIN_EVERY_S = 10.0


def _follow_plain(ledger: JobLedger, *, console: Console, tick: Callable[[], None]) -> JobProgress:
    """The live view as plain lines, for logs: a bar that redraws in place is noise
    there, and rich shows nothing at all until the end when there is no terminal."""
    started = time.monotonic()
    last_at, last_status = -PLAIN_EVERY_S, ""
    while True:
        snap = _snapshot(ledger)
        now = time.monotonic()
        if snap.status != last_status or now - last_at >= PLAIN_EVERY_S or snap.status in FINISHED:
            console.print(plain_line(snap, now - started), highlight=False, soft_wrap=True)
            last_at, last_status = now, snap.status
        if snap.status in FINISHED:
            return snap
        tick()


class ProgressRow(msgspec.Struct):
    """One line of the live view: a bar on a terminal, a part of a plain line in a log."""

    name: str
    done: int
    total: int | None
    unit: str
    figures: str = ""


def progress_rows(snap: JobProgress) -> list[ProgressRow]:
    """What the live view shows of a snapshot: the read, then each stage whose phase has
    opened (an encode stage: once its first batch is staged)."""
    read = (
        ""
        if not snap.bytes_total
        else (f"{human_bytes(snap.bytes_read)} of {human_bytes(snap.bytes_total)}")
    )
    # The fleet counts the documents once every range is validated.
    if snap.fleet_share is not None:  # a shared fleet's workers hold units: this job's part
        read = f"{read} · {snap.fleet_share:.0%} of the fleet's units in hand".lstrip(" ·")
    rows = [ProgressRow("read", snap.documents_read, snap.documents_total or None, "docs", read)]
    sealed = snap.total_batches is not None
    for stage in snap.stages:
        phase = counts_tasks(stage.stage)
        encodes = pipeline.stage(stage.stage).phase == "encode"
        opened = stage.total is not None or (encodes and (snap.staged_batches or sealed))
        if not opened:
            continue
        figures = ""
        if stage.summary is not None and stage.summary.batches:
            figures = figures_text(stage.summary, rerank=stage.stage == "rerank")
        if phase:
            rows.append(ProgressRow(stage.stage, stage.batches_done, stage.total, "tasks", figures))
        else:
            total = snap.staged_chunks if sealed else None
            rows.append(ProgressRow(stage.stage, stage.chunks_done, total, "chunks", figures))
    return rows


def plain_line(snap: JobProgress, elapsed_s: float) -> str:
    """``[0:42] job J running · read 1400/1400 docs · dense 640/1837 chunks (45.8/s ...)``"""
    minutes, seconds = divmod(int(elapsed_s), 60)
    parts = [f"[{minutes}:{seconds:02d}] job {snap.job_id} {snap.status}"]
    for row in progress_rows(snap):
        total = "?" if row.total is None else str(row.total)
        figures = f" ({row.figures})" if row.figures else ""
        parts.append(f"{row.name} {row.done}/{total} {row.unit}{figures}")
    return " · ".join(parts)


def figures_text(summary: LatencySummary, rerank: bool = False) -> str:
    """One line of a stage's live figures, beside its bar."""
    parts = [
        f"{summary.items_per_s:.1f}/s",
        f"p50 {summary.p50_s:.2f}s p95 {summary.p95_s:.2f}s",
    ]
    if summary.items_reused:  # run --reuse: taken from the earlier job, not encoded
        parts.insert(0, f"{summary.items_reused:,} reused")
    if summary.batch_size_max:
        sizes = f"{summary.batch_size_min}/{summary.batch_size_p50}/{summary.batch_size_max}"
        parts.append(f"batch {sizes}")
    if summary.peak_memory_bytes:
        parts.append(f"peak {peak_text(summary)}")
    if summary.oom_count:
        parts.append(f"OOM {summary.oom_count}")
    if rerank:
        parts.append(f"coverage {summary.coverage:.3f}")
    return " · ".join(parts)


def summary_table(manifest: Manifest, location: str) -> Table:
    """The end-of-run table: counts, throughput, per-stage latency and batch sizes."""
    counts = manifest.counts
    table = Table(title=f"job {manifest.job_id} — {manifest.status}", title_justify="left")
    table.add_column("stage")
    table.add_column("batches", justify="right")
    table.add_column("items", justify="right")
    table.add_column("items/s", justify="right")
    table.add_column("p50 s", justify="right")
    table.add_column("p95 s", justify="right")
    table.add_column("model batch sizes", justify="right")
    table.add_column("peak memory", justify="right")
    table.add_column("OOM", justify="right")
    table.add_column("learned budget", justify="right")
    for name, stage in manifest.stages.items():
        sizes = (
            f"{stage.batch_size_min}/{stage.batch_size_p50}/{stage.batch_size_max}"
            if stage.batch_size_max
            else "-"
        )
        budget = min(stage.budgets.values()) if stage.budgets else None
        table.add_row(
            name,
            str(stage.batches),
            str(stage.items),
            f"{stage.items_per_s:.1f}",
            f"{stage.p50_s:.3f}",
            f"{stage.p95_s:.3f}",
            sizes,
            peak_text(stage),
            str(stage.oom_count) if stage.batches else "-",
            f"{budget} tok" if budget else "-",
        )
    table.caption = (
        f"{counts.documents} documents, {counts.chunks} chunks "
        f"({counts.chunks_exported} exported), {counts.empty_documents} empty, "
        f"{counts.skipped_records} skipped, {counts.failed_batches} failed batches; "
        f"batch sizes min/p50/max; learned budget: padded tokens per model batch"
        f"\nartifacts: {location}"
    )
    if any(a.key.endswith("/report.html") for a in manifest.artifacts):
        table.caption += f"\nreport: {location}/report.html (opens offline in a browser)"
    table.caption_justify = "left"
    return table


def metrics_table(manifest: Manifest) -> Table | None:
    """Retrieval quality per ranking, and what the reranker covered."""
    if not manifest.metrics:
        return None
    judged = max(m.queries for m in manifest.metrics.values())
    table = Table(title=f"retrieval quality ({judged} judged queries)", title_justify="left")
    for column in ("ranking", "nDCG@10", "Recall@100", "MRR@10"):
        table.add_column(column, justify="left" if column == "ranking" else "right")
    for name, m in manifest.metrics.items():
        table.add_row(name, f"{m.ndcg_at_10:.4f}", f"{m.recall_at_100:.4f}", f"{m.mrr_at_10:.4f}")
    return table


def reuse_lines(manifest: Manifest) -> list[str]:
    """What a ``--reuse`` job took from its earlier job, and why a model took nothing."""
    changes = manifest.changes
    if changes is None:
        return repeat_lines(manifest)
    job = changes.against_job or changes.against
    if changes.refused:
        return [f"reuse: none from {job} ({changes.refused}); every chunk was encoded"]
    documents = changes.documents
    lines = [
        f"reuse: job {job}: documents {documents.added:,} added, {documents.changed:,} "
        f"changed, {documents.removed:,} removed, {documents.unchanged:,} unchanged; "
        f"{changes.chunks_found:,} of {changes.chunks:,} chunks found there"
    ]
    if changes.lost:
        lines.append(
            f"  {changes.chunks_lost:,} of them encoded after all: the earlier job's output "
            f"went or changed during this job ({changes.lost})"
        )
    for model, reused in changes.reused.items():
        line = f"  {model}: {reused:,} reused, {changes.encoded.get(model, 0):,} encoded"
        if repeats := changes.repeats.get(model, 0):
            line += f", {repeats:,} repeats of a text served its vector"
        if reused == 0 and changes.chunks_found:
            line += (
                f" (its model key differs from job {job}'s: another dtype, weights or "
                "tokenizer; see the manifests' chunks.model_keys)"
            )
        lines.append(line)
    return lines


def repeat_lines(manifest: Manifest) -> list[str]:
    """For a job without ``--reuse``: the chunks each model did not encode because
    another chunk of the job has their text (none: nothing to say)."""
    chunks = manifest.counts.chunks_exported
    served = {m: chunks - n for m, n in manifest.counts.encoded.items() if 0 < n < chunks}
    if not served:
        return []
    return [
        f"repeats: {model}: {count:,} of {chunks:,} chunks hold a text another chunk has, "
        "and took its vector instead of being encoded"
        for model, count in served.items()
    ]


def rerank_line(manifest: Manifest) -> str | None:
    run = manifest.rerank_run
    if run is None:
        return None
    fallbacks = ", ".join(f"{k} {v}" for k, v in run.fallbacks.items()) or "no fallbacks"
    return (
        f"rerank: {run.pairs_scored}/{run.pairs_asked} pairs scored (coverage "
        f"{run.coverage:.3f}) on {run.device} {run.dtype}; {run.oom_count} OOM, "
        f"{run.timeout_count} timeouts, {fallbacks}"
    )
