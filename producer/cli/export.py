"""``embed-collections export``: a finished job's vectors in a search engine's format, or
what changed since an older job, for a vector store."""

from __future__ import annotations

from pathlib import Path

import click

from producer.cli.app import console, current_settings, fail
from producer.delta_export import DeltaReport, export_delta, old_job_reference
from producer.search_exports import (
    TARGETS,
    ExportReport,
    export_faiss,
    export_pyserini,
    finished_job,
)
from shared.records.earlier_jobs import earlier_job
from shared.records.errors import EmbedFleetError
from shared.records.storage import open_store


@click.command("export")
@click.argument("job_id")
@click.option(
    "--to",
    "target",
    type=click.Choice(TARGETS),
    required=True,
    help="pyserini-sparse: Anserini JsonVectorCollection files (a folder per sparse "
    "model, a file per part). faiss: a FAISS inner-product index per dense model, and "
    "ids.txt (line i: the chunk id of vector i). delta: what changed since the job "
    "--against names: upserts/part-NNNNN.parquet (the rows added or changed, with the "
    "parts' schema), deletes.parquet (the chunk ids gone) and delta.json.",
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
@click.option(
    "--against",
    metavar="OLD_JOB",
    default=None,
    help="delta: the old job, by its id under the same --output or the folder (path or "
    "s3:// URL) that holds its manifest.json. Default: the job JOB_ID reused vectors "
    "from.",
)
@click.option(
    "--drop-columns",
    metavar="COLUMNS",
    default="",
    help="delta: vector columns to leave out of the comparison and the upserts, comma "
    "separated (e.g. sparse_bm25: BM25's weights are the collection's own, so nearly "
    "every row's change with any document).",
)
def export_command(
    job_id: str,
    target: str,
    out_dir: Path,
    output: str | None,
    quantize: int,
    against: str | None,
    drop_columns: str,
) -> None:
    """Write a finished job's vectors where a search engine loads them, or, with
    `--to delta`, what a vector store that holds an older job must change.

    Then, e.g.: `python -m pyserini.index.lucene --collection JsonVectorCollection
    --input DIR/<model> --index idx --generator DefaultLuceneDocumentGenerator --impact
    --pretokenized`, or `faiss.read_index("DIR/<model>.faiss")` with DIR/ids.txt, or
    delete DIR/deletes.parquet's chunk ids from the store and upsert
    DIR/upserts/*.parquet by chunk_id.
    Exit code: 0 written, 2 no such job, nothing of that kind to export, or two jobs a
    delta cannot compare.
    """
    if (against is not None or drop_columns) and target != "delta":
        raise click.UsageError("--against and --drop-columns only apply to --to delta")
    settings = current_settings()
    report: ExportReport | DeltaReport
    try:
        store = open_store(output or settings.output, settings.transient_window)
        job = finished_job(store, job_id)
        if target == "delta":
            reference = old_job_reference(job.manifest(), against)
            old = earlier_job(reference, store, settings.transient_window)
            drop = [c.strip() for c in drop_columns.split(",") if c.strip()]
            report = export_delta(job, old, out_dir, drop)
        elif target == "faiss":
            report = export_faiss(job, out_dir)
        else:
            report = export_pyserini(job, out_dir, quantize)
    except EmbedFleetError as exc:
        fail(exc)
    if isinstance(report, DeltaReport):
        for file in report.files:
            console.print(f"{file.path}  {file.rows} rows")
        counts = report.counts
        console.print(
            f"{counts.upserts} upserts ({counts.added} added, {counts.changed} changed), "
            f"{counts.deletes} deletes, {counts.unchanged} unchanged: job {job_id} against "
            f"{report.old_job_id} exported to {out_dir} (delta)"
        )
        return
    for written in report.files:
        console.print(f"{written.path}  {written.records} records  {written.model}".rstrip())
    console.print(f"{report.chunks} chunks of job {job_id} exported to {out_dir} ({target})")
