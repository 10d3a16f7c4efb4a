"""One job's objects: where each lives (:class:`JobLayout`) and typed access to it
(:class:`JobStore`).

Every object a job has, from the staged batches to the manifest, is read and written
here and nowhere else, as the msgspec Struct it is: the producer stages batches and
queries through it, workers read their inputs and write their outputs through it, and
the export reads everything back through it. Keys are deterministic (a redelivered task
writes the same object again, not a second one), and messages carry ids, never keys:
the layout turns ids into keys.

The store is also the job's durable record: with ``job.msgpack``, ``producer.msgpack``
and the models beside the staged batches and the shards, a job whose ledger Redis lost
can be rebuilt and resumed (``producer.recovery``).

::

    <collection>/<job_id>/
        chunks/part-00000.parquet ...         the chunks, in parts (or .jsonl)
        vocab/<sparse model>.json             a sparse model's terms (Parquet parts)
        results.jsonl  metrics.json  report.html  manifest.json (last)
        work/job.msgpack                      JobRecord (written first)
        work/producer.msgpack                 ProducerReport (every batch staged)
        work/read-plan.msgpack                ReadPlan (the ranges the fleet reads)
        work/validated/<range>.msgpack        RangeValidated (a range is validated)
        work/ids/<partition>/<range>.msgpack  IdPartition (a range's ids of a partition)
        work/validation.msgpack               Validation (every range validated)
        work/duplicates/<partition>.msgpack   Duplicates (a partition is checked)
        work/exclusions/<range>.msgpack       RangeExclusions (duplicates a range leaves out)
        work/chunked/<range>.msgpack          RangeChunked (a range is chunked and staged)
        work/reuse/index/<partition>/<part>.msgpack  EarlierIndex (an earlier part's chunks)
        work/reuse/found/<range>/<partition>.msgpack EarlierDocuments (what a range had)
        work/reuse/match/<partition>.msgpack  ReuseMatch (a partition is matched)
        work/reuse/vectors/<batch>.msgpack    EarlierVectors (a batch's earlier vectors)
        work/models/<kind>-<model>.msgpack    ModelInfo (what the workers loaded)
        work/batches/<batch>.msgpack          ChunkBatch (documents and queries)
        work/dense/<batch>.msgpack            DenseShard
        work/sparse/<batch>.msgpack           SparseShard
        work/qrels.msgpack                    Qrels
        work/bm25-statistics.msgpack          BM25Collection
        work/retrieve/<group>/<fuse unit>.msgpack  TopKShard (a fuse unit's queries)
        work/retrieved/<group>.msgpack        UnitDone (every TopKShard of it written)
        work/fused/<group>.msgpack            FusedGroup (one group of queries)
        work/fuse/<fuse unit>.msgpack         UnitDone (its groups fused)
        work/rerank/<group>.msgpack           RerankShard
        work/vocab/<sparse model>.msgpack     Vocabulary (what a sparse worker used)
        work/export-plan.msgpack              ExportPlan (the parts and their batches)
        work/parts/<part>.msgpack             ExportedPart (a part is written)

``work/`` goes once the manifest is written, unless the job keeps it (``--keep-work``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec

from shared.records.schemas import (
    BM25Collection,
    ChunkBatch,
    DenseShard,
    Duplicates,
    EarlierDocuments,
    EarlierIndex,
    EarlierVectors,
    ExportedPart,
    ExportPlan,
    FusedGroup,
    IdPartition,
    JobRecord,
    JobSpec,
    Manifest,
    ModelInfo,
    ProducerReport,
    Qrels,
    RangeChunked,
    RangeExclusions,
    RangeValidated,
    ReadPlan,
    RerankShard,
    ReuseMatch,
    SparseShard,
    Struct,
    TopKShard,
    UnitDone,
    Validation,
    Vocabulary,
)
from shared.records.storage import ObjectStore, join_key, open_store, safe_name

T = TypeVar("T")


class JobLayout:
    """Where one job's objects live: ``<collection>/<job_id>/...`` (see module doc).

    Artifacts sit at the top of the job folder; intermediate objects under ``work/``.
    """

    def __init__(self, collection: str, job_id: str) -> None:
        self.root = join_key(safe_name(collection), safe_name(job_id))

    def batch(self, batch_id: str) -> str:
        return self.work("batches", f"{batch_id}.msgpack")

    @property
    def batches(self) -> str:
        return self.work("batches")

    @property
    def job_record(self) -> str:
        return self.work("job.msgpack")

    @property
    def producer_report(self) -> str:
        return self.work("producer.msgpack")

    def model(self, info: ModelInfo) -> str:
        return self.work("models", f"{info.kind}-{safe_name(info.name)}.msgpack")

    @property
    def models(self) -> str:
        return self.work("models")

    def shard(self, stage: str, batch_id: str) -> str:
        return self.work(stage, f"{batch_id}.msgpack")

    def work(self, *parts: str) -> str:
        return join_key(self.root, "work", *parts)

    @property
    def read_plan(self) -> str:
        return self.work("read-plan.msgpack")

    def validated(self, range_id: str) -> str:
        return self.work("validated", f"{range_id}.msgpack")

    def id_partition(self, partition_id: str, range_id: str) -> str:
        return self.work("ids", partition_id, f"{range_id}.msgpack")

    @property
    def validation(self) -> str:
        return self.work("validation.msgpack")

    def duplicates(self, partition_id: str) -> str:
        return self.work("duplicates", f"{partition_id}.msgpack")

    def earlier_index(self, partition_id: str, part: int) -> str:
        return self.work("reuse", "index", partition_id, f"e{part:05d}.msgpack")

    def earlier_documents(self, range_id: str, partition_id: str) -> str:
        return self.work("reuse", "found", range_id, f"{partition_id}.msgpack")

    def reuse_match(self, partition_id: str) -> str:
        return self.work("reuse", "match", f"{partition_id}.msgpack")

    def earlier_vectors(self, batch_id: str) -> str:
        return self.work("reuse", "vectors", f"{batch_id}.msgpack")

    def exclusions(self, range_id: str) -> str:
        return self.work("exclusions", f"{range_id}.msgpack")

    def chunked(self, range_id: str) -> str:
        return self.work("chunked", f"{range_id}.msgpack")

    @property
    def qrels(self) -> str:
        return self.work("qrels.msgpack")

    @property
    def bm25_statistics(self) -> str:
        return self.work("bm25-statistics.msgpack")

    def top_k(self, group_id: str, fuse_unit: str) -> str:
        return self.work("retrieve", group_id, f"{fuse_unit}.msgpack")

    def retrieved(self, group_id: str) -> str:
        return self.work("retrieved", f"{group_id}.msgpack")

    def fuse_done(self, fuse_unit: str) -> str:
        return self.work("fuse", f"{fuse_unit}.msgpack")

    def fused(self, group_id: str) -> str:
        return self.work("fused", f"{group_id}.msgpack")

    def reranked(self, group_id: str) -> str:
        return self.work("rerank", f"{group_id}.msgpack")

    def vocabulary(self, model: str) -> str:
        return self.work("vocab", f"{safe_name(model)}.msgpack")

    def exported_part(self, part: str) -> str:
        return self.work("parts", f"{part}.msgpack")

    @property
    def export_plan(self) -> str:
        return self.work("export-plan.msgpack")

    def artifact(self, name: str) -> str:
        return join_key(self.root, name)

    @staticmethod
    def part_name(part: str, format: str) -> str:
        """A chunk part's artifact name: ``chunks/part-00000.parquet``."""
        return f"chunks/{part}.{format}"

    @staticmethod
    def vocabulary_name(model: str) -> str:
        """A sparse model's vocabulary artifact name: ``vocab/<model>.json``."""
        return f"vocab/{safe_name(model)}.json"

    @property
    def manifest(self) -> str:
        return self.artifact("manifest.json")


@dataclass(frozen=True)
class QueryText:
    """A query as the aggregator needs it: its id and text."""

    id: str
    text: str


class JobStore:
    """Typed reads and writes of one job's objects.

    Args:
        store: The job's object store (its ``output``).
        collection: The collection's name (the first segment of every key).
        job_id: The job.
    """

    def __init__(self, store: ObjectStore, collection: str, job_id: str) -> None:
        self.store = store
        self.layout = JobLayout(collection, job_id)

    @classmethod
    def of(cls, spec: JobSpec, store: ObjectStore | None = None) -> JobStore:
        """The store of a job, opening its output URL unless ``store`` is given."""
        return cls(store or open_store(spec.output), spec.collection, spec.job_id)

    def _put(self, key: str, value: Struct) -> None:
        self.store.put_bytes(key, msgspec.msgpack.encode(value))

    def _get(self, key: str, kind: type[T]) -> T:
        return msgspec.msgpack.decode(self.store.get_bytes(key), type=kind)

    def _get_if_there(self, key: str, kind: type[T]) -> T | None:
        return self._get(key, kind) if self.store.exists(key) else None

    # --- the job's record ------------------------------------------------------------

    def put_job_record(self, record: JobRecord) -> None:
        self._put(self.layout.job_record, record)

    def job_record(self) -> JobRecord | None:
        return self._get_if_there(self.layout.job_record, JobRecord)

    def put_producer_report(self, report: ProducerReport) -> None:
        """Written once every batch is staged: the store's mark of a submitted job."""
        self._put(self.layout.producer_report, report)

    def producer_report(self) -> ProducerReport | None:
        return self._get_if_there(self.layout.producer_report, ProducerReport)

    def put_model(self, info: ModelInfo) -> None:
        self._put(self.layout.model(info), info)

    def models(self) -> list[ModelInfo]:
        return [self._get(key, ModelInfo) for key in self.store.list(self.layout.models)]

    def staged_batch_ids(self) -> list[str]:
        """The ids of every staged batch (documents and queries) the store holds."""
        suffix = ".msgpack"
        return sorted(
            key.rsplit("/", 1)[-1].removesuffix(suffix)
            for key in self.store.list(self.layout.batches)
            if key.endswith(suffix)
        )

    # --- staged by the producer ------------------------------------------------------

    def put_batch(self, batch: ChunkBatch) -> None:
        self._put(self.layout.batch(batch.batch_id), batch)

    def batch(self, batch_id: str) -> ChunkBatch:
        return self._get(self.layout.batch(batch_id), ChunkBatch)

    def queries(self, batch_ids: list[str]) -> list[QueryText]:
        """The queries of these staged query batches, in order."""
        return [
            QueryText(chunk.chunk_id, chunk.text)
            for batch_id in batch_ids
            for chunk in self.batch(batch_id).chunks
        ]

    def put_qrels(self, qrels: Qrels) -> None:
        self._put(self.layout.qrels, qrels)

    def qrels(self) -> Qrels | None:
        """The judgements, if the job was given any."""
        return self._get_if_there(self.layout.qrels, Qrels)

    # --- encode stages -----------------------------------------------------------------

    def put_shard(self, stage: str, batch_id: str, shard: Struct) -> None:
        """An encode stage's output for one batch (a DenseShard, a SparseShard)."""
        self._put(self.layout.shard(stage, batch_id), shard)

    def dense(self, batch_id: str) -> DenseShard:
        return self._get(self.layout.shard("dense", batch_id), DenseShard)

    def sparse(self, batch_id: str) -> SparseShard:
        return self._get(self.layout.shard("sparse", batch_id), SparseShard)

    # --- retrieve ------------------------------------------------------------------------

    def put_bm25(self, statistics: BM25Collection) -> None:
        self._put(self.layout.bm25_statistics, statistics)

    def bm25(self) -> BM25Collection | None:
        """The collection's merged BM25 statistics, once the plan step wrote them."""
        return self._get_if_there(self.layout.bm25_statistics, BM25Collection)

    def put_top_k(self, shard: TopKShard) -> None:
        self._put(self.layout.top_k(shard.group_id, shard.fuse_unit), shard)

    def top_k(self, group_id: str, fuse_unit: str) -> TopKShard:
        return self._get(self.layout.top_k(group_id, fuse_unit), TopKShard)

    def put_retrieved(self, group_id: str, done: UnitDone) -> None:
        self._put(self.layout.retrieved(group_id), done)

    def put_fuse_done(self, fuse_unit: str, done: UnitDone) -> None:
        self._put(self.layout.fuse_done(fuse_unit), done)

    # --- fuse and rerank -----------------------------------------------------------------

    def put_fused(self, group: FusedGroup) -> None:
        self._put(self.layout.fused(group.group_id), group)

    def fused(self, group_id: str) -> FusedGroup:
        return self._get(self.layout.fused(group_id), FusedGroup)

    def put_reranked(self, shard: RerankShard) -> None:
        self._put(self.layout.reranked(shard.group_id), shard)

    def reranked(self, group_id: str) -> RerankShard:
        return self._get(self.layout.reranked(group_id), RerankShard)

    # --- preparing on the fleet -------------------------------------------------------

    def put_read_plan(self, plan: ReadPlan) -> None:
        self._put(self.layout.read_plan, plan)

    def read_plan(self) -> ReadPlan:
        return self._get(self.layout.read_plan, ReadPlan)

    def put_validated(self, range_id: str, validated: RangeValidated) -> None:
        self._put(self.layout.validated(range_id), validated)

    def validated(self, range_id: str) -> RangeValidated:
        return self._get(self.layout.validated(range_id), RangeValidated)

    def put_id_partition(self, partition_id: str, range_id: str, ids: IdPartition) -> None:
        self._put(self.layout.id_partition(partition_id, range_id), ids)

    def id_partition(self, partition_id: str, range_id: str) -> IdPartition:
        return self._get(self.layout.id_partition(partition_id, range_id), IdPartition)

    def put_validation(self, validation: Validation) -> None:
        self._put(self.layout.validation, validation)

    def validation(self) -> Validation:
        return self._get(self.layout.validation, Validation)

    def put_duplicates(self, partition_id: str, duplicates: Duplicates) -> None:
        self._put(self.layout.duplicates(partition_id), duplicates)

    def duplicates(self, partition_id: str) -> Duplicates:
        return self._get(self.layout.duplicates(partition_id), Duplicates)

    def put_earlier_index(self, partition_id: str, part: int, index: EarlierIndex) -> None:
        self._put(self.layout.earlier_index(partition_id, part), index)

    def earlier_index(self, partition_id: str, part: int) -> EarlierIndex | None:
        return self._get_if_there(self.layout.earlier_index(partition_id, part), EarlierIndex)

    def put_earlier_documents(
        self, range_id: str, partition_id: str, found: EarlierDocuments
    ) -> None:
        self._put(self.layout.earlier_documents(range_id, partition_id), found)

    def earlier_documents(self, range_id: str, partition_id: str) -> EarlierDocuments:
        return self._get(self.layout.earlier_documents(range_id, partition_id), EarlierDocuments)

    def put_reuse_match(self, partition_id: str, match: ReuseMatch) -> None:
        self._put(self.layout.reuse_match(partition_id), match)

    def reuse_match(self, partition_id: str) -> ReuseMatch | None:
        return self._get_if_there(self.layout.reuse_match(partition_id), ReuseMatch)

    def put_earlier_vectors(self, batch_id: str, vectors: EarlierVectors) -> None:
        self._put(self.layout.earlier_vectors(batch_id), vectors)

    def earlier_vectors(self, batch_id: str) -> EarlierVectors:
        return self._get(self.layout.earlier_vectors(batch_id), EarlierVectors)

    def put_exclusions(self, range_id: str, exclusions: RangeExclusions) -> None:
        self._put(self.layout.exclusions(range_id), exclusions)

    def exclusions(self, range_id: str) -> RangeExclusions:
        """The ids a range leaves out (none if no exclusions were written for it)."""
        found = self._get_if_there(self.layout.exclusions(range_id), RangeExclusions)
        return found or RangeExclusions(doc_ids=[])

    def put_chunked(self, range_id: str, chunked: RangeChunked) -> None:
        self._put(self.layout.chunked(range_id), chunked)

    def chunked(self, range_id: str) -> RangeChunked | None:
        return self._get_if_there(self.layout.chunked(range_id), RangeChunked)

    # --- export ------------------------------------------------------------------------

    def put_vocabulary(self, vocabulary: Vocabulary) -> None:
        self._put(self.layout.vocabulary(vocabulary.model), vocabulary)

    def vocabulary(self, model: str) -> Vocabulary | None:
        """A sparse model's vocabulary, as its workers recorded it (if any ran)."""
        return self._get_if_there(self.layout.vocabulary(model), Vocabulary)

    def put_export_plan(self, plan: ExportPlan) -> None:
        self._put(self.layout.export_plan, plan)

    def export_plan(self) -> ExportPlan:
        return self._get(self.layout.export_plan, ExportPlan)

    def put_exported_part(self, part: ExportedPart) -> None:
        self._put(self.layout.exported_part(part.part), part)

    def exported_part(self, part: str) -> ExportedPart:
        return self._get(self.layout.exported_part(part), ExportedPart)

    def delete_work(self) -> int:
        """Delete ``work/`` (everything but the artifacts); returns the objects deleted."""
        return self.store.delete_folder(self.layout.work())

    # --- artifacts -----------------------------------------------------------------------

    def put_artifact(self, name: str, data: bytes) -> str:
        """Write a small artifact in one piece; returns its key."""
        key = self.layout.artifact(name)
        self.store.put_bytes(key, data)
        return key

    def upload_artifact(self, name: str, path: Path) -> str:
        """Upload a large artifact from a local file (multipart on S3); returns its key."""
        key = self.layout.artifact(name)
        self.store.put_file(key, path)
        return key

    def put_manifest(self, manifest: Manifest) -> None:
        """The job's last write: readers take the manifest's presence as "complete"."""
        body = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
        self.store.put_bytes(self.layout.manifest, body)

    def delete_manifest(self) -> None:
        """A resumed job's old manifest goes first: it no longer says what is there."""
        self.store.delete(self.layout.manifest)

    def manifest(self) -> Manifest:
        return msgspec.json.decode(self.store.get_bytes(self.layout.manifest), type=Manifest)

    def locate(self, key: str | None = None) -> str:
        """Where a key (default: the job's folder) is, for people to read."""
        return self.store.locate(key or self.layout.root)
