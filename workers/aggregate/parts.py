"""Chunk part files: one Parquet or JSONL file of whole staged batches, written to a local
temporary file and then uploaded, so a part task's memory and disk are one part's.

A Parquet part has one row per chunk::

    chunk_id  doc_id  chunk_index  text  span_start  span_end  metadata (JSON text)
    text_key        32 hex digits: what a vector of the chunk is keyed by, with its
                    column's model key (shared.records.content_keys)
    dense_<model>   fixed_size_list<float32>[dim]             one per dense model, unit-norm
    sparse_<model>  struct<indices: list<int32>, values: list<float32>>
                                                              one per sparse model; indices
                                                              into vocab/<model>.json

which is the shape LanceDB, Hugging Face datasets, DuckDB, Milvus/Pinecone bulk import
and Anserini's Parquet collections read without conversion. A JSONL part has one
``ChunkRecord`` per line (vectors as JSON lists, sparse vectors as ``{term: weight}``).
The manifest's ``chunks`` (:class:`shared.records.schemas.ChunksLayout`) maps each column to
its model, and each model to its key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec
import numpy as np

from shared.records.content_keys import text_key
from shared.records.schemas import Artifact, ChunkBatch, ChunkRecord, ExportFormat

if TYPE_CHECKING:
    import pyarrow as pa

CONTENT_TYPES: dict[ExportFormat, str] = {
    "parquet": "application/vnd.apache.parquet",
    "jsonl": "application/x-ndjson",
}

# Rows buffered before a Parquet row group is written: large enough for readers to skip
# well, small enough that a part task's memory stays a few MB per dense model.
ROW_GROUP_ROWS = 16_384

_NOT_ALNUM = re.compile(r"[^0-9a-z]+")

Matrix32 = np.ndarray[Any, np.dtype[np.float32]]

SparseVectors = dict[str, list[dict[str, float] | None]]
"""Sparse model -> one exported vector per chunk of a batch (``None``: the chunk has
none from that model)."""


def column_names(kind: str, models: list[str]) -> dict[str, str]:
    """Model -> its column: ``dense_all_minilm_l6_v2`` (the name's last segment, lower
    case, non-alphanumerics as ``_``); the whole name where two models would share one."""

    def short(model: str, whole: bool) -> str:
        name = model if whole else model.rsplit("/", 1)[-1]
        return f"{kind}_{_NOT_ALNUM.sub('_', name.lower()).strip('_')}"

    columns = {model: short(model, whole=False) for model in models}
    if len(set(columns.values())) < len(models):
        columns = {model: short(model, whole=True) for model in models}
    return columns


class _Digest:
    """sha256 and size of a finished local file, read back in 1 MiB blocks."""

    @staticmethod
    def of(path: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
        return digest.hexdigest(), size


class JsonlWriter:
    """A JSONL file being written: counts records, bytes and the sha256 as it goes."""

    def __init__(self, handle: IO[bytes], content_type: str = CONTENT_TYPES["jsonl"]) -> None:
        self.handle = handle
        self.content_type = content_type
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.records = 0
        self._encoder = msgspec.json.Encoder()

    def write(self, record: Any) -> None:
        line = self._encoder.encode(record) + b"\n"
        self.handle.write(line)
        self.digest.update(line)
        self.bytes += len(line)
        self.records += 1

    def artifact(self, key: str) -> Artifact:
        return Artifact(
            key=key,
            bytes=self.bytes,
            sha256=self.digest.hexdigest(),
            records=self.records,
            content_type=self.content_type,
        )


class PartWriter:
    """One part file of either format; :meth:`add` takes a batch and its vectors.

    Args:
        path: The local file to write.
        format: ``parquet`` or ``jsonl``.
        dense: Dense model -> its dimension, in the job's order.
        sparse: Sparse model -> its vocabulary's index (term -> index); Parquet only
            needs it, JSONL writes the terms.
    """

    def __init__(
        self,
        path: Path,
        format: ExportFormat,
        dense: dict[str, int],
        sparse: dict[str, dict[str, int]],
    ) -> None:
        self.path = path
        self.format = format
        self.dense = dense
        self.sparse = sparse
        self.rows = 0
        self.outside_vocabulary: dict[str, int] = dict.fromkeys(sparse, 0)
        self._handle = path.open("wb")
        self._jsonl = JsonlWriter(self._handle) if format == "jsonl" else None
        self._dense_columns = column_names("dense", list(dense))
        self._sparse_columns = column_names("sparse", list(sparse))
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._parquet: Any = None
        if format == "parquet":
            import pyarrow.parquet as pq

            self._schema = self.schema()
            self._parquet = pq.ParquetWriter(self._handle, self._schema, compression="zstd")

    def schema(self) -> pa.Schema:
        """The Parquet parts' columns (see the module doc)."""
        import pyarrow as pa

        sparse_type = pa.struct(
            [("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))]
        )
        fields = [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("span_start", pa.int32(), nullable=False),
            pa.field("span_end", pa.int32(), nullable=False),
            pa.field("metadata", pa.string(), nullable=False),
            pa.field("text_key", pa.string(), nullable=False),
        ]
        for model, dim in self.dense.items():
            column = self._dense_columns[model]
            fields.append(pa.field(column, pa.list_(pa.float32(), dim), nullable=False))
        for model in self.sparse:
            fields.append(pa.field(self._sparse_columns[model], sparse_type))
        return pa.schema(fields, metadata={b"embed_fleet": b"chunks"})

    def add(
        self,
        batch: ChunkBatch,
        matrices: dict[str, Matrix32],
        sparse: SparseVectors | None,
    ) -> None:
        """Write one staged batch's chunks with their vectors (rows in chunk order)."""
        if self._jsonl is not None:
            self._add_jsonl(batch, matrices, sparse)
        else:
            self._add_parquet(batch, matrices, sparse)
        self.rows += len(batch.chunks)

    def _add_jsonl(
        self,
        batch: ChunkBatch,
        matrices: dict[str, Matrix32],
        sparse: SparseVectors | None,
    ) -> None:
        assert self._jsonl is not None
        # float32 -> Python float is exact; JSON then holds each float32 value exactly.
        lists = {name: matrix.tolist() for name, matrix in matrices.items()}
        for row, chunk in enumerate(batch.chunks):
            vectors: dict[str, dict[str, float]] | None = None
            if sparse is not None:
                vectors = {}
                for model, rows in sparse.items():
                    vector = rows[row]
                    if vector is not None:
                        vectors[model] = vector
            self._jsonl.write(
                ChunkRecord(
                    chunk_id=chunk.chunk_id,
                    doc_id=chunk.doc_id,
                    chunk_index=chunk.index,
                    text=chunk.text,
                    span=chunk.span,
                    metadata=chunk.metadata,
                    dense={name: rows[row] for name, rows in lists.items()},
                    sparse=vectors,
                    text_key=text_key(chunk.text),
                )
            )

    def _add_parquet(
        self,
        batch: ChunkBatch,
        matrices: dict[str, Matrix32],
        sparse: SparseVectors | None,
    ) -> None:
        import pyarrow as pa

        chunks = batch.chunks
        encode = msgspec.json.encode
        columns: list[pa.Array] = [
            pa.array([c.chunk_id for c in chunks], pa.string()),
            pa.array([c.doc_id for c in chunks], pa.string()),
            pa.array([c.index for c in chunks], pa.int32()),
            pa.array([c.text for c in chunks], pa.string()),
            pa.array([c.span[0] for c in chunks], pa.int32()),
            pa.array([c.span[1] for c in chunks], pa.int32()),
            pa.array([encode(c.metadata).decode() for c in chunks], pa.string()),
            pa.array([text_key(c.text) for c in chunks], pa.string()),
        ]
        for model, dim in self.dense.items():
            flat = pa.array(np.ascontiguousarray(matrices[model], np.float32).ravel())
            columns.append(pa.FixedSizeListArray.from_arrays(flat, dim))
        for model, index in self.sparse.items():
            rows = (sparse or {}).get(model) or [None] * len(chunks)
            columns.append(self._sparse_column(model, index, rows))
        self._buffer.append(pa.RecordBatch.from_arrays(columns, schema=self._schema))
        self._buffered += len(chunks)
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _sparse_column(
        self, model: str, index: dict[str, int], rows: list[dict[str, float] | None]
    ) -> pa.Array:
        import pyarrow as pa

        values: list[dict[str, list[Any]] | None] = []
        for vector in rows:
            if vector is None:
                values.append(None)
                continue
            known = sorted((index[t], w) for t, w in vector.items() if t in index)
            self.outside_vocabulary[model] += len(vector) - len(known)
            values.append({"indices": [i for i, _ in known], "values": [w for _, w in known]})
        return pa.array(values, type=self._schema.field(self._sparse_columns[model]).type)

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._parquet.write_table(pa.Table.from_batches(self._buffer))
            self._buffer, self._buffered = [], 0

    def close(self, key: str) -> Artifact:
        """Finish the file; its artifact record under ``key`` (where it is uploaded)."""
        if self._jsonl is not None:
            self._handle.close()
            return self._jsonl.artifact(key)
        self._flush()
        self._parquet.close()
        self._handle.close()
        sha256, size = _Digest.of(self.path)
        return Artifact(
            key=key,
            bytes=size,
            sha256=sha256,
            records=self.rows,
            content_type=CONTENT_TYPES["parquet"],
        )

    def abandon(self) -> None:
        """Close the file without finishing it (the task failed)."""
        if not self._handle.closed:
            self._handle.close()
