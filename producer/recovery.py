"""Taking a job up again from its object store: ``embed-collections resume``.

The store is the job's durable record (see ``shared.records.job_store``): its copy of the job
(``work/job.msgpack``, written before the first batch), the staged batches, the
workers' shards and models, and the producer's report (written once every batch was
staged). The Redis ledger is progress that can be rebuilt from them. So a job can be
taken up again after

- Redis lost its data (no AOF, a new instance, the embedded fleet's private Redis):
  :func:`rebuild_ledger` writes the ledger again from the store;
- its producer stopped while staging (killed, Ctrl-C, a lost host):
  :func:`finish_staging` reads the source again and stages the batches that are not
  in the store. Chunking is deterministic, so the batch ids come out the same. It runs
  where the source is.

Either way the fleet's resume step then records the units whose outputs are there and
enqueues the others (``workers.aggregate.resume``).
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from producer.jobs import PreparedJob, Stager, validate
from producer.queries import load_query_set
from shared.control import pipeline
from shared.control.ledger import JobLedger
from shared.inputs.chunking import chunker_for
from shared.inputs.locations import locate
from shared.inputs.sources import ReadProgress, open_source
from shared.records import ids
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.schemas import JobRecord, ProducerReport
from shared.records.storage import ObjectStore, safe_name


def find_job(store: ObjectStore, job_id: str) -> JobStore:
    """The job of that id under an output URL, whatever its collection (one listing of
    the collections, then one lookup per collection)."""
    name = safe_name(job_id)
    for collection in store.folders():
        candidate = JobStore(store, collection, name)
        if store.exists(candidate.layout.job_record):
            return JobStore(store, collection, job_id)
    raise EmbedFleetError(
        f"no job {job_id!r} under {store.url} (neither in the ledger nor in the store)",
        "Pass the --output the job was run with (or set EMBED_FLEET_OUTPUT); jobs of "
        "embed-fleet before 0.9 kept no record in the store and cannot be rebuilt",
    )


def rebuild_ledger(ledger: JobLedger, store: JobStore) -> JobRecord:
    """Write the job's ledger again from its object store; returns the job's record.

    A staged batch's item count is not read back from its object (that would be one
    read per batch): every batch holds ``batch_chunks`` items but the last one of its
    kind, and the producer's report and the spec give the totals. A job whose producer
    did not finish gets no staged batches here: :func:`finish_staging` records them all
    as it goes through the source again.
    """
    record = store.job_record()
    if record is None:
        raise EmbedFleetError(
            f"job {ledger.job_id} has no record in {store.locate()}",
            "Pass the --output the job was run with",
        )
    spec = record.spec
    producer = store.producer_report()
    if spec.prepare_on == "fleet":
        return _rebuild_fleet_prepared(ledger, store, record, producer)
    staged = store.staged_batch_ids() if producer else []
    documents = [b for b in staged if not ids.is_query_batch(b)]
    queries = [b for b in staged if ids.is_query_batch(b)]
    ledger.rebuild(
        record,
        producer,
        _items(documents, spec.batch_chunks, producer.chunks if producer else 0),
        _items(queries, spec.batch_chunks, producer.queries if producer else 0),
        store.models(),
    )
    return record


def _rebuild_fleet_prepared(
    ledger: JobLedger, store: JobStore, record: JobRecord, producer: ProducerReport | None
) -> JobRecord:
    """A job the fleet prepares: its read ranges (the validate phase the producer
    opened), the batches of every range chunked so far (each range's record names them
    with their chunks) and the queries the producer staged; the resume step re-drives
    the first phase not done."""
    spec = record.spec
    plan = store.read_plan()
    documents: dict[str, int] = {}
    for part in plan.ranges:
        chunked = store.chunked(ids.range_id(part.index))
        if chunked is not None:
            documents.update(chunked.batches)
    retrieval = spec.retrieval
    staged = store.staged_batch_ids() if retrieval else []
    queries = [b for b in staged if ids.is_query_batch(b)]
    total = retrieval.queries if retrieval else 0
    ledger.rebuild(
        record,
        producer,
        documents,
        _items(queries, spec.batch_chunks, total),
        store.models(),
        state_extra={pipeline.phase("validate").total_field: len(plan.ranges)},
    )
    return record


def _items(batches: list[str], per_batch: int, total: int) -> dict[str, int]:
    """Items per batch when each holds ``per_batch`` but the last, which holds the rest
    of ``total``."""
    counts = dict.fromkeys(batches, per_batch)
    if batches:
        counts[batches[-1]] = max(1, total - per_batch * (len(batches) - 1))
    return counts


def finish_staging(
    ledger: JobLedger,
    store: JobStore,
    app: Celery,
    ledger_ttl: float,
    on_progress: Callable[[ReadProgress, int], None] | None = None,
    transient_window_s: float = 0.0,
) -> ProducerReport:
    """Stage what a stopped producer did not, from the job's source (which must be
    here, unchanged), and seal the job; nothing is enqueued (the resume step does it).

    Raises:
        EmbedFleetError: the source is not here, or it changed since the job began.
    """
    record = store.job_record()
    if record is None:
        raise EmbedFleetError(
            f"job {ledger.job_id} has no record in {store.locate()}: its producer stopped "
            "before it staged anything",
            "Run the collection again as a new job",
        )
    spec = record.spec
    where = "Run `embed-collections resume` on the machine that has the job's source"
    try:
        source = open_source(spec.source, spec.fields, transient_window_s)
    except EmbedFleetError:
        raise EmbedFleetError(
            f"job {spec.job_id} was not fully submitted, and its source {spec.source} "
            "is not here to stage the rest from",
            where,
        ) from None
    validation = validate(source, spec.on_bad_record, on_progress)
    if (validation.documents, validation.bytes_total) != (
        record.documents_total,
        record.bytes_total,
    ):
        raise EmbedFleetError(
            f"the source {spec.source} changed since job {spec.job_id} began "
            f"({record.documents_total} documents, {record.bytes_total} bytes then; "
            f"{validation.documents}, {validation.bytes_total} now)",
            "Run the collection again as a new job",
        )
    chunker = chunker_for(spec)
    retrieval = spec.retrieval
    queries = (
        load_query_set(
            locate(retrieval.queries_source, transient_window_s),
            locate(retrieval.qrels_source, transient_window_s) if retrieval.qrels_source else None,
        )
        if retrieval
        else None
    )
    job = PreparedJob(spec, source, chunker, store.store, validation, queries)
    stager = Stager(job, ledger, app, ledger_ttl, already_staged=set(store.staged_batch_ids()))
    stager.run()
    if stager.error is not None:
        raise stager.error
    assert stager.report is not None
    return stager.report
