"""Reading collections: BEIR folders, JSONL files, folders of .txt/.md files, bad records."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from shared.inputs.sources import (
    ReadProgress,
    cut_ranges,
    documents,
    is_empty,
    open_source,
    read_range,
    read_records,
)
from shared.records.errors import BadRecordError, EmbedFleetError, UnreadableFileError
from shared.records.schemas import Document, SkippedRecord


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Write one JSON value per line; bytes are written as they are (for bad lines)."""
    with path.open("wb") as handle:
        for record in records:
            line = record if isinstance(record, bytes) else json.dumps(record).encode()
            handle.write(line + b"\n")
    return path


def skipped(source_path: Path) -> list[SkippedRecord]:
    return [r for r in read_records(open_source(source_path)) if isinstance(r, SkippedRecord)]


def docs(source_path: Path) -> list[Document]:
    return [r for r in read_records(open_source(source_path)) if isinstance(r, Document)]


# --- layouts ---------------------------------------------------------------------------


def test_beir_folder(tmp_path: Path) -> None:
    folder = tmp_path / "scifact"
    folder.mkdir()
    write_jsonl(
        folder / "corpus.jsonl",
        [
            {"_id": "d1", "title": "First", "text": "one", "metadata": {"year": 1999}},
            {"_id": "d2", "title": "", "text": "two"},
            {"_id": "d3", "text": "three"},
        ],
    )
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "not a document"}\n')
    source = open_source(folder)
    assert source.kind == "beir"
    assert source.name == "scifact"
    assert source.files == [folder / "corpus.jsonl"]
    got = docs(folder)
    assert [(d.id, d.title, d.text) for d in got] == [
        ("d1", "First", "one"),
        ("d2", "", "two"),
        ("d3", "", "three"),
    ]
    assert got[0].metadata == {"year": 1999}
    assert got[1].metadata == {}
    assert [d.line for d in got] == [1, 2, 3]
    assert all(d.path == str(folder / "corpus.jsonl") for d in got)


def test_beir_corpus_file_is_recognised_by_its_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "text": "x"}])
    assert open_source(path).kind == "beir"
    assert [d.id for d in docs(path)] == ["a"]


def test_jsonl_file(tmp_path: Path) -> None:
    meta = {"source": "web", "tags": ["a", "b"], "nested": {"k": 1.5}}
    path = write_jsonl(
        tmp_path / "notes.jsonl",
        [
            {"id": "n1", "text": "hello", "title": "Greeting", "metadata": meta},
            {"id": "n2", "text": "world"},
        ],
    )
    source = open_source(path)
    assert source.kind == "jsonl"
    assert source.name == "notes"
    got = docs(path)
    assert [(d.id, d.title, d.text) for d in got] == [
        ("n1", "Greeting", "hello"),
        ("n2", "", "world"),
    ]
    assert got[0].metadata == meta
    assert got[1].metadata == {}


def test_jsonl_skips_blank_lines_but_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n   \n{"id": "b", "text": "y"}\n')
    got = docs(path)
    assert [(d.id, d.line) for d in got] == [("a", 1), ("b", 4)]


def test_integer_ids_become_strings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "text": "x"}, {"id": 12, "text": "y"}])
    got = docs(path)
    assert [d.id for d in got] == ["7", "12"]
    assert all(isinstance(d.id, str) for d in got)

    folder = tmp_path / "beir"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [{"_id": 3, "text": "z"}])
    assert [d.id for d in docs(folder)] == ["3"]


def test_empty_text_is_a_document_not_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "e", "text": ""}, {"id": "f", "text": "x"}])
    records = list(documents(open_source(path), "fail"))
    assert all(isinstance(r, Document) for r in records)
    assert [(r.id, r.text) for r in records if isinstance(r, Document)] == [("e", ""), ("f", "x")]


def test_text_dir(tmp_path: Path) -> None:
    folder = tmp_path / "handbook"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha text")
    (folder / "sub" / "b.md").write_text("# beta\n\nmarkdown")
    (folder / "C.TXT").write_text("upper-case suffix")
    (folder / "ignored.json").write_text("{}")
    (folder / "image.png").write_bytes(b"\x89PNG")
    source = open_source(folder)
    assert source.kind == "text-dir"
    assert source.name == "handbook"
    got = docs(folder)
    by_id = {d.id: d for d in got}
    assert set(by_id) == {"a.txt", "sub/b.md", "C.TXT"}
    assert by_id["a.txt"].text == "alpha text"
    assert by_id["sub/b.md"].text == "# beta\n\nmarkdown"
    assert by_id["sub/b.md"].path == str(folder / "sub" / "b.md")


def test_text_dir_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.txt").write_text("fine")
    (folder / "bad.txt").write_bytes(b"line one\nline two\nbroken \xff here\n")
    bad = skipped(folder)
    assert len(bad) == 1
    assert bad[0].path == str(folder / "bad.txt")
    assert bad[0].line == 3
    assert "UTF-8" in bad[0].reason
    assert [d.id for d in docs(folder)] == ["good.txt"]


# --- open_source errors ---------------------------------------------------------------


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(EmbedFleetError) as info:
        open_source(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)
    assert info.value.fix


def test_folder_without_a_collection_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    (folder / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    with pytest.raises(EmbedFleetError) as info:
        open_source(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "corpus.jsonl" in message
    assert ".txt" in message


# --- bad records -----------------------------------------------------------------------


GOOD = {"id": "ok", "text": "good"}


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (b'{"id": "x", "text": "unterminated', "malformed JSON"),
        (b"{not json at all}", "malformed JSON"),
        (json.dumps({"text": "no id"}).encode(), "missing required field 'id'"),
        (json.dumps({"id": "x"}).encode(), "missing required field 'text'"),
        (b'{"id": "x", "text": "caf\xff"}', "invalid UTF-8"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'"just a string"', "not a JSON object"),
        (json.dumps({"id": "   ", "text": "blank id"}).encode(), "empty id"),
        # 100,000 levels deep: a bad record, not the parser's RecursionError.
        (
            b'{"id": "x", "text": "t", "metadata": '
            + b'{"a":' * 10**5
            + b"1"
            + b"}" * 10**5
            + b"}",
            "nested",
        ),
    ],
)
def test_bad_jsonl_record_names_file_line_and_reason(
    tmp_path: Path, bad_line: bytes, expected: str
) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl", [GOOD, {"id": "ok2", "text": "y"}, bad_line, GOOD | {"id": "ok3"}]
    )
    bad = skipped(path)
    assert len(bad) == 1
    assert bad[0].path == str(path)
    assert bad[0].line == 3
    assert expected in bad[0].reason
    # The records around the bad one are still read.
    assert [d.id for d in docs(path)] == ["ok", "ok2", "ok3"]


def test_a_deeply_nested_first_record_is_a_bad_record(tmp_path: Path) -> None:
    """The first record is peeked at to tell a BEIR corpus from plain JSONL: nested
    100,000 deep, it is named like any bad record, not a traceback, and the next one
    tells the layout."""
    nested = b'{"a":' * 10**5 + b"1" + b"}" * 10**5
    deep = b'{"_id": "d", "text": "t", "metadata": ' + nested + b"}"
    path = write_jsonl(tmp_path / "c.jsonl", [deep, {"_id": "ok", "text": "fine"}])
    (bad,) = skipped(path)
    assert bad.line == 1 and "nested deeper" in bad.reason
    with pytest.raises(BadRecordError, match="nested deeper"):
        list(documents(open_source(path), "fail"))


def test_beir_missing_id_names_the_beir_field(tmp_path: Path) -> None:
    folder = tmp_path / "beir"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [{"_id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    bad = skipped(folder)
    assert [(b.line, b.reason) for b in bad] == [(2, "missing required field '_id'")]


def test_beir_wrong_id_type_names_the_beir_field(tmp_path: Path) -> None:
    folder = tmp_path / "beir"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [{"_id": "a", "text": "x"}, {"_id": None, "text": "y"}])
    bad = skipped(folder)
    assert len(bad) == 1
    assert bad[0].line == 2
    assert "$._id" in bad[0].reason


def test_duplicate_id_names_the_first_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "text": "first"},
            {"id": "b", "text": "other"},
            {"id": "a", "text": "second"},
            {"id": 5, "text": "int"},
            {"id": "5", "text": "same id as a string"},
        ],
    )
    bad = skipped(path)
    assert [b.line for b in bad] == [3, 5]
    assert "duplicate id 'a'" in bad[0].reason
    assert "line 1" in bad[0].reason
    assert "duplicate id '5'" in bad[1].reason
    assert "line 4" in bad[1].reason
    # The first occurrence wins.
    got = docs(path)
    assert [(d.id, d.text) for d in got] == [("a", "first"), ("b", "other"), ("5", "int")]


def test_fail_raises_bad_record_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, {"id": "x"}, b"{broken"])
    gen = documents(open_source(path), "fail")
    first = next(gen)
    assert isinstance(first, Document) and first.id == "ok"
    with pytest.raises(BadRecordError) as info:
        next(gen)
    err = info.value
    assert isinstance(err, EmbedFleetError)
    assert err.path == str(path)
    assert err.line == 2
    assert "missing required field 'text'" in err.reason
    assert f"{path}:2:" in str(err)
    assert "--on-bad-record skip" in err.fix


def test_skip_yields_skipped_records_and_continues(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            GOOD,
            b"{broken",
            {"id": "x"},
            b"\xff\xfe",
            {"id": "ok", "text": "dup"},
            {"id": "z", "text": "t"},
        ],
    )
    progress = ReadProgress()
    records = list(documents(open_source(path), "skip", progress))
    kinds = [type(r).__name__ for r in records]
    assert kinds == [
        "Document",
        "SkippedRecord",
        "SkippedRecord",
        "SkippedRecord",
        "SkippedRecord",
        "Document",
    ]
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 6]
    assert progress.documents == 2


# --- progress --------------------------------------------------------------------------


def test_progress_counts_bytes_and_documents(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": str(i), "text": "word " * (i * 10)} for i in range(50)] + [b"{bad"],
    )
    source = open_source(path)
    size = path.stat().st_size
    assert source.bytes_total == size
    progress = ReadProgress()
    seen_bytes: list[int] = []
    for _ in read_records(source, progress):
        seen_bytes.append(progress.bytes_read)
    # Bytes grow as records stream, not all at once at the start.
    assert seen_bytes[0] < size
    assert seen_bytes == sorted(seen_bytes)
    assert progress.bytes_read == size
    assert progress.documents == 50


def test_progress_counts_text_dir_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "a.txt").write_text("é" * 100)
    (folder / "b.md").write_bytes(b"x" * 37)
    source = open_source(folder)
    progress = ReadProgress()
    list(read_records(source, progress))
    assert progress.bytes_read == 237
    assert progress.bytes_read == source.bytes_total
    assert progress.documents == 2


# --- read ranges (the fleet reads a collection in pieces) ------------------------------


def _ranges_read(source_path: Path, range_bytes: int) -> list[Document | SkippedRecord]:
    """Every range read on its own, lines moved to file lines as the fleet does."""
    from shared.inputs.sources import cut_ranges, read_range

    source = open_source(source_path)
    out: list[Document | SkippedRecord] = []
    offset = 0
    for part in cut_ranges(source, range_bytes):
        progress = ReadProgress()
        for record in read_range(source.kind, part, progress):
            if isinstance(record, SkippedRecord):
                out.append(record.shifted(offset))
            else:
                out.append(Document(**{**msgspec_fields(record), "line": record.line + offset}))
        offset += progress.lines
    return out


def msgspec_fields(record: Document) -> dict[str, Any]:
    return {f: getattr(record, f) for f in record.__struct_fields__}


@pytest.mark.parametrize("range_bytes", [1, 7, 64, 1000, 10**9])
def test_ranges_cover_a_jsonl_file_exactly_once_at_line_starts(
    tmp_path: Path, range_bytes: int
) -> None:
    """Ranges start at line starts, cover every byte once, and read together give the
    records (and bad records, at their file lines) one reader gives, except duplicates
    across ranges, which the fleet's dedupe phase finds."""
    from shared.inputs.sources import cut_ranges

    lines: list[Any] = []
    for i in range(120):
        lines.append({"id": f"d{i}", "text": "word " * (i % 17)})
        if i % 13 == 0:
            lines.append(b"")  # blank lines count as lines
        if i % 29 == 0:
            lines.append(b"not json")
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    data = path.read_bytes()
    ranges = cut_ranges(open_source(path), range_bytes)
    assert ranges[0].start == 0 and ranges[-1].end == len(data)
    for a, b in itertools.pairwise(ranges):
        assert a.end == b.start and data[b.start - 1 : b.start] == b"\n"
    assert sum(r.bytes for r in ranges) == len(data)
    whole = list(read_records(open_source(path)))
    assert _ranges_read(path, range_bytes) == whole


def test_a_duplicate_within_a_range_names_file_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": "a", "text": "x"}] * 1 + [{"id": f"f{i}", "text": "y"} for i in range(50)]
        + [{"id": "b", "text": "x"}, {"id": "b", "text": "again"}],
    )  # fmt: skip
    found = [r for r in _ranges_read(path, 200) if isinstance(r, SkippedRecord)]
    assert [(r.line, r.reason, r.first_seen) for r in found] == [
        (53, "duplicate id 'b' (first seen at line 52)", 52)
    ]


def test_text_folder_ranges_group_whole_files(tmp_path: Path) -> None:
    from shared.inputs.sources import cut_ranges, read_range

    for i in range(7):
        (tmp_path / f"doc{i}.txt").write_text("text " * (i + 1) * 10)
    source = open_source(tmp_path)
    ranges = cut_ranges(source, 150)
    assert len(ranges) > 1
    assert sorted(f for r in ranges for f in r.files) == sorted(f"doc{i}.txt" for i in range(7))
    ids = [d.id for r in ranges for d in read_range(source.kind, r) if isinstance(d, Document)]
    assert ids == [d.id for d in docs(tmp_path)]


# --- compressed collections, unknown formats, empty sources ------------------------------


def compress(path: Path, kind: str) -> Path:
    """``path`` gzip- or zstd-compressed beside it (``.gz`` / ``.zst`` appended)."""
    data = path.read_bytes()
    if kind == ".gz":
        import gzip

        packed = gzip.compress(data)
    else:
        import zstandard

        packed = zstandard.ZstdCompressor().compress(data)
    out = path.with_name(path.name + kind)
    out.write_bytes(packed)
    return out


@pytest.mark.parametrize("kind", [".gz", ".zst"])
def test_a_compressed_jsonl_reads_as_the_plain_one(tmp_path: Path, kind: str) -> None:
    plain = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": "a", "text": "x"}, b"{broken", {"id": "b", "text": "y", "title": "t"}],
    )
    packed = compress(plain, kind)
    plain.unlink()
    source = open_source(packed)
    assert (source.kind, source.name) == ("jsonl", "c")
    assert [(d.id, d.title, d.line) for d in docs(packed)] == [("a", "", 1), ("b", "t", 3)]
    (bad,) = skipped(packed)
    assert (bad.path, bad.line) == (str(packed), 2) and "malformed JSON" in bad.reason
    # One read range (a compressed file cannot be entered in the middle), read whole,
    # its progress in bytes of the file on disk.
    (whole,) = cut_ranges(source, range_bytes=8)
    progress = ReadProgress()
    assert len(list(read_range(source.kind, whole, progress))) == 3
    assert progress.bytes_read == packed.stat().st_size == source.bytes_total


@pytest.mark.parametrize("kind", [".gz", ".zst"])
def test_a_compressed_file_cut_short_is_named_not_read_as_ending_there(
    tmp_path: Path, kind: str
) -> None:
    """An interrupted download: the records read up to the cut, then an error naming the
    file and the line reached, never a quiet end (zstandard's stream reader ends quietly
    at a cut frame)."""
    rows = [{"id": str(i), "text": f"document number {i} " * 8} for i in range(20_000)]
    packed = compress(write_jsonl(tmp_path / "c.jsonl", rows), kind)
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    read: list[str] = []
    with pytest.raises(UnreadableFileError) as info:
        read += [r.id for r in read_records(open_source(packed)) if isinstance(r, Document)]
    assert str(packed) in str(info.value) and "cannot be read on" in str(info.value)
    assert f":{info.value.line}:" in str(info.value) and info.value.line > 1


def test_a_zst_file_of_several_frames_reads_whole(tmp_path: Path) -> None:
    """``zstd`` of concatenated files, and parallel compressors, write one frame each."""
    import zstandard

    first = b"".join(b'{"id": "a%d", "text": "x"}\n' % i for i in range(5000))
    second = b'{"id": "b", "text": "y"}\n'
    path = tmp_path / "frames.jsonl.zst"
    packer = zstandard.ZstdCompressor()
    path.write_bytes(packer.compress(first) + packer.compress(second))
    assert len(docs(path)) == 5001 and docs(path)[-1].id == "b"


@pytest.mark.parametrize("kind", [".gz", ".zst"])
def test_a_beir_folder_with_a_compressed_corpus(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "nfcorpus"
    folder.mkdir()
    corpus = write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "x"}])
    compress(corpus, kind)
    corpus.unlink()
    source = open_source(folder)
    assert (source.kind, source.name) == ("beir", "nfcorpus")
    assert [(d.id, d.title) for d in docs(folder)] == [("d1", "T")]


@pytest.mark.parametrize("name", ["corpus.xlsx", "corpus.json", "corpus.json.bz2", "README"])
def test_a_file_of_another_format_names_the_accepted_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("id,text\na,x\n")
    with pytest.raises(EmbedFleetError) as info:
        open_source(path)
    assert "is not a format embed-collections reads" in str(info.value)
    for accepted in (".jsonl", ".gz", "CSV/TSV", "Parquet", ".txt"):
        assert accepted in info.value.fix


def test_empty_sources_are_recognised_without_reading_a_full_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\t\n")
    full = write_jsonl(tmp_path / "full.jsonl", [{"id": "a", "text": "x"}])
    assert is_empty(open_source(empty)) and is_empty(open_source(blank))
    assert is_empty(open_source(compress(blank, ".gz")))
    assert not is_empty(open_source(full))
    assert not is_empty(open_source(compress(full, ".zst")))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("  \n")
    assert is_empty(open_source(texts))
    (texts / "b.md").write_text("words")
    assert not is_empty(open_source(texts))


def test_queries_are_json_lines_whatever_the_name_and_found_compressed(tmp_path: Path) -> None:
    """A queries file is read as JSON lines by any name (HF's to_json writes .json); a
    BEIR folder's queries.jsonl.gz is found beside its corpus.jsonl.gz."""
    import gzip

    from producer.queries import find_query_files, read_queries

    named = write_jsonl(tmp_path / "queries.json", [{"_id": "q1", "text": "what"}])
    assert [(q.id, q.text) for q in read_queries(named)] == [("q1", "what")]
    folder = tmp_path / "beir"
    folder.mkdir()
    corpus = write_jsonl(folder / "corpus.jsonl", [{"_id": "d", "text": "x"}])
    (folder / "corpus.jsonl.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    corpus.unlink()
    (folder / "queries.jsonl.gz").write_bytes(gzip.compress(named.read_bytes()))
    queries, qrels = find_query_files(open_source(folder), None, None, no_queries=False)
    assert queries == folder / "queries.jsonl.gz" and qrels is None
    assert [q.id for q in read_queries(queries)] == ["q1"]
