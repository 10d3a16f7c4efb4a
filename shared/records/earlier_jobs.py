"""A finished job named by the user: by its id under an output, or by its folder.

``run --reuse JOB`` and ``export --to delta`` both read an earlier job's output. A user
names it the way they see it: the job id the CLI printed (looked up under the same
``--output``), or the folder that holds its ``manifest.json``, on disk or on S3
(``<output>/<collection>/<job_id>``). Both come to the same :class:`JobStore`, so the
readers after this never care which was given.
"""

from __future__ import annotations

from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.schemas import Manifest
from shared.records.storage import ObjectStore, open_store


def finished_job(store: ObjectStore, job_id: str) -> JobStore:
    """The finished job of that id under an output, whatever its collection (its
    ``work/`` is gone by then: the manifest is what says it finished)."""
    for collection in store.folders():
        job = JobStore(store, collection, job_id)
        if store.exists(job.layout.manifest):
            return job
    raise EmbedFleetError(
        f"no finished job {job_id!r} under {store.url} (no manifest.json)",
        "Pass the --output the job was run with (or set EMBED_FLEET_OUTPUT); a job that "
        "is still running has nothing to export yet",
    )


def is_folder_reference(reference: str) -> bool:
    """Whether the user named a folder (a path or ``s3://`` URL) rather than a job id:
    job ids never hold a ``/``."""
    return "/" in reference


def earlier_job(reference: str, output: ObjectStore, transient_window_s: float = 0.0) -> JobStore:
    """The finished job ``reference`` names: a job id under ``output``, or the folder
    (local path or ``s3://`` URL) that holds its ``manifest.json``.

    Raises:
        EmbedFleetError: nothing finished there, naming where it looked.
    """
    if not is_folder_reference(reference):
        return finished_job(output, reference)
    trimmed = reference.rstrip("/")
    root, _, job_id = trimmed.rpartition("/")
    base, _, collection = root.rpartition("/")
    if not (base and collection and job_id) or base.endswith(":/"):
        raise EmbedFleetError(
            f"{reference!r} is not a job's folder",
            "Name the folder that holds the job's manifest.json "
            "(OUTPUT/COLLECTION/JOB_ID), or give the job id with the same --output",
        )
    job = JobStore(open_store(base, transient_window_s), collection, job_id)
    if not job.store.exists(job.layout.manifest):
        raise EmbedFleetError(
            f"no finished job in {trimmed} (no manifest.json there)",
            "Name the folder that holds the job's manifest.json "
            "(OUTPUT/COLLECTION/JOB_ID), or give the job id with the same --output",
        )
    return job


def refusal(manifest: Manifest) -> str:
    """Why an earlier job's output cannot be reused at all ("" when it can)."""
    layout = manifest.chunks
    if layout is None or not layout.parts:
        return f"job {manifest.job_id} exported no chunk parts"
    if layout.format != "parquet":
        return f"job {manifest.job_id} wrote {layout.format} parts (reuse reads Parquet)"
    if not layout.model_keys:
        return f"job {manifest.job_id} predates content keys (its parts have no text_key)"
    return ""


def folder_of(job: JobStore) -> str:
    """The job's folder as :func:`earlier_job` takes it back (what a spec keeps)."""
    return f"{job.store.url.rstrip('/')}/{job.layout.root}"
