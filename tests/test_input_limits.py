"""Hostile inputs: a record over --max-record-bytes is a bad record in every format, named
by file and line, read past without ever being held; a document of more chunks than
--max-document-chunks is one too, found by the cut, which stops at one chunk more."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from producer.cli.app import ByteSize
from shared.inputs.chunking import Chunker, ChunkTally, chunk_batches, load_tokenizer
from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model
from shared.inputs.sources import (
    ReadProgress,
    cut_ranges,
    documents,
    open_source,
    read_range,
    read_records,
)
from shared.records.errors import BadRecordError
from shared.records.schemas import Document, FieldMap, InputLimits, SkippedRecord

KIB = 1024
SMALL = InputLimits(max_record_bytes=4 * KIB)


def line(doc_id: str, text: str) -> bytes:
    return json.dumps({"id": doc_id, "text": text}).encode() + b"\n"


def summary(records: list[Document | SkippedRecord]) -> list[tuple[str, int]]:
    """Each record as (id, line), a skipped one as ("skipped", line)."""
    return [(r.id, r.line) if isinstance(r, Document) else ("skipped", r.line) for r in records]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_jsonl_record_over_the_limit_is_skipped_by_line_and_the_rest_read(
    tmp_path: Path, suffix: str
) -> None:
    body = line("a", "first") + line("big", "x" * 20_000) + line("b", "second")
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    got = list(read_records(open_source(path), limits=SMALL))
    assert summary(got) == [("a", 1), ("skipped", 2), ("b", 3)]
    bad = got[1]
    assert isinstance(bad, SkippedRecord) and bad.path == str(path)
    size = len(line("big", "x" * 20_000))
    assert bad.reason.startswith(f"record of {size:,} bytes, over the limit of 4,096 bytes")
    assert "--max-record-bytes" in bad.reason
    with pytest.raises(BadRecordError, match=r":2: record of .*\(--max-record-bytes"):
        list(documents(open_source(path), "fail", limits=SMALL))


def test_a_record_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    record = line("a", "")
    pad = SMALL.max_record_bytes - (len(record) - 1)  # a record's bytes: not its break
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(line("a", "y" * pad) + line("b", "y" * (pad + 1)))
    got = list(read_records(open_source(path), limits=SMALL))
    assert summary(got) == [("a", 1), ("skipped", 2)]


def test_a_compressed_bomb_is_read_past_in_bounded_memory(tmp_path: Path) -> None:
    """48 MB of one record in a .gz of some 50 KB, under a 1 MiB limit: the reader holds
    about the limit, not the record (Python's allocations, traced)."""
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(line("a", "before"))
        out.write(b'{"id": "bomb", "text": "')
        block = b"lorem ipsum " * 87_381  # about 1 MiB
        for _ in range(48):
            out.write(block)
        out.write(b'"}\n')
        out.write(line("b", "after"))
    assert path.stat().st_size < 2**20
    limits = InputLimits(max_record_bytes=2**20)
    tracemalloc.start()
    try:
        got = list(read_records(open_source(path), limits=limits))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary(got) == [("a", 1), ("skipped", 2), ("b", 3)]
    assert peak < 8 * 2**20, f"{peak:,} bytes held reading past a 48 MB record"


def test_a_range_cut_next_to_a_long_record_reads_as_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    rows = [line(str(i), "z" * (9_000 if i % 7 == 3 else 50)) for i in range(60)]
    path.write_bytes(b"".join(rows))
    source = open_source(path)
    whole = summary(list(read_records(source, limits=SMALL)))
    parts = cut_ranges(source, 3_000)
    assert len(parts) > 5
    pieces: list[tuple[str, int]] = []
    for part in parts:
        progress = ReadProgress()
        got = list(read_range(source.kind, part, progress, limits=SMALL))
        assert progress.bytes_read == part.bytes
        pieces += [(doc_id, 0) for doc_id, _ in summary(got)]
    assert [doc_id for doc_id, _ in whole] == [doc_id for doc_id, _ in pieces]
    assert sum(doc_id == "skipped" for doc_id, _ in whole) == 9


def test_a_beir_corpus_whose_first_record_is_over_the_limit_is_still_beir(
    tmp_path: Path,
) -> None:
    path = tmp_path / "corpus.jsonl"
    big = json.dumps({"_id": "big", "text": "w" * (InputLimits().max_record_bytes + 10)})
    path.write_bytes(big.encode() + b"\n" + json.dumps({"_id": "d", "text": "t"}).encode())
    assert open_source(path).kind == "beir"


def test_a_text_file_over_the_limit_is_skipped_unread(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("small")
    (folder / "b.md").write_text("q" * 5_000)
    got = list(read_records(open_source(folder), limits=SMALL))
    assert summary(got) == [("a.txt", 1), ("skipped", 1)]
    assert isinstance(got[1], SkippedRecord) and got[1].path.endswith("b.md")
    assert "record of 5,000 bytes" in got[1].reason


def test_a_csv_row_over_the_limit_is_skipped_whether_a_line_or_a_quoted_field(
    tmp_path: Path,
) -> None:
    long_line = "x" * 6_000
    long_field = "\n".join(["y" * 100] * 60)  # many short lines, one field
    path = tmp_path / "rows.csv"
    path.write_text(f'id,text\n1,first\n2,{long_line}\n3,third\n4,"{long_field}"\n5,fifth\n')
    got = list(read_records(open_source(path), limits=SMALL))
    kept = [(r.id, r.line) for r in got if isinstance(r, Document)]
    assert kept == [("1", 2), ("3", 4), ("5", 65)]
    bad = [r for r in got if isinstance(r, SkippedRecord)]
    assert [r.line for r in bad] == [3, 64]  # each row's last line
    assert bad[0].reason.startswith("record of 6,003 characters, over the limit of 4,096")
    assert "over the limit of 4,096 characters (--max-record-bytes" in bad[1].reason


def test_a_tsv_row_is_a_line_and_a_quote_opens_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rows.tsv"
    path.write_text(f'id\ttext\n1\t"open quote\n2\t{"w" * 5_000}\n3\tthird\n')
    got = list(read_records(open_source(path), limits=SMALL))
    assert summary(got) == [("1", 2), ("skipped", 3), ("3", 4)]


def test_a_parquet_cell_over_the_limit_is_skipped_by_row(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["fine", "p" * 3_000, "also fine"],
            "title": ["", "t" * 2_000, None],
        }
    )
    pq.write_table(table, path)
    got = list(read_records(open_source(path, FieldMap()), limits=SMALL))
    assert summary(got) == [("a", 1), ("skipped", 2), ("c", 3)]
    assert isinstance(got[1], SkippedRecord) and "record of 5,000 bytes" in got[1].reason


def test_a_document_of_too_many_chunks_is_a_bad_record_and_the_rest_are_cut() -> None:
    tokenizer = load_tokenizer(str(resolve_model(DEFAULT_DENSE_MODEL).path))
    chunker = Chunker(tokenizer, 32, max_document_chunks=5)
    words = " ".join(f"word{i}" for i in range(2_000))  # far more than 5 chunks of 32
    docs = [
        Document(id="short", text="a short one", path="c.jsonl", line=1),
        Document(id="book", text=words, path="c.jsonl", line=2),
        Document(id="five", text=" ".join(["five words make one chunk"] * 20), line=3),
    ]
    assert chunker.chunk(docs[1]) is None
    seen: list[SkippedRecord] = []
    tally = ChunkTally()
    runs = list(chunk_batches(chunker, docs, 100, tally, seen.append))
    cut = [chunk.doc_id for run in runs for chunk in run.chunks]
    assert "book" not in cut and cut[0] == "short" and "five" in cut
    assert tally.documents == 2 and len(tally.too_long) == 1 and seen == tally.too_long
    assert (seen[0].path, seen[0].line) == ("c.jsonl", 2)
    assert "more than 5 chunks of 32 tokens (--max-document-chunks" in seen[0].reason


@pytest.mark.parametrize(
    ("given", "size"),
    [("1048576", 2**20), ("512KiB", 512 * KIB), ("64 mib", 64 * 2**20), ("10MB", 10**7)],
)
def test_a_size_option_takes_bytes_or_a_unit(given: str, size: int) -> None:
    assert ByteSize().convert(given, None, None) == size


def test_a_size_option_that_is_not_a_size_says_what_would_be() -> None:
    import click

    @click.command()
    @click.option("--max-record-bytes", type=ByteSize())
    def command(max_record_bytes: int) -> None:
        pass

    result = CliRunner().invoke(command, ["--max-record-bytes", "lots"])
    assert result.exit_code == 2
    assert "'lots' is not a size (try 1048576, 512KiB, 64MiB or 1GiB)" in result.output
