"""``embed-collections export``: a finished job's vectors in a search engine's format."""

from __future__ import annotations

from pathlib import Path

import click

from producer.cli.app import console, current_settings, fail
from producer.search_exports import TARGETS, export_faiss, export_pyserini, finished_job
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
    settings = current_settings()
    try:
        store = open_store(output or settings.output, settings.transient_window)
        job = finished_job(store, job_id)
        if target == "faiss":
            report = export_faiss(job, out_dir)
        else:
            report = export_pyserini(job, out_dir, quantize)
    except EmbedFleetError as exc:
        fail(exc)
    for written in report.files:
        console.print(f"{written.path}  {written.records} records  {written.model}".rstrip())
    console.print(f"{report.chunks} chunks of job {job_id} exported to {out_dir} ({target})")
