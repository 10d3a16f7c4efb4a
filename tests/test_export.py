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
from workers.aggregate.export import in_reading_order, part_rows, plan_parts
from workers.aggregate.parts import PartWriter, column_names


def test_parts_take_whole_batches_up_to_the_row_bound() -> None:
    job = spec()
    items = {"b1": 4, "b2": 4, "b3": 4, "b4": 9, "b5": 1}
    parts = plan_parts(job, list(items), items, rows=8)
    assert [p.batch_ids for p in parts] == [["b1", "b2"], ["b3"], ["b4"], ["b5"]]
    assert [p.unit for p in parts] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert all(p.stage == "export" and p.job_id == job.job_id for p in parts)
    assert plan_parts(job, [], {}, rows=8) == []


def test_parts_take_whole_like_length_windows() -> None:
    """Two batches a window, per read range (and for the producer's one stream): a part
    never splits one, so that it can write the window's chunks back in reading order."""
    job = spec()
    job.sort_window = 2
    staged = ["b00000-00000", "b00000-00001", "b00000-00002", "b00001-00000", "b00001-00001"]
    items = dict.fromkeys(staged, 4)
    parts = plan_parts(job, staged, items, rows=4)
    assert [p.batch_ids for p in parts] == [staged[:2], staged[2:3], staged[3:]]
    parts = plan_parts(job, staged, items, rows=12)
    assert [p.batch_ids for p in parts] == [staged[:3], staged[3:]]
    alone = ["b000000", "b000001", "b000002"]
    parts = plan_parts(job, alone, dict.fromkeys(alone, 4), rows=4)
    assert [p.batch_ids for p in parts] == [alone[:2], alone[2:]]


def test_a_window_goes_back_into_reading_order_with_its_vectors() -> None:
    chunks = [
        Chunk(chunk_id=f"d{i}#0", doc_id=f"d{i}", index=0, text=f"t{i}", n_tokens=1, span=(0, 2))
        for i in range(4)
    ]
    # Staged longest first: d2 and d0 in one batch, d1 and d3 in the next.
    first = ChunkBatch(
        job_id="j", batch_id="b000000", chunks=[chunks[2], chunks[0]], reading=[2, 0]
    )
    second = ChunkBatch(
        job_id="j", batch_id="b000001", chunks=[chunks[1], chunks[3]], reading=[1, 3]
    )
    vectors = {i: np.full((1, 3), i, np.float32) for i in range(4)}
    window = [
        (first, {"m": np.concatenate([vectors[2], vectors[0]])}, {"s": [{"w2": 2.0}, None]}),
        (second, {"m": np.concatenate([vectors[1], vectors[3]])}, {}),
    ]
    [(batch, matrices, sparse)] = in_reading_order(window)
    assert [c.chunk_id for c in batch.chunks] == ["d0#0", "d1#0", "d2#0", "d3#0"]
    assert batch.reading == [] and batch.tokens is None
    np.testing.assert_array_equal(matrices["m"][:, 0], [0, 1, 2, 3])
    assert sparse == {"s": [None, None, {"w2": 2.0}, None]}
    plain = ChunkBatch(job_id="j", batch_id="b000000", chunks=chunks)
    assert in_reading_order([(plain, {}, None)]) == [(plain, {}, None)]


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
