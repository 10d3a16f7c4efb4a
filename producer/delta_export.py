"""A delta between two finished jobs of one corpus: the rows a vector store must upsert and
the chunk ids it must delete to go from the old job's chunks to the new job's.

A corpus that changed a little is re-embedded as a whole new job, while the user's vector
store already holds the old one: reloading it costs as much as the corpus (hours at 100M
chunks), applying the delta costs what changed. ``DIR`` gets:

- ``upserts/part-NNNNN.parquet``: every row of the new job whose chunk id the old job
  lacks (added) or whose row differs from the old job's in any column (changed; vectors
  bit for bit), in the new job's order and with its parts' schema (the same columns,
  Arrow types and schema metadata), so a store merges them as they are. At least one
  file, empty when nothing is to upsert, so that a glob over the folder always reads.
- ``deletes.parquet``: one column, ``chunk_id``: the old job's chunks the new job lacks.
- ``delta.json``: :class:`DeltaReport`: both jobs, the counts, each file's bytes and
  sha256. Written last: a folder without it holds no whole delta.

``--drop-columns`` leaves vector columns out of the comparison and the upserts, for a
store that does not keep them: above all BM25's, whose weights are the collection's
(its statistics change with any document), so every row would be an upsert.

No step holds every chunk id of a job, whatever its size. Each job's parts are read one
at a time, and each row becomes ``(chunk_id, part, row, digest)``, the digest a sha256
over the row's values (:func:`row_digests`), spilled to one of N bucket files by a stable
hash of its chunk id (:func:`shared.records.ids.id_partition`). The two jobs' buckets are
then joined one pair at a time (Arrow's hash join): a join writes its deletes and marks
the new rows to upsert in a bitmap (a bit per new row: 12.5 MB at 100M chunks). Last, the
new job's parts are read once more, one at a time, and their marked rows written. Memory:
about one part, one bucket and the bitmap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from producer.search_exports import finished_manifest
from shared.records.errors import EmbedFleetError
from shared.records.ids import id_partition
from shared.records.job_store import JobStore
from shared.records.schemas import Manifest

if TYPE_CHECKING:
    import pyarrow as pa

# Rows of the larger job per bucket: a bucket pair is what one join holds (~50 bytes a
# row and side, plus the join's tables).
ROWS_PER_BUCKET = 1_000_000
# Every bucket file of a job is open while its parts are spilled: stay far below the
# usual limit of 1024 open files (past 512M chunks, buckets grow instead).
MAX_BUCKETS = 512
# Bytes of a row's sha256 kept: a digest is only ever compared with the one row of the
# other job that has the same chunk id.
DIGEST_BYTES = 16


class DeltaFile(msgspec.Struct):
    """One file the delta wrote."""

    path: str
    rows: int
    bytes: int
    sha256: str


class DeltaCounts(msgspec.Struct):
    """What the delta found: ``upserts == added + changed`` and
    ``new_rows == added + changed + unchanged``, ``old_rows == deletes + changed +
    unchanged``."""

    old_rows: int
    new_rows: int
    upserts: int
    added: int
    changed: int
    deletes: int
    unchanged: int


class DeltaReport(msgspec.Struct):
    """``delta.json``: the two jobs (their ids and the folders they were read from), the
    counts, the files, and the vector columns left out (``--drop-columns``)."""

    job_id: str
    job: str
    old_job_id: str
    old_job: str
    counts: DeltaCounts
    files: list[DeltaFile]
    dropped: list[str] = []


def old_job_reference(manifest: Manifest, against: str | None) -> str:
    """What names the old job: ``--against``, else the job the new one reused vectors
    from (``spec.reuse``), since that is the job its user's store holds."""
    if against:
        return against
    if manifest.spec.reuse:
        return manifest.spec.reuse
    raise EmbedFleetError(
        f"job {manifest.job_id} reused no earlier job, so there is no old job to compare it with",
        "Pass --against OLD_JOB: the old job's id under the same --output, or the folder "
        "that holds its manifest.json",
    )


def export_delta(
    new: JobStore, old: JobStore, out_dir: Path, drop: Sequence[str] = ()
) -> DeltaReport:
    """Write the delta from ``old``'s chunks to ``new``'s into ``out_dir`` (see the
    module doc), without the vector columns in ``drop``.

    Raises:
        EmbedFleetError: a job that is not Parquet, a partial new job, parts of other
            columns, a sparse vocabulary that differs, a chunk id twice in a job, a
            column to drop that is not a vector column, or an ``out_dir`` that already
            holds upserts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    new_manifest, old_manifest = finished_manifest(new), finished_manifest(old)
    dropped = tuple(dict.fromkeys(drop))
    check_droppable(new_manifest, dropped)
    check_comparable(new_manifest, new, old_manifest, old, dropped)
    upserts_dir = out_dir / "upserts"
    if upserts_dir.is_dir() and any(upserts_dir.iterdir()):
        raise EmbedFleetError(
            f"{upserts_dir} already holds files",
            "Export the delta to a new folder (or empty that one): a stale part there "
            "would be applied with the new ones",
        )
    upserts_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "delta.json").unlink(missing_ok=True)  # an earlier delta's, now stale
    buckets = bucket_count(new_manifest, old_manifest)
    with tempfile.TemporaryDirectory(prefix=".delta-spill-", dir=out_dir) as temp:
        old_side = spill(old, old_manifest, Path(temp) / "old", buckets, None, dropped)
        new_side = spill(new, new_manifest, Path(temp) / "new", buckets, old_side, dropped)
        marks = RowMarks(new_side.part_rows)
        deletes_path = out_dir / "deletes.parquet"
        deletes_schema = pa.schema([_spill_schema().field("chunk_id")])
        with pq.ParquetWriter(deletes_path, deletes_schema, compression="zstd") as deletes:
            tally = join_buckets(old_side, new_side, marks, deletes)
    upserts = UpsertFiles(upserts_dir, new_side.schema, max(new_side.part_rows))
    files = write_upserts(new, new_manifest, marks, upserts, dropped)
    files.append(described(deletes_path, tally.deletes))
    report = DeltaReport(
        job_id=new_manifest.job_id,
        job=new.store.locate(new.layout.root),
        old_job_id=old_manifest.job_id,
        old_job=old.store.locate(old.layout.root),
        counts=DeltaCounts(
            old_rows=old_side.rows,
            new_rows=new_side.rows,
            upserts=tally.added + tally.changed,
            added=tally.added,
            changed=tally.changed,
            deletes=tally.deletes,
            unchanged=tally.unchanged,
        ),
        files=files,
        dropped=list(dropped),
    )
    (out_dir / "delta.json").write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    return report


def check_droppable(manifest: Manifest, drop: Sequence[str]) -> None:
    """Only vector columns of the job may be left out (the rest is what a row is)."""
    assert manifest.chunks is not None
    vectors = [*manifest.chunks.dense_columns, *manifest.chunks.sparse_columns]
    unknown = [column for column in drop if column not in vectors]
    if unknown:
        raise EmbedFleetError(
            f"--drop-columns {','.join(unknown)}: job {manifest.job_id} has no such vector "
            f"column (its vector columns: {', '.join(vectors) or 'none'})",
            "Name vector columns of the job's parts (dense_*, sparse_*)",
        )


def check_comparable(
    new_manifest: Manifest,
    new: JobStore,
    old_manifest: Manifest,
    old: JobStore,
    drop: Sequence[str] = (),
) -> None:
    """Refuse what a delta could not make right: JSONL parts (no schema to keep), a
    partial new job (its missing chunks would read as deletes), and a sparse column
    whose vocabulary differs (the same indices would mean other terms)."""
    for manifest in (new_manifest, old_manifest):
        assert manifest.chunks is not None
        if manifest.chunks.format != "parquet":
            raise EmbedFleetError(
                f"job {manifest.job_id} wrote its chunks as {manifest.chunks.format}, "
                "and a delta is made of Parquet parts",
                "Compare two jobs run with --format parquet (the default)",
            )
    if new_manifest.status != "complete":
        raise EmbedFleetError(
            f"job {new_manifest.job_id} is {new_manifest.status}: the chunks it misses "
            "would read as deletes",
            f"Resume it first (embed-collections resume {new_manifest.job_id})",
        )
    new_layout, old_layout = new_manifest.chunks, old_manifest.chunks
    assert new_layout is not None and old_layout is not None
    for column, model in new_layout.sparse_columns.items():
        old_model = old_layout.sparse_columns.get(column)
        if old_model is None or column in drop:
            continue  # left out, or the parts' schemas differ: spill() says so
        new_vocabulary = new.store.get_bytes(new_layout.vocabularies[model])
        old_vocabulary = old.store.get_bytes(old_layout.vocabularies[old_model])
        if hashlib.sha256(new_vocabulary).digest() != hashlib.sha256(old_vocabulary).digest():
            raise EmbedFleetError(
                f"column {column} of jobs {old_manifest.job_id} and {new_manifest.job_id} "
                "indexes two different vocabularies (vocab/*.json differ), so the same "
                "index means another term",
                f"Leave the column out (--drop-columns {column}): BM25's vocabulary and "
                "weights are the collection's own and change with any document, so a "
                "store keeps BM25 whole or computes its own; or export the new job whole",
            )


def bucket_count(*manifests: Manifest) -> int:
    """Buckets enough for :data:`ROWS_PER_BUCKET` rows of the larger job in each."""
    rows = max(m.counts.chunks_exported for m in manifests)
    return max(1, min(MAX_BUCKETS, math.ceil(rows / ROWS_PER_BUCKET)))


def read_part(job: JobStore, key: str, drop: Sequence[str] = ()) -> pa.Table:
    """One Parquet part, read through the job's store (a folder or S3), without the
    columns in ``drop``."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(job.store.get_bytes(key)))
    return table.drop_columns([c for c in drop if c in table.column_names])


@dataclass
class Spilled:
    """A job's rows as bucket files of ``(chunk_id, part, row, digest)``."""

    job_id: str
    schema: Any  # pa.Schema of the job's parts
    files: list[Path]
    part_rows: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.part_rows)


def _spill_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("part", pa.int32(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("digest", pa.binary(DIGEST_BYTES), nullable=False),
        ]
    )


def _columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def spill(
    job: JobStore,
    manifest: Manifest,
    folder: Path,
    buckets: int,
    other: Spilled | None,
    drop: Sequence[str] = (),
) -> Spilled:
    """Read every part of ``job`` once and spill its rows' ids and digests to
    ``buckets`` files in ``folder``; every part must have the first part's columns (and,
    given ``other``, the other job's), checked as each part is read."""
    import pyarrow as pa

    assert manifest.chunks is not None
    folder.mkdir(parents=True)
    spilled = Spilled(
        manifest.job_id,
        None if other is None else other.schema,
        [folder / f"bucket-{b:05d}.arrow" for b in range(buckets)],
    )
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(pa.ipc.new_stream(path, _spill_schema())) for path in spilled.files
        ]
        for number, key in enumerate(manifest.chunks.parts):
            table = read_part(job, key, drop)
            if spilled.schema is None:
                spilled.schema = table.schema
            elif _columns(table.schema) != _columns(spilled.schema):
                raise _schema_error(manifest.job_id, key, table.schema, spilled.schema, other)
            spilled.part_rows.append(table.num_rows)
            for bucket, batch in bucketed(table, number, buckets):
                writers[bucket].write_batch(batch)
    return spilled


def _schema_error(
    job_id: str, key: str, schema: pa.Schema, expected: pa.Schema, other: Spilled | None
) -> EmbedFleetError:
    ours, theirs = _columns(schema), _columns(expected)
    only = ", ".join(f"{n} {t}" for n, t in ours if (n, t) not in theirs) or "none"
    missing = ", ".join(f"{n} {t}" for n, t in theirs if (n, t) not in ours) or "none"
    against = f"job {other.job_id}'s parts" if other else "its first part"
    return EmbedFleetError(
        f"{key} of job {job_id} has other columns than {against} (its own: {only}; "
        f"lacking: {missing})",
        "Compare two jobs run with the same models and dtype of vectors: a delta only "
        "replaces rows of the same shape",
    )


def bucketed(table: pa.Table, part: int, buckets: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """A part's ``(chunk_id, part, row, digest)`` rows, bucket by bucket."""
    import pyarrow as pa

    ids = table.column("chunk_id").combine_chunks()
    of_bucket = np.fromiter(
        (id_partition(chunk_id, buckets) for chunk_id in ids.to_pylist()),
        dtype=np.int64,
        count=len(ids),
    )
    rows = np.arange(table.num_rows, dtype=np.int32)
    digests = pa.array(row_digests(table), pa.binary(DIGEST_BYTES))
    order = np.argsort(of_bucket, kind="stable")
    bounds = np.searchsorted(of_bucket[order], np.arange(buckets + 1))
    for bucket in range(buckets):
        picked = order[bounds[bucket] : bounds[bucket + 1]]
        if len(picked):
            yield (
                bucket,
                pa.record_batch(
                    [
                        ids.take(picked),
                        pa.array(np.full(len(picked), part, dtype=np.int32)),
                        pa.array(rows[picked]),
                        digests.take(picked),
                    ],
                    schema=_spill_schema(),
                ),
            )


def row_digests(table: pa.Table) -> list[bytes]:
    """Per row, a sha256 over its values in column order, serialized so that two rows
    share it only if every value is the same (:func:`cells`)."""
    columns = [cells(column.combine_chunks()) for column in table.columns]
    return [
        hashlib.sha256(b"".join(row)).digest()[:DIGEST_BYTES] for row in zip(*columns, strict=True)
    ]


def _fixed_width(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def cells(array: pa.Array) -> list[bytes]:
    """Each row's value of one column as bytes: ``0`` for a null, else ``1`` and the
    value. Numbers are their raw bytes (floats bit for bit, so ``-0.0`` and NaN
    payloads count); a list, fixed-size or not, of numbers is its length and its
    elements' bytes; a struct is its fields' cells in order; anything else (strings) is
    msgpack, which is self-delimiting. The choice follows the type alone, so equal
    values give equal bytes in any part of either job."""
    import pyarrow as pa

    kind = array.type
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    if _fixed_width(kind):
        width = kind.bit_width // 8
        raw = array.fill_null(0).to_numpy(zero_copy_only=False).tobytes()
        bodies = [raw[i * width : (i + 1) * width] for i in range(len(array))]
    elif (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) and _fixed_width(
        kind.value_type
    ):
        bodies = _list_bodies(array)
    elif pa.types.is_struct(kind):
        fields = [cells(child) for child in array.flatten()]
        bodies = [b"".join(row) for row in zip(*fields, strict=True)] or [b""] * len(array)
    else:
        encode = msgspec.msgpack.Encoder().encode
        bodies = [encode(value) for value in array.to_pylist()]
    return [b"\x01" + body if ok else b"\x00" for ok, body in zip(valid, bodies, strict=True)]


def _list_bodies(array: pa.Array) -> list[bytes]:
    """Lists of numbers: the count and the raw bytes of the elements; a list with a
    null element (never in the fleet's parts) is msgpack instead, marked apart."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        values = array.values.slice(array.offset * size, len(array) * size)
        offsets = np.arange(len(array) + 1, dtype=np.int64) * size
    else:
        values = array.values
        offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    width = values.type.bit_width // 8
    raw = values.fill_null(0).to_numpy(zero_copy_only=False).tobytes()
    bodies = [
        (end - start).to_bytes(4, "little") + raw[start * width : end * width]
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    ]
    if values.null_count:
        nulls = np.concatenate([[0], np.cumsum(~values.is_valid().to_numpy(zero_copy_only=False))])
        encode = msgspec.msgpack.Encoder().encode
        for row in np.flatnonzero(nulls[offsets[1:]] - nulls[offsets[:-1]]).tolist():
            bodies[row] = b"\x02" + encode(array[row].as_py())
    return bodies


class RowMarks:
    """One bit per row of the new job, part after part: set for the rows to upsert."""

    def __init__(self, part_rows: list[int]) -> None:
        self.starts = np.concatenate([[0], np.cumsum(part_rows, dtype=np.int64)])
        self.bits = np.zeros((int(self.starts[-1]) + 7) // 8, dtype=np.uint8)

    def mark(self, parts: Any, rows: Any) -> None:
        """Set the bits of these rows (``parts[i]``, ``rows[i]``: numpy int arrays)."""
        at = self.starts[parts] + rows
        np.bitwise_or.at(self.bits, at >> 3, np.left_shift(1, at & 7).astype(np.uint8))

    def of_part(self, part: int) -> Any:
        """The marks of one part's rows, as a numpy bool array."""
        start, end = int(self.starts[part]), int(self.starts[part + 1])
        bits = np.unpackbits(self.bits[start >> 3 : (end + 7) >> 3], bitorder="little")
        return bits[start & 7 : (start & 7) + end - start].astype(bool)


@dataclass
class Tally:
    """What the joins found, bucket after bucket."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    deletes: int = 0


def _read_bucket(path: Path, job_id: str) -> pa.Table:
    """A bucket file, checked for a chunk id that is there twice (the join would pair it
    with every row of the other job of that id)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with pa.ipc.open_stream(path) as reader:
        table = reader.read_all()
    if pc.count_distinct(table.column("chunk_id")).as_py() != table.num_rows:
        counts = table.group_by("chunk_id").aggregate([("chunk_id", "count")])
        twice = counts.filter(pc.greater(counts.column("chunk_id_count"), 1))
        raise EmbedFleetError(
            f"chunk {twice.column('chunk_id')[0].as_py()!r} is in job {job_id} more than once",
            "A delta pairs each chunk id with one row of each job: compare jobs whose "
            "documents have unique ids",
        )
    return table


def join_buckets(old: Spilled, new: Spilled, marks: RowMarks, deletes: Any) -> Tally:
    """Join the two jobs' buckets pair by pair: mark the new rows that are added or
    changed, and write the old chunk ids the new job lacks to ``deletes`` (a
    ``pq.ParquetWriter``), sorted within each bucket."""
    import pyarrow.compute as pc

    tally = Tally()
    for old_file, new_file in zip(old.files, new.files, strict=True):
        joined = _read_bucket(new_file, new.job_id).join(
            _read_bucket(old_file, old.job_id),
            keys="chunk_id",
            join_type="full outer",
            left_suffix="_new",
            right_suffix="_old",
        )
        in_new = pc.is_valid(joined.column("row_new"))
        in_old = pc.is_valid(joined.column("row_old"))
        same = pc.fill_null(
            pc.equal(joined.column("digest_new"), joined.column("digest_old")), False
        )
        upsert = pc.and_(in_new, pc.invert(same))
        picked = joined.filter(upsert)
        marks.mark(
            picked.column("part_new").to_numpy().astype(np.int64),
            picked.column("row_new").to_numpy().astype(np.int64),
        )
        added = pc.sum(pc.and_(in_new, pc.invert(in_old))).as_py() or 0
        tally.added += added
        tally.changed += picked.num_rows - added
        tally.unchanged += pc.sum(same).as_py() or 0
        gone = joined.filter(pc.and_(in_old, pc.invert(in_new))).select(["chunk_id"])
        if gone.num_rows:
            deletes.write_table(gone.sort_by("chunk_id").cast(deletes.schema))
            tally.deletes += gone.num_rows
    return tally


class UpsertFiles:
    """``upserts/part-NNNNN.parquet`` as they are written: with the new job's part
    ``schema``, a file up to ``file_rows`` rows, then the next."""

    def __init__(self, folder: Path, schema: pa.Schema, file_rows: int) -> None:
        self.folder = folder
        self.schema = schema
        self.file_rows = max(1, file_rows)
        self.files: list[DeltaFile] = []
        self._writer: Any = None
        self._path = folder
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is not None and self._rows + table.num_rows > self.file_rows:
            self._close()
        if self._writer is None:
            self._open()
        self._writer.write_table(table)
        self._rows += table.num_rows

    def close(self) -> list[DeltaFile]:
        """Finish the last file (an empty one if nothing was written, so that a glob
        over the folder reads) and list them all."""
        if self._writer is None and not self.files:
            self._open()
        if self._writer is not None:
            self._close()
        return self.files

    def _open(self) -> None:
        import pyarrow.parquet as pq

        self._path = self.folder / f"part-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(self._path, self.schema, compression="zstd")
        self._rows = 0

    def _close(self) -> None:
        self._writer.close()
        self._writer = None
        self.files.append(described(self._path, self._rows))


def write_upserts(
    job: JobStore,
    manifest: Manifest,
    marks: RowMarks,
    upserts: UpsertFiles,
    drop: Sequence[str] = (),
) -> list[DeltaFile]:
    """The marked rows of the new job's parts, read again one at a time."""
    import pyarrow as pa

    assert manifest.chunks is not None
    for number, key in enumerate(manifest.chunks.parts):
        mask = marks.of_part(number)
        if mask.any():
            upserts.write(read_part(job, key, drop).filter(pa.array(mask)))
    return upserts.close()


def described(path: Path, rows: int) -> DeltaFile:
    """A written file's entry in the report: its rows, bytes and sha256."""
    with path.open("rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return DeltaFile(str(path), rows, path.stat().st_size, sha256)
