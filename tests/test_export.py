"""The export's parts: how batches are cut into parts, the column names, and that a
Parquet part reads back as the JSONL part's records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from artifacts import parquet_records
from test_ledger import spec

from shared.records.schemas import Chunk, ChunkBatch, ExportSpec
from workers.aggregate.export import part_rows, plan_parts
from workers.aggregate.parts import PartWriter, column_names


def test_parts_take_whole_batches_up_to_the_row_bound() -> None:
    job = spec()
    items = {"b1": 4, "b2": 4, "b3": 4, "b4": 9, "b5": 1}
    parts = plan_parts(job, list(items), items, rows=8)
    assert [p.batch_ids for p in parts] == [["b1", "b2"], ["b3"], ["b4"], ["b5"]]
    assert [p.unit for p in parts] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert all(p.stage == "export" and p.job_id == job.job_id for p in parts)
    assert plan_parts(job, [], {}, rows=8) == []


def test_part_rows_follow_the_byte_bound() -> None:
    job = spec()
    job.export = ExportSpec(part_rows=100_000, part_bytes=256 * 2**20)
    assert part_rows(job, [384]) == 100_000  # ~2 KB rows: the row bound holds
    assert part_rows(job, [4096, 4096]) < 10_000  # 32 KB rows: the byte bound does
    job.export = ExportSpec(part_rows=10, part_bytes=1)
    assert part_rows(job, [384]) == 1


def test_column_names_are_short_and_distinct() -> None:
    assert column_names("dense", ["sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small"]) == {
        "sentence-transformers/all-MiniLM-L6-v2": "dense_all_minilm_l6_v2",
        "BAAI/bge-small": "dense_bge_small",
    }
    # Two models with the same last segment: the whole names tell them apart.
    assert column_names("dense", ["a/model", "b/model"]) == {
        "a/model": "dense_a_model",
        "b/model": "dense_b_model",
    }


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_part_holds_its_batches_in_either_format(tmp_path: Path, fmt: str) -> None:
    chunks = [
        Chunk(chunk_id=f"d{i}#0", doc_id=f"d{i}", index=0, text=f"text {i}", n_tokens=2,
              span=(0, 6), metadata={"n": i})
        for i in range(3)
    ]  # fmt: skip
    batch = ChunkBatch(job_id="j", batch_id="b1", chunks=chunks)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((3, 4)).astype(np.float32)
    sparse = {"splade": [{"wing": 0.5, "flow": 1.25}, None, {"odd-term": 2.0, "wing": 0.125}]}
    vocabulary = ["flow", "wing"]
    writer = PartWriter(
        tmp_path / f"part.{fmt}",
        fmt,
        {"org/m": 4},
        {"splade": {t: i for i, t in enumerate(vocabulary)}},
    )
    writer.add(batch, {"org/m": matrix}, sparse)
    artifact = writer.close("c/j/chunks/part-00000." + fmt)
    assert artifact.records == 3 and artifact.bytes == writer.path.stat().st_size
    if fmt == "jsonl":
        records = [json.loads(line) for line in writer.path.read_text().splitlines()]
        assert records[2]["sparse"] == {"splade": {"odd-term": 2.0, "wing": 0.125}}
        assert records[1]["sparse"] == {}
    else:
        layout = {
            "dense_columns": {"dense_m": "org/m"},
            "sparse_columns": {"sparse_splade": "splade"},
        }
        records = parquet_records(pq.read_table(writer.path), layout, {"splade": vocabulary})
        # A term outside the vocabulary cannot be indexed: counted, kept in the metadata.
        assert records[2]["sparse"] == {"splade": {"wing": 0.125}}
        assert writer.outside_vocabulary == {"splade": 1}
        assert records[1]["sparse"] == {}
        row = pq.read_table(writer.path).to_pylist()[0]
        assert row["sparse_splade"] == {"indices": [0, 1], "values": [1.25, 0.5]}  # sorted
    assert [r["chunk_id"] for r in records] == ["d0#0", "d1#0", "d2#0"]
    assert records[0]["sparse"] == {"splade": {"wing": 0.5, "flow": 1.25}}
    assert records[1]["metadata"] == {"n": 1} and records[1]["span"] == [0, 6]
    np.testing.assert_array_equal(np.array([r["dense"]["org/m"] for r in records]), matrix)
