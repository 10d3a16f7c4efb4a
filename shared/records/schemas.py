"""Every message and artifact record of the fleet, as msgspec Structs.

Producer and workers import these same types, so a message is checked against one
definition on both ends. Messages carry references (the job, the stage, the unit's
id); texts and vectors live in the object store, at keys ``shared.records.job_store`` derives.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np

from shared.control.fairness import Priority

FORMAT_VERSION = 2
"""2: chunks in parts (``chunks/part-NNNNN.parquet`` or ``.jsonl``) and sparse
vocabularies, described by the manifest's ``chunks``; 1 was one ``chunks.jsonl``."""

Stage = Literal["dense", "sparse"]
"""A per-batch encode stage: every staged batch goes through each stage of its job."""

BatchKind = Literal["documents", "queries"]
"""What a staged batch holds: document chunks, or queries (encoded, never exported)."""

Fusion = Literal["convex", "rrf"]
"""How per-retriever rankings are fused: a convex combination of min-max normalised
scores, or reciprocal rank fusion."""

DENSE_RANKING = "dense"
"""The name of the dense ensemble's ranking (each sparse model ranks under its own name)."""

SparseSource = Literal["live", "metadata", "missing"]
"""Where a chunk's sparse vector came from: the model, the chunk's ``metadata.sparse``
weights (fallback), or nowhere."""

ExportFormat = Literal["parquet", "jsonl"]
"""How the chunks are written: Parquet parts (vectors as fixed-size float32 lists, sparse
vectors as indices into a vocabulary) or JSONL parts (one ``ChunkRecord`` per line)."""

PrepareOn = Literal["fleet", "producer"]
"""Who reads, validates and chunks the collection: the fleet's ``prepare`` workers, one
read range each (the source must be readable at the same path there), or the producer
itself (one process; for a source only the producer's machine can read)."""

JobStatus = Literal[
    "preparing",
    "running",
    "retrieving",
    "fusing",
    "reranking",
    "exporting",
    "resuming",
    "complete",
    "partial",
    "failed",
]


# A record's bytes (64 MiB: a whole book is a few MB) and a document's chunks (10,000
# chunks of 256 tokens are some 2.5 million tokens, a long book) before it is a bad record.
DEFAULT_MAX_RECORD_BYTES = 64 * 2**20
DEFAULT_MAX_DOCUMENT_CHUNKS = 10_000


class Struct(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base: keyword-only fields so records read well and evolve safely."""


# --- collection side -----------------------------------------------------------------


class Document(Struct):
    """One record of a collection, as read from disk."""

    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = {}
    path: str = ""
    line: int = 0


class SkippedRecord(Struct):
    """A bad record skipped under ``--on-bad-record skip``.

    Attributes:
        first_seen: For a duplicate id, the line of the record that kept it (0 otherwise).
    """

    path: str
    line: int
    reason: str
    first_seen: int = 0

    @property
    def named(self) -> str:
        """``path:line: reason``, as an error names a bad record."""
        return f"{self.path}:{self.line}: {self.reason}"

    def shifted(self, lines: int) -> SkippedRecord:
        """The same record with its lines counted from a range's first line moved on by
        ``lines`` (the lines of the file before the range)."""
        if not lines:
            return self
        first = self.first_seen + lines if self.first_seen else 0
        reason = self.reason
        if first:
            reason = f"{reason.split(' (first seen at line ')[0]} (first seen at line {first})"
        return SkippedRecord(
            path=self.path, line=self.line + lines, reason=reason, first_seen=first
        )


SourceKind = Literal["beir", "jsonl", "text-dir", "csv", "parquet"]
"""A collection's layout (see :mod:`shared.inputs.sources`)."""


class FieldMap(Struct):
    """Which columns of a tabular source (CSV/TSV, Parquet) hold what.

    Attributes:
        id: The id column (``None``: ``id``, else ``_id``).
        text: The text column.
        title: The title column (``None``: ``title`` when there is one).
        metadata: Columns copied into every chunk's metadata.
    """

    id: str | None = None
    text: str = "text"
    title: str | None = None
    metadata: list[str] = []


class ReadRange(Struct):
    """A piece of a collection that one prepare unit reads: a byte range of a JSONL file
    cut at line boundaries, a run of row groups of a Parquet file, a whole compressed or
    CSV file, or a group of whole files of a text folder.

    Attributes:
        index: Its place in the collection's reading order.
        path: The file (or the text folder, the ids' root).
        start: First byte (JSONL), or first row group (Parquet).
        end: One past the last byte (JSONL; the range's last line ends there), or past
            the last row group (Parquet).
        files: A text folder's files in this range (paths under ``path``).
        bytes: How many bytes the range holds (compressed, on disk).
    """

    index: int
    path: str
    start: int = 0
    end: int = 0
    files: list[str] = []
    bytes: int = 0


class ReadPlan(Struct):
    """How the fleet reads a collection (``work/read-plan.msgpack``, written by the
    producer): its ranges in reading order and how many id partitions the duplicate
    check uses."""

    kind: SourceKind
    ranges: list[ReadRange]
    partitions: int


class RangeValidated(Struct):
    """What validating one range found. Lines count from the range's first line (a
    range does not know how many lines come before it); ``lines`` lets the next step add
    up where each range starts."""

    documents: int
    lines: int
    bytes: int
    skipped: list[SkippedRecord]
    skipped_count: int


class IdPartition(Struct):
    """The ids one range accepted whose hash falls in one partition, with their lines
    (from the range's first line): the duplicate check reads one partition of every
    range, so no process holds every id."""

    ids: list[str]
    lines: list[int]


class DuplicateId(Struct, array_like=True):
    """A record whose id an earlier record (in reading order) already has."""

    range: int
    line: int
    doc_id: str
    first_range: int
    first_line: int


class Duplicates(Struct):
    """The duplicates one id partition holds (lines from each range's first line)."""

    items: list[DuplicateId]


class Validation(Struct):
    """The whole collection's validation (``work/validation.msgpack``): documents,
    where each range's lines start, and the skipped records with file lines."""

    documents: int
    line_offsets: list[int]
    skipped: list[SkippedRecord]
    skipped_count: int
    # Duplicates across ranges are in the counts and the list (``plan_chunk``).
    duplicates_listed: bool = False


class RangeExclusions(Struct):
    """Ids a range must leave out when it chunks (duplicates of earlier records)."""

    doc_ids: list[str]


class RangeChunked(Struct):
    """What chunking one range staged: its batches (id -> chunks), in order."""

    documents: int
    chunks: int
    tokens: int
    batches: dict[str, int]
    empty_documents: list[str]
    started_at: float
    finished_at: float
    # Documents cut into more chunks than the job allows (bad records found by the cut;
    # listed up to MAX_LISTED_SKIPS, at file lines), and how many there were.
    skipped: list[SkippedRecord] = []
    skipped_count: int = 0
    # What a job that reuses an earlier job's vectors (``--reuse``) found of it.
    earlier: EarlierTally | None = None


class EarlierTally(Struct, array_like=True):
    """A range's documents against the earlier job (``run --reuse``): unchanged (the
    same chunks in the same order), changed, added; its chunks the earlier job had, and
    of those, the ones encoded after all (the earlier job went or changed while this
    one ran: ``lost`` says why)."""

    unchanged: int
    changed: int
    added: int
    found: int
    lost_chunks: int
    lost: str


class Chunk(Struct):
    """A piece of a document small enough for the first dense model.

    ``span`` is the character range in the document's ``text`` (the title, prepended
    to the first chunk, lies outside it).
    """

    chunk_id: str
    doc_id: str
    index: int
    text: str
    n_tokens: int
    span: tuple[int, int]
    metadata: dict[str, Any] = {}


IdDtype = Literal["uint16", "uint32"]
"""How staged token ids are stored: two bytes each while the vocabulary fits."""


class StagedTokens(Struct):
    """The token ids of a staged batch's chunks, as the chunk stage computed them.

    Each chunk's ids are its text's ids without special tokens, untruncated: what the
    tokenizer gives for ``chunk.text`` with ``add_special_tokens=False``. A worker whose
    model's tokenizer has the same ``tokenizer`` identity adds the model's special tokens
    and truncates them itself, so nothing tokenizes the text again (see
    :mod:`shared.inputs.tokens`).

    Attributes:
        tokenizer: The identity of the tokenizer that made the ids
            (:func:`shared.inputs.tokens.tokenizer_identity`).
        dtype: ``uint16`` when the vocabulary fits, else ``uint32``; little-endian.
        ids: Every chunk's ids, concatenated in chunk order.
        lengths: How many ids each chunk has.
    """

    tokenizer: str
    dtype: IdDtype
    ids: bytes
    lengths: list[int]


class ServedRow(Struct, array_like=True):
    """A chunk of a staged batch (``row``) whose text another chunk of the same job
    claimed first (``batch_id``, ``owner_row``): it is not encoded, and takes that
    chunk's vectors (see :mod:`shared.records.served_rows`)."""

    row: int
    batch_id: str
    owner_row: int


class ChunkBatch(Struct):
    """A staged batch of chunks: written by the producer (or a chunk unit), read by every
    encode stage. ``tokens``: the chunks' token ids (``None`` in batches staged before
    ids were kept)."""

    job_id: str
    batch_id: str
    chunks: list[Chunk]
    tokens: StagedTokens | None = None
    # Chunks of the batch an earlier job has vectors for (``--reuse``), staged beside
    # it as EarlierVectors; 0: none, nothing to read.
    earlier: int = 0
    # Chunks whose text another chunk of the job claimed first (shared.records.
    # served_rows): not encoded, given that chunk's vectors when the shard is read.
    served: list[ServedRow] = []
    # Where each chunk stands in reading order within its like-length window (the job's
    # ``sort_window`` batches, staged longest first: shared.inputs.chunking); the export
    # writes them back in that order. Empty: the batch's chunks are in reading order.
    reading: list[int] = []


# --- reuse of an earlier job's vectors (run --reuse; workers.prepare.reuse) ----------


class EarlierChunk(Struct, array_like=True):
    """Where an earlier job holds one chunk of a document: its text key, and the part
    and row its vectors are in."""

    text_key: str
    part: int
    row: int


class EarlierIndex(Struct):
    """The chunks of one earlier part whose document ids fall in one id partition
    (``work/reuse/index/<partition>/<part>.msgpack``), so the duplicate check of that
    partition also finds which documents the earlier job had. ``refused``: the part did
    not verify against its manifest (why), and nothing of the earlier job is reused."""

    doc_ids: list[str]
    chunks: list[EarlierChunk]
    refused: str = ""


class EarlierDocuments(Struct):
    """The documents of one range (and id partition) the earlier job also had, with
    their chunks there (``work/reuse/found/<range>/<partition>.msgpack``)."""

    doc_ids: list[str]
    chunks: list[list[EarlierChunk]]


class ReuseMatch(Struct):
    """What one id partition's match found (``work/reuse/match/<partition>.msgpack``):
    the earlier job's documents there, those this job no longer has, and why nothing is
    reused (``refused``, empty when reuse goes on)."""

    earlier_documents: int
    removed_documents: int
    refused: str = ""


class EarlierVectors(Struct):
    """The earlier job's vectors for some chunks of one staged batch
    (``work/reuse/vectors/<batch>.msgpack``), copied from its parts bit for bit.

    Attributes:
        rows: The chunks' positions in the batch.
        model_keys: Model -> the key of its earlier vectors: a worker takes them only
            where its own model has the same key.
        dense: Dense model -> one row per position.
        sparse: Sparse model -> one row per position (the earlier job's exported
            weights, by term).
    """

    rows: list[int]
    model_keys: dict[str, str]
    dense: dict[str, Matrix] = {}
    sparse: dict[str, list[SparseRow]] = {}


class Matrix(Struct):
    """A row-major float32 matrix as raw bytes (compact and exact in msgpack)."""

    rows: int
    dim: int
    dtype: Literal["float32"] = "float32"
    data: bytes = b""

    @classmethod
    def from_numpy(cls, array: np.ndarray[Any, Any]) -> Matrix:
        array = np.ascontiguousarray(array, dtype=np.float32)
        rows, dim = array.shape
        return cls(rows=rows, dim=dim, data=array.tobytes())

    def to_numpy(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.frombuffer(self.data, dtype=np.float32).reshape(self.rows, self.dim)


class SparseRow(Struct, array_like=True):
    """One chunk's sparse vector: token strings and weights (BM25: term counts)."""

    tokens: list[str]
    weights: list[float]
    source: SparseSource = "live"
    length: int = 0  # BM25: the chunk's length in terms


class SparseShard(Struct):
    """The sparse output of one batch: one row per chunk and model, in chunk order.

    For ``bm25`` the rows hold term frequencies and ``doc_freqs`` the batch's document
    frequencies; the aggregator turns them into BM25 weights once it has merged every
    batch's statistics.
    """

    job_id: str
    batch_id: str
    chunk_ids: list[str]
    rows: dict[str, list[SparseRow]]
    doc_freqs: dict[str, int] = {}
    errors: list[str] = []
    batch_sizes: list[int] = []
    # Model -> rows whose vectors were an earlier job's (``--reuse``), not encoded.
    reused: dict[str, int] = {}
    # Model -> distinct texts of the batch the model ran (a repeat within the unit, or
    # an earlier job's row, is not run again).
    encoded: dict[str, int] = {}
    # Rows whose text another chunk of the job claimed first: held empty here, filled
    # with that chunk's vectors as the shard is read (shared.records.served_rows).
    served: list[ServedRow] = []


class DenseShard(Struct):
    """The dense output of one batch: one matrix per model, rows in chunk order."""

    job_id: str
    batch_id: str
    chunk_ids: list[str]
    vectors: dict[str, Matrix]
    # Model -> rows whose vectors were an earlier job's (``--reuse``), not encoded.
    reused: dict[str, int] = {}
    # Model -> distinct texts of the batch the model ran (a repeat within the unit, or
    # an earlier job's row, is not run again).
    encoded: dict[str, int] = {}
    # Rows whose text another chunk of the job claimed first: held empty here, filled
    # with that chunk's vectors as the shard is read (shared.records.served_rows).
    served: list[ServedRow] = []


# --- messages ------------------------------------------------------------------------


class UnitMessage(Struct):
    """What every stage's task message holds: the job, the stage and the unit's id.

    A message names its unit and nothing else: the unit's inputs and outputs live at
    keys :class:`shared.records.job_store.JobStore` derives from these ids, and what the job
    asked for (models, budgets, dtype) is in its spec, which a worker reads once per job.
    """

    job_id: str
    stage: str
    unit: str

    @property
    def units(self) -> list[str]:
        """The units the ledger counts for this message: its own, or each one a message
        of several holds (:class:`EncodeBatch`, :class:`RerankGroup`)."""
        return [self.unit]

    def of_units(self, units: list[str]) -> UnitMessage:
        """The same message for ``units`` instead (the rest of a message a worker took
        part of, or one unit alone). Only a message of several units has such a copy."""
        raise TypeError(f"a {type(self).__name__} is one unit")


class EncodeBatch(UnitMessage, kw_only=True):
    """Staged batches for one encode stage (``dense``, ``sparse``): ``unit`` is the first
    batch's id, ``batch_ids`` every batch of the unit in order (empty: ``unit`` alone).

    A GPU stage takes several batches a message, so that its fixed cost per message
    (the broker, the ledger, the reads and writes) is small beside the model's time; a
    CPU stage takes one. The ledger still counts each batch (see
    :func:`shared.control.celery_app.EncodeUnits`).
    """

    kind: BatchKind = "documents"
    batch_ids: list[str] = []

    @property
    def batches(self) -> list[str]:
        """The staged batches this unit encodes."""
        return self.batch_ids or [self.unit]

    @property
    def units(self) -> list[str]:
        return self.batches

    def of_units(self, units: list[str]) -> EncodeBatch:
        return msgspec.structs.replace(
            self, unit=units[0], batch_ids=units if len(units) > 1 else []
        )


class RetrieveGroup(UnitMessage, kw_only=True):
    """Every query's top-k over one group of document shards, searched with the vectors
    of one encode stage (the ``retriever``: ``dense`` or ``sparse``)."""

    retriever: Stage
    batch_ids: list[str]


class FuseGroup(UnitMessage, kw_only=True):
    """Merge, fuse and write the candidates of a run of query groups (``unit``:
    ``f-g00000``; its query groups follow from the job's queries)."""


class RerankGroup(UnitMessage, kw_only=True):
    """Rerank the fused candidates of query groups: ``unit`` is the first group's id,
    ``group_ids`` every group of the message in order (empty: ``unit`` alone).

    A message holds several groups (:data:`shared.control.pipeline.RERANK_UNIT_GROUPS`)
    for the reason a GPU stage's message holds several staged batches: a worker's fixed
    cost per message (the broker, the ledger, reading the groups, writing the scores) is
    small beside scoring them, and pairs of several groups fill the model's batches
    together. A worker takes as many as it scores in its unit seconds and sends the rest
    back (``workers.runtime.pace``); the ledger counts each group.
    """

    group_ids: list[str] = []

    @property
    def units(self) -> list[str]:
        return self.group_ids or [self.unit]

    def of_units(self, units: list[str]) -> RerankGroup:
        return msgspec.structs.replace(
            self, unit=units[0], group_ids=units if len(units) > 1 else []
        )


class PrepareUnit(UnitMessage, kw_only=True):
    """A unit of preparing a collection: a read range (``validate``, ``chunk``; ``unit``
    is ``r00000``) or an id partition (``dedupe``; ``unit`` is ``p0000``)."""


class ExportPart(UnitMessage, kw_only=True):
    """Write one part of the job's chunks from these staged batches (``unit``: the part's
    name, ``part-00000``)."""

    batch_ids: list[str]


class JobStep(Struct):
    """Task message of an aggregator step (``plan_retrieve``, ``plan_fuse``, ...)."""

    job_id: str
    step: str


# --- job spec and ledger records ---------------------------------------------------


class JobSpec(Struct):
    """What the user asked for; stored in the ledger and copied into the manifest."""

    job_id: str
    collection: str
    source: str
    output: str
    created_at: float
    dense_models: list[str]
    chunk_tokens: int
    chunk_overlap: int
    batch_chunks: int
    max_batch_tokens: int | None
    on_bad_record: Literal["fail", "skip"]
    # Run the job even when the source holds no valid document (checked by whoever
    # prepares it: the producer, or the fleet once every range is validated).
    allow_empty: bool = False
    stages: list[Stage] = msgspec.field(default_factory=lambda: ["dense"])
    sparse_models: list[str] = []
    sparse_device: str = "cpu"
    bm25: BM25Params | None = None
    retrieval: RetrievalSpec | None = None
    dtype: str = "auto"
    export: ExportSpec = msgspec.field(default_factory=lambda: ExportSpec())
    # A spec without it is a job from before the fleet prepared collections.
    prepare_on: PrepareOn = "producer"
    # Which columns of a CSV/TSV or Parquet source hold what.
    fields: FieldMap = msgspec.field(default_factory=lambda: FieldMap())
    # Tokens of staged chunks one message of a GPU stage gathers (several staged
    # batches; see shared.control.pipeline.GPU_UNIT_TOKENS); 0: one batch a message. A spec
    # from before units gathered batches decodes as 0, which is how its units were sent.
    unit_tokens: int = 0
    # What one record may hold before it is a bad record (a spec from before the limits
    # decodes with the defaults).
    limits: InputLimits = msgspec.field(default_factory=lambda: InputLimits())
    # How its units take turns with other jobs' on a shared fleet (shared.control.fairness).
    priority: Priority = "normal"
    # The most units of the job that run at once on each stage; 0: no cap
    # (shared.control.quotas).
    max_in_flight: int = 0
    # The earlier job whose vectors this one reuses (``run --reuse``): the folder that
    # holds its manifest.json, local or ``s3://``, as the producer resolved it; "" none.
    reuse: str = ""
    # How many staged batches of chunks are sorted by length together before they are cut
    # (shared.inputs.chunking.like_length_window), so that a unit's model batches pad
    # little; the export puts the chunks back in reading order. A spec from before
    # decodes as 1: batches in reading order.
    sort_window: int = 1


class InputLimits(Struct):
    """How large one record of a collection may be, so that no input exhausts a worker.

    A record over a limit is a bad record like a malformed one: named by file and line,
    the job failed under ``--on-bad-record fail``, counted and listed under ``skip``.

    Attributes:
        max_record_bytes: The most bytes of one record as read (a JSONL line after
            decompression, a CSV/TSV row, a text file, a Parquet row's text and title).
            Readers stop reading a record at this many bytes: an oversized record is
            read past, never held.
        max_document_chunks: The most chunks one document may be cut into; the chunker
            stops cutting a document at one more.
    """

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_document_chunks: int = DEFAULT_MAX_DOCUMENT_CHUNKS


class ExportSpec(Struct):
    """How the chunks are exported.

    Attributes:
        format: Parquet or JSONL parts.
        part_rows: The most chunks a part holds.
        part_bytes: About the most bytes a part holds (estimated from the vectors' sizes
            before writing; a part never splits a staged batch).
        keep_work: Keep ``work/`` (staged batches, shards) after the manifest is written.
    """

    format: ExportFormat = "parquet"
    part_rows: int = 100_000
    part_bytes: int = 256 * 2**20
    keep_work: bool = False


class JobRecord(Struct):
    """The job as the object store keeps it (``work/job.msgpack``), written before the
    first batch is staged: with the staged batches, the shards and the producer's
    report beside it, enough to rebuild the ledger of a job whose Redis lost it."""

    spec: JobSpec
    documents_total: int
    bytes_total: int


QUERIES_PER_RERANK_TASK = 16


class RetrievalSpec(Struct):
    """The query side of a job: retrieve, fuse, rerank, evaluate.

    ``weights`` maps each ranking (``dense`` and every sparse model) to its fusion
    weight; they sum to 1.
    """

    queries_source: str
    queries: int
    query_batches: int
    qrels_source: str | None
    top_k: int = 100
    fusion: Fusion = "convex"
    weights: dict[str, float] = {}
    rrf_k: int = 60
    rerank_model: str | None = None
    rerank_top: int = 50
    batches_per_retrieve_task: int = 128
    queries_per_rerank_task: int = QUERIES_PER_RERANK_TASK
    # Whole rerank groups per fuse unit (the fuse phase's parallelism).
    rerank_groups_per_fuse_task: int = 64


class Qrels(Struct):
    """Relevance judgements, staged for the aggregator: query id -> doc id -> grade."""

    judgements: dict[str, dict[str, int]]


class BM25Params(Struct):
    """BM25 settings (Lucene variant), as ``bm25s`` names them."""

    k1: float = 1.2
    b: float = 0.75
    method: Literal["lucene"] = "lucene"


class BM25Collection(Struct):
    """BM25 statistics of the whole collection, merged from every batch once (by the
    aggregator's plan step) for the retrieve tasks and the export."""

    params: BM25Params
    documents: int
    total_length: int
    doc_freqs: dict[str, int]


class ModelInfo(Struct):
    """What a worker loaded, for audit: enough to reproduce the vectors."""

    name: str
    source: str
    revision: str
    dim: int
    dtype: str
    device: str
    max_seq_length: int
    kind: Literal["dense", "sparse", "rerank"] = "dense"
    dtype_reason: str = ""
    parameters: int = 0
    # Its tokenizer's identity, and the key of the vectors it makes
    # (shared.records.content_keys.model_key; "" where none applies, as for BM25).
    tokenizer: str = ""
    key: str = ""


class BatchReport(Struct):
    """A finished unit of one stage, as a worker recorded it in the ledger: a staged
    batch (``chunks`` counts its chunks, or its queries), a retrieve task or a rerank
    task (``chunks`` counts the queries it served)."""

    batch_id: str
    stage: str
    chunks: int
    tokens: int
    started_at: float
    finished_at: float
    worker: str
    device: str
    batch_sizes: list[int]
    kind: BatchKind = "documents"
    # Telemetry of the unit's model batches (see workers.runtime.measure).
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""  # "gpu" (max_memory_allocated) or "rss" (a CPU's)
    oom_count: int = 0
    # Model name -> padded-token budget the worker had learned when the unit ended.
    budgets: dict[str, int] = {}
    # Items the unit's model could not process (rerank: pairs left unscored).
    items_missed: int = 0
    # Chunks whose vectors an earlier job made (``run --reuse``), not encoded.
    items_reused: int = 0
    # The worker's ModelManager while the unit ran: loads from the cache, moves to the
    # device, and models sent back to the CPU to make room (see workers.inference.model_manager).
    model_loads: int = 0
    hydrations: int = 0
    evictions: int = 0
    # Found done in the object store by a resume (its output was there, the ledger had
    # lost its record): it counts as done, but it has no figures to add.
    recovered: bool = False

    @classmethod
    def recovered_unit(cls, stage: str, unit: str, items: int, kind: BatchKind) -> BatchReport:
        """The record of a unit whose output a resume found in the store."""
        return cls(
            batch_id=unit,
            stage=stage,
            chunks=items,
            tokens=0,
            started_at=0.0,
            finished_at=0.0,
            worker="",
            device="",
            batch_sizes=[],
            kind=kind,
            recovered=True,
        )

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.started_at


class BatchFailure(Struct):
    """A batch that kept failing after its retries."""

    batch_id: str
    stage: str
    reason: str
    chunk_ids: list[str] = []


class ProducerReport(Struct):
    """What the producer read and staged, written when it seals the job."""

    documents: int
    chunks: int
    batches: int
    tokens: int
    empty_documents: list[str]
    skipped_records: list[SkippedRecord]
    skipped_count: int
    started_at: float
    finished_at: float
    latency: LatencySummary
    queries: int = 0
    query_batches: int = 0


class StageProgress(Struct):
    """Progress of an encode stage (``dense``, ``sparse``) or a later phase
    (``retrieve``, ``rerank``, whose units are tasks, not batches)."""

    stage: str
    batches_done: int
    batches_failed: int
    chunks_done: int
    queries_done: int = 0
    total: int | None = None
    # Live figures of the units so far (``progress(detail=True)``; the live view).
    summary: LatencySummary | None = None


class JobProgress(Struct):
    """A snapshot of the ledger, for progress bars and ``status``."""

    job_id: str
    status: JobStatus
    collection: str
    staged_batches: int
    staged_chunks: int
    total_batches: int | None
    documents_total: int
    documents_read: int
    bytes_read: int
    bytes_total: int
    stages: list[StageProgress]
    error: str = ""
    # The job failed on its input (a bad record the fleet found): exit code 2.
    bad_input: bool = False
    # Its part of the units the fleet's workers hold (a follower fills it in; None: the
    # workers hold none, or nobody asked).
    fleet_share: float | None = None


# --- retrieval, fusion, reranking ---------------------------------------------------


class Hits(Struct, array_like=True):
    """One query's ranked list: chunk ids and scores, best first, and the staged batch
    each chunk is in (so a fuse unit reads only the batches its candidates are in)."""

    chunk_ids: list[str]
    scores: list[float]
    batch_ids: list[str] = []


class TopKShard(Struct):
    """A retrieve task's output for the queries of one fuse unit: per ranking, each
    query's top-k within one group of document shards (``hits[name][i]`` belongs to
    ``query_ids[i]``)."""

    job_id: str
    group_id: str
    query_ids: list[str]
    hits: dict[str, list[Hits]]
    fuse_unit: str = ""


class UnitDone(Struct):
    """A unit whose output is several objects has written them all (``outputs``: what
    it wrote, e.g. a retrieve unit's fuse units, a fuse unit's query groups)."""

    outputs: list[str]
    items: int = 0


class Candidate(Struct):
    """A fused candidate of one query, with every score that led to its rank.

    Scores are null where the candidate was not in that retriever's top-k (dense,
    sparse) or was not reranked.
    """

    chunk_id: str
    doc_id: str
    dense_score: float | None
    sparse_score: dict[str, float | None]
    fused_score: float
    rerank_score: float | None = None
    rank: int = 0


class QueryCandidates(Struct):
    """One query and its candidates in fused (later: final) order."""

    query_id: str
    text: str
    candidates: list[Candidate]
    rankings: dict[str, Hits] = {}


class FusedGroup(Struct):
    """The aggregator's fused candidates for one group of queries, with the texts of
    the chunks the rerank task will score and, where they were staged, their token ids
    (``ids``: chunk id -> its ids as :class:`StagedTokens` stores them, made by
    ``tokenizer`` in ``id_dtype``), so the reranker builds its pairs without tokenizing
    the passages again."""

    job_id: str
    group_id: str
    queries: list[QueryCandidates]
    texts: dict[str, str] = {}
    tokenizer: str = ""
    id_dtype: IdDtype = "uint16"
    ids: dict[str, bytes] = {}


class RerankStats(Struct):
    """What the reranking of one query group did; summed over groups into
    ``CrossEncoderRerankRun``. Groups scored together in one message share one call:
    its batches, out-of-memory errors, time limits, fallbacks and peak memory are in the
    first group's statistics only."""

    pairs_asked: int
    pairs_scored: int
    batch_sizes: list[int]
    oom_count: int = 0
    timeout_count: int = 0
    fallbacks: dict[str, int] = {}
    max_batch_tokens: int = 0
    peak_memory_bytes: int = 0
    tokens: int = 0


class RerankShard(Struct):
    """A query group's rerank output: per query of the group, the rerank scores of its first
    ``rerank_top`` candidates (null: not reranked)."""

    job_id: str
    group_id: str
    scores: dict[str, list[float | None]]
    stats: RerankStats


class CrossEncoderRerankRun(Struct):
    """The manifest's ``rerank_run``: what the rerank stage did, for audit.

    ``coverage`` is pairs reranked / pairs asked; ``fallbacks`` counts batches split
    after a time limit (``split``), run on the CPU (``cpu``) and left in fused order
    (``unreranked``).
    """

    model: ModelInfo | None
    device: str
    dtype: str
    queries: int
    pairs_asked: int
    pairs_scored: int
    coverage: float
    batch_sizes: dict[int, int]
    oom_count: int
    timeout_count: int
    fallbacks: dict[str, int]
    max_batch_tokens: int
    latency: LatencySummary


# --- artifacts -------------------------------------------------------------------


class ChunkRecord(Struct):
    """One chunk as a JSONL part (``chunks/part-NNNNN.jsonl``) writes it: one line each.
    A Parquet part holds the same fields as columns (see ``ChunksLayout``)."""

    chunk_id: str
    doc_id: str
    chunk_index: int
    text: str
    span: tuple[int, int]
    metadata: dict[str, Any]
    dense: dict[str, list[float]]
    sparse: dict[str, dict[str, float]] | None = None
    # The chunk's text key (shared.records.content_keys.text_key).
    text_key: str = ""


class Artifact(Struct):
    """A file of the job's output: its key, size, sha256 and records (rows, lines)."""

    key: str
    bytes: int
    sha256: str
    records: int
    content_type: str


class LatencySummary(Struct):
    """Per-stage figures: latency (seconds per unit), throughput, the sizes of its model
    batches, and what the units reported about memory and out-of-memory retries."""

    batches: int
    items: int
    p50_s: float
    p95_s: float
    mean_s: float
    items_per_s: float
    batch_size_min: int = 0
    batch_size_p50: int = 0
    batch_size_max: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    oom_count: int = 0
    # Model -> the smallest budget any worker had learned at its last unit.
    budgets: dict[str, int] = {}
    devices: list[str] = []
    # Share of the items the model processed (1.0 unless a unit reported misses).
    coverage: float = 1.0
    # Items whose vectors an earlier job made (``run --reuse``), not encoded.
    items_reused: int = 0
    # Model manager activity summed over the units (swaps show as evictions).
    model_loads: int = 0
    hydrations: int = 0
    evictions: int = 0

    @classmethod
    def from_samples(
        cls, latencies: list[float], items: int, span_s: float, batch_sizes: list[int] | None = None
    ) -> LatencySummary:
        """Summarise per-batch latencies; throughput is items over the wall-clock span."""
        values = np.array(latencies or [0.0])
        sizes = batch_sizes or [0]
        return cls(
            batches=len(latencies),
            items=items,
            p50_s=round(float(np.percentile(values, 50)), 4),
            p95_s=round(float(np.percentile(values, 95)), 4),
            mean_s=round(float(values.mean()), 4),
            items_per_s=round(items / span_s, 2) if span_s > 0 else 0.0,
            batch_size_min=int(min(sizes)),
            batch_size_p50=int(np.percentile(sizes, 50)),
            batch_size_max=int(max(sizes)),
        )

    @classmethod
    def from_reports(cls, reports: list[BatchReport]) -> LatencySummary:
        """The stage's figures from the units its workers recorded in the ledger (units a
        resume found done in the store have none to add)."""
        reports = [r for r in reports if not r.recovered]
        if not reports:
            return cls.from_samples([], 0, 0.0)
        span = max(r.finished_at for r in reports) - min(r.started_at for r in reports)
        summary = cls.from_samples(
            [r.latency_s for r in reports],
            sum(r.chunks for r in reports),
            span,
            [size for r in reports for size in r.batch_sizes],
        )
        latest: dict[tuple[str, str], tuple[float, int]] = {}
        for r in reports:
            for model, budget in r.budgets.items():
                key = (r.worker, model)
                if key not in latest or latest[key][0] < r.finished_at:
                    latest[key] = (r.finished_at, budget)
        budgets: dict[str, int] = {}
        for (_, model), (_, budget) in latest.items():
            budgets[model] = min(budget, budgets.get(model, budget))
        tokens = sum(r.tokens for r in reports)
        peak = max(reports, key=lambda r: r.peak_memory_bytes)
        missed = sum(r.items_missed for r in reports)
        summary.tokens = tokens
        summary.tokens_per_s = round(tokens / span, 1) if span > 0 else 0.0
        summary.peak_memory_bytes = peak.peak_memory_bytes
        summary.peak_memory_kind = peak.peak_memory_kind
        summary.oom_count = sum(r.oom_count for r in reports)
        summary.budgets = budgets
        summary.devices = sorted({r.device for r in reports if r.device})
        summary.coverage = round(1 - missed / summary.items, 4) if summary.items else 1.0
        summary.items_reused = sum(r.items_reused for r in reports)
        summary.model_loads = sum(r.model_loads for r in reports)
        summary.hydrations = sum(r.hydrations for r in reports)
        summary.evictions = sum(r.evictions for r in reports)
        return summary


class SparseTally(Struct):
    """What one part's sparse vectors were, summed by ``finish`` into ``sparse_run``.

    Attributes:
        chunks: Chunks the part's sparse shards held.
        sources: Model -> where its vectors came from (``live``, ``metadata``,
            ``missing``) -> chunks.
        nnz: Model -> non-zeros of an exported vector -> chunks (a histogram, so that
            the sum of any number of parts stays small).
        errors: What the sparse workers reported, -> batches.
        outside_vocabulary: Model -> weights a Parquet part could not index (a chunk's
            own ``metadata.sparse`` terms the model's vocabulary lacks; the metadata
            column still holds them).
    """

    chunks: int = 0
    sources: dict[str, dict[str, int]] = {}
    nnz: dict[str, dict[int, int]] = {}
    errors: dict[str, int] = {}
    outside_vocabulary: dict[str, int] = {}


class Vocabulary(Struct):
    """A sparse model's terms in index order (a tokenizer's vocabulary; for BM25 the
    collection's terms, sorted): what a Parquet sparse column's ``indices`` point into."""

    model: str
    terms: list[str]


class ExportPlan(Struct):
    """The export phase's parts, as ``plan_export`` cut them (``work/export-plan.msgpack``):
    what a resume checks the parts against."""

    parts: list[ExportPart]


class ExportedPart(Struct):
    """One part as its export task left it (``work/parts/<part>.msgpack``)."""

    part: str
    artifact: Artifact
    batch_ids: list[str]
    sparse: SparseTally | None = None
    # Model -> the part's rows whose vectors were an earlier job's (``--reuse``), and
    # the texts the model ran for them.
    reused: dict[str, int] = {}
    encoded: dict[str, int] = {}


class ChunksLayout(Struct):
    """How the manifest's chunk parts are laid out, so a reader needs nothing else.

    Attributes:
        format: ``parquet`` or ``jsonl``.
        parts: The parts' keys, in order (each is also in ``artifacts``).
        dense_columns: Parquet column -> dense model (``fixed_size_list<float32>[dim]``,
            unit-norm).
        sparse_columns: Parquet column -> sparse model (``struct<indices: list<int32>,
            values: list<float32>>``).
        vocabularies: Sparse model -> the key of its vocabulary (a JSON list of terms:
            a sparse column's ``indices`` point into it).
        model_keys: Model -> the key of its vectors (see
            :mod:`shared.records.content_keys`): with a row's ``text_key``, what a vector
            may be reused by. BM25 has none (its weights are the collection's).
    """

    format: ExportFormat
    parts: list[str]
    dense_columns: dict[str, str] = {}
    sparse_columns: dict[str, str] = {}
    vocabularies: dict[str, str] = {}
    model_keys: dict[str, str] = {}


class Counts(Struct):
    documents: int
    chunks: int
    chunks_exported: int
    batches: int
    empty_documents: int
    skipped_records: int
    failed_batches: int
    # Model -> the chunk texts its workers ran: fewer than the chunks where a unit held
    # a text twice (encoded once) or an earlier job's vector was taken (``--reuse``).
    encoded: dict[str, int] = {}


class Missing(Struct):
    """What a partial job lacks, and why."""

    stage: str
    batch_id: str
    reason: str
    chunk_ids: list[str]


class SparseModelRun(Struct):
    """Per sparse model: where its vectors came from and how dense they are."""

    model: ModelInfo
    live: int
    metadata: int
    missing: int
    nnz_mean: float
    nnz_p95: float


class SparseInferenceRun(Struct):
    """The manifest's ``sparse_run``: what the sparse stage did, for audit.

    ``weight_decimals`` is the rounding of the exported weights; zero weights are
    dropped. BM25 weights are final (idf x saturated tf) with the stated parameters.
    """

    models: list[SparseModelRun]
    chunks: int
    latency: LatencySummary
    errors: dict[str, int]
    weight_decimals: int
    bm25: BM25Params | None = None
    bm25_avg_length: float | None = None
    bm25_documents: int | None = None


class QueryResult(Struct):
    """One line of ``results.jsonl``: a query and its candidates in final order."""

    query_id: str
    text: str
    candidates: list[Candidate]


class RankingMetrics(Struct):
    """Retrieval quality of one ranking, over the judged queries (documents scored by
    their best chunk)."""

    ndcg_at_10: float
    recall_at_100: float
    mrr_at_10: float
    queries: int


class Metrics(Struct):
    """``metrics.json``: every stage's figures (latency, throughput, batch sizes, peak
    memory, out-of-memory retries, learned batch budgets) and, when judgements were
    given, retrieval quality per ranking."""

    job_id: str
    collection: str
    stages: dict[str, LatencySummary] = {}
    qrels: str = ""
    queries_judged: int = 0
    rankings: dict[str, RankingMetrics] = {}
    fusion: Fusion | None = None
    weights: dict[str, float] = {}
    document_score: str = "max over the document's chunks"
    evaluator: str = ""


class DocumentChanges(Struct):
    """A job's documents against an earlier job's: ``added`` (this job's only),
    ``changed`` (both, other chunks now), ``unchanged`` (both, chunk for chunk the same)
    and ``removed`` (the earlier job's only)."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0


class Changes(Struct):
    """The manifest's ``changes``: this job against the earlier job it reused
    (``run --reuse``), for updating a vector store (``export --to delta``).

    Attributes:
        against: The earlier job's folder (what ``--reuse`` named, resolved).
        against_job: The earlier job's id.
        refused: Why nothing was reused ("" when reuse went on).
        documents: Added, changed, unchanged and removed.
        chunks: This job's document chunks.
        chunks_found: Chunks the earlier job had a vector for (same document, same text).
        reused: Model -> chunks whose vectors were copied from the earlier job.
        encoded: Model -> chunk texts this job encoded.
        repeats: Model -> chunks given the vector of the same text elsewhere in their
            unit (encoded once, served again).
        lost: Why some chunks found there were encoded after all: the earlier job's
            output went or changed while this job ran (its parts are checked against
            its manifest as they are read, so nothing else is ever copied).
        chunks_lost: How many.
    """

    against: str
    against_job: str
    refused: str = ""
    documents: DocumentChanges = msgspec.field(default_factory=lambda: DocumentChanges())
    chunks: int = 0
    chunks_found: int = 0
    reused: dict[str, int] = {}
    encoded: dict[str, int] = {}
    repeats: dict[str, int] = {}
    lost: str = ""
    chunks_lost: int = 0


class Manifest(Struct):
    """``manifest.json``: written last; its presence means the artifacts are complete."""

    format_version: int
    job_id: str
    collection: str
    status: Literal["complete", "partial"]
    spec: JobSpec
    models: list[ModelInfo]
    counts: Counts
    stages: dict[str, LatencySummary]
    artifacts: list[Artifact]
    missing: list[Missing]
    empty_documents: list[str]
    skipped_records: list[SkippedRecord]
    created_at: float
    finished_at: float
    sparse_run: SparseInferenceRun | None = None
    rerank_run: CrossEncoderRerankRun | None = None
    metrics: dict[str, RankingMetrics] | None = None
    chunks: ChunksLayout | None = None
    changes: Changes | None = None
