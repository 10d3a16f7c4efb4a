"""Exports for search engines: a finished job's vectors as an Anserini/pyserini impact
collection and as FAISS indexes, so a user loads them without writing converters.

Both read the job's chunk parts one at a time from its store (local or S3), as listed by
the manifest, so no step holds more than one part of chunks. A FAISS flat index itself
holds every vector: that is what it is.

- ``pyserini-sparse``: per sparse model, one JSONL file per part in Anserini's
  ``JsonVectorCollection`` form, ``{"id", "contents", "vector": {term: weight}}``, the
  weights quantised to integers (``round(weight * quantize)``, zeros dropped), as
  Anserini's impact indexes expect (``-impact -pretokenized``).
- ``faiss``: per dense model, an ``IndexFlatIP`` over the unit-norm vectors (inner
  product is cosine similarity) and one ``ids.txt``: line *i* is the chunk id of
  vector *i*, in every index.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.records.earlier_jobs import finished_job as finished_job  # (re-exported)
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.part_columns import dense_matrix
from shared.records.schemas import Manifest
from shared.records.storage import safe_name

ExportTarget = Literal["pyserini-sparse", "faiss", "delta"]
TARGETS: tuple[ExportTarget, ...] = ("pyserini-sparse", "faiss", "delta")


class ExportedFile(msgspec.Struct):
    """One file an export wrote: where, for which model, how many records."""

    path: str
    model: str
    records: int


class ExportReport(msgspec.Struct):
    """What an export wrote (``export.json`` beside the files)."""

    job_id: str
    target: str
    chunks: int
    files: list[ExportedFile]
    quantize: int | None = None


class PartChunks(msgspec.Struct):
    """The chunks of one part, as the exports need them."""

    chunk_ids: list[str]
    texts: list[str]
    dense: dict[str, Any]  # model -> float32 array (chunks x dim)
    sparse: dict[str, list[dict[str, float] | None]]  # model -> a term weighting per chunk


def finished_manifest(job: JobStore) -> Manifest:
    """The job's manifest, if its chunks were exported."""
    manifest = job.manifest()
    if manifest.chunks is None or not manifest.chunks.parts:
        raise EmbedFleetError(
            f"job {manifest.job_id} has no chunk parts to export", "Export a finished job"
        )
    return manifest


def part_chunks(job: JobStore, manifest: Manifest) -> Iterator[PartChunks]:
    """Every part of the job, in order, read one at a time."""
    import numpy as np

    layout = manifest.chunks
    assert layout is not None
    store = job.store
    vocabularies = {
        model: json.loads(store.get_bytes(key)) for model, key in layout.vocabularies.items()
    }
    for key in layout.parts:
        raw = store.get_bytes(key)
        if layout.format == "jsonl":
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            dense_models = sorted({m for row in rows for m in (row.get("dense") or {})})
            sparse_models = sorted({m for row in rows for m in (row.get("sparse") or {})})
            yield PartChunks(
                chunk_ids=[row["chunk_id"] for row in rows],
                texts=[row["text"] for row in rows],
                dense={
                    m: np.asarray([row["dense"][m] for row in rows], dtype=np.float32)
                    for m in dense_models
                },
                sparse={
                    m: [(row.get("sparse") or {}).get(m) for row in rows] for m in sparse_models
                },
            )
            continue
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw))
        dense = {
            model: dense_matrix(table.column(column).combine_chunks())
            for column, model in layout.dense_columns.items()
        }
        sparse: dict[str, list[dict[str, float] | None]] = {}
        for column, model in layout.sparse_columns.items():
            vocab = vocabularies[model]
            sparse[model] = [
                None if cell is None else {
                    vocab[i]: w for i, w in zip(cell["indices"], cell["values"], strict=True)
                }
                for cell in table.column(column).to_pylist()
            ]  # fmt: skip
        yield PartChunks(
            chunk_ids=table.column("chunk_id").to_pylist(),
            texts=table.column("text").to_pylist(),
            dense=dense,
            sparse=sparse,
        )


def quantized(weights: dict[str, float] | None, quantize: int) -> dict[str, int]:
    """Impact weights as Anserini indexes them: integers, zeros dropped."""
    out: dict[str, int] = {}
    for term, weight in (weights or {}).items():
        value = round(weight * quantize)
        if value > 0:
            out[term] = value
    return out


def export_pyserini(job: JobStore, out_dir: Path, quantize: int = 100) -> ExportReport:
    """Anserini ``JsonVectorCollection`` files, a folder per sparse model, a file per part."""
    manifest = finished_manifest(job)
    layout = manifest.chunks
    assert layout is not None
    models = list(layout.sparse_columns.values()) or sorted(layout.vocabularies)
    if not models:
        raise EmbedFleetError(
            f"job {manifest.job_id} has no sparse vectors",
            "Run the job with --enable-sparse (or --sparse-models) to export them",
        )
    files: list[ExportedFile] = []
    chunks = 0
    for number, part in enumerate(part_chunks(job, manifest)):
        chunks += len(part.chunk_ids)
        for model in part.sparse:
            folder = out_dir / safe_name(model)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"part-{number:05d}.jsonl"
            with path.open("w", encoding="utf-8") as handle:
                for chunk_id, text, weights in zip(
                    part.chunk_ids, part.texts, part.sparse[model], strict=True
                ):
                    line: dict[str, Any] = {"id": chunk_id, "contents": text}
                    line["vector"] = quantized(weights, quantize)
                    handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            files.append(ExportedFile(str(path), model, len(part.chunk_ids)))
    report = ExportReport(
        job_id=manifest.job_id,
        target="pyserini-sparse",
        chunks=chunks,
        files=files,
        quantize=quantize,
    )
    (out_dir / "export.json").write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    return report


def export_faiss(job: JobStore, out_dir: Path) -> ExportReport:
    """A FAISS inner-product index per dense model, and the chunk ids in index order."""
    import faiss

    manifest = finished_manifest(job)
    out_dir.mkdir(parents=True, exist_ok=True)
    indexes: dict[str, Any] = {}
    chunks = 0
    with (out_dir / "ids.txt").open("w", encoding="utf-8") as ids:
        for part in part_chunks(job, manifest):
            if not part.dense:
                raise EmbedFleetError(
                    f"job {manifest.job_id} has no dense vectors in its parts",
                    "Export a job whose parts hold dense columns",
                )
            for model, vectors in part.dense.items():
                if model not in indexes:
                    indexes[model] = faiss.IndexFlatIP(vectors.shape[1])
                indexes[model].add(vectors)
            for chunk_id in part.chunk_ids:
                ids.write(chunk_id + "\n")
            chunks += len(part.chunk_ids)
    files = [ExportedFile(str(out_dir / "ids.txt"), "", chunks)]
    for model, index in indexes.items():
        path = out_dir / f"{safe_name(model)}.faiss"
        faiss.write_index(index, str(path))
        files.append(ExportedFile(str(path), model, int(index.ntotal)))
    report = ExportReport(job_id=manifest.job_id, target="faiss", chunks=chunks, files=files)
    (out_dir / "export.json").write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    return report
