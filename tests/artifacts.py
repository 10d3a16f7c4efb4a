"""Reading a job's output as a user would: the manifest's parts, in either format.

``chunk_records`` turns Parquet rows back into the JSONL record shape (the same fields,
sparse vectors as ``{term: weight}`` through the vocabularies), so a test checks the
chunks the same way whichever format the job wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Get = Callable[[str], bytes]
"""Bytes of an artifact, by its key in the manifest."""


def chunk_records(manifest: dict[str, Any], get: Get) -> list[dict[str, Any]]:
    """Every chunk of the job's parts, in part order, as JSONL records (dicts)."""
    layout = manifest["chunks"]
    records: list[dict[str, Any]] = []
    if layout["format"] == "jsonl":
        for key in layout["parts"]:
            records += [json.loads(line) for line in get(key).splitlines()]
        return records
    vocabularies = {model: json.loads(get(key)) for model, key in layout["vocabularies"].items()}
    for key in layout["parts"]:
        table = pq.read_table(io.BytesIO(get(key)))
        records += parquet_records(table, layout, vocabularies)
    return records


def in_reading_order(chunk_ids: list[str], corpus_lines: list[str]) -> list[str]:
    """Chunk ids sorted as a JSONL corpus reads: by their document's line, then their
    index in it (the order the parts hold; staged batches sort by length)."""
    line = {json.loads(text)["_id"]: n for n, text in enumerate(corpus_lines)}

    def place(chunk_id: str) -> tuple[int, int]:
        doc_id, _, index = chunk_id.rpartition("#")
        return line[doc_id], int(index)

    return sorted(chunk_ids, key=place)


def parquet_records(
    table: pa.Table, layout: dict[str, Any], vocabularies: dict[str, list[str]]
) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    out = []
    for row in rows:
        sparse: dict[str, dict[str, float]] | None = None
        if layout["sparse_columns"]:
            sparse = {}
            for column, model in layout["sparse_columns"].items():
                vector = row[column]
                if vector is not None:
                    terms = vocabularies[model]
                    sparse[model] = {
                        terms[i]: w
                        for i, w in zip(vector["indices"], vector["values"], strict=True)
                    }
        out.append(
            {
                "chunk_id": row["chunk_id"],
                "doc_id": row["doc_id"],
                "chunk_index": row["chunk_index"],
                "text": row["text"],
                "span": [row["span_start"], row["span_end"]],
                "metadata": json.loads(row["metadata"]),
                "text_key": row["text_key"],
                "dense": {model: row[column] for column, model in layout["dense_columns"].items()},
                "sparse": sparse,
            }
        )
    return out


def check_artifacts(manifest: dict[str, Any], get: Get) -> None:
    """Every artifact's bytes, sha256 and record count match the stored object."""
    for artifact in manifest["artifacts"]:
        body = get(artifact["key"])
        assert len(body) == artifact["bytes"], artifact["key"]
        assert hashlib.sha256(body).hexdigest() == artifact["sha256"], artifact["key"]
        kind = artifact["content_type"]
        if kind == "application/x-ndjson":
            assert body.count(b"\n") == artifact["records"]
        elif kind == "application/vnd.apache.parquet":
            assert pq.ParquetFile(io.BytesIO(body)).metadata.num_rows == artifact["records"]
        elif kind == "text/html":  # report.html
            assert body.startswith(b"<!DOCTYPE html>") and artifact["records"] == 1
        elif artifact["key"].split("/")[-2] == "vocab":
            assert len(json.loads(body)) == artifact["records"]
        else:
            assert json.loads(body) and artifact["records"] == 1
