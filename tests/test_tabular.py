"""Tabular collections: CSV/TSV with a header and Parquet files or folders, with their
columns mapped, read as JSONL ones are (bad records by file and line or row)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.inputs.sources import (
    ReadProgress,
    cut_ranges,
    is_empty,
    open_source,
    read_range,
    read_records,
)
from shared.records.errors import EmbedFleetError, UnreadableFileError
from shared.records.schemas import Document, FieldMap, SkippedRecord


def records(source) -> list[Document | SkippedRecord]:
    return list(read_records(source))


def test_a_csv_with_a_header_and_a_quoted_newline(tmp_path: Path) -> None:
    path = tmp_path / "papers.csv"
    path.write_text(
        'id,title,text,year\n1,First,"a text\nover two lines",1962\n2,,second,\n,x,no id,\n'
        '3,Third,"he said ""hi""",1970\n'
    )
    source = open_source(path, FieldMap(metadata=["year"]))
    assert (source.kind, source.name) == ("csv", "papers")
    got = records(source)
    docs = [r for r in got if isinstance(r, Document)]
    assert [(d.id, d.title, d.text, d.metadata, d.line) for d in docs] == [
        ("1", "First", "a text\nover two lines", {"year": "1962"}, 3),
        ("2", "", "second", {"year": ""}, 4),
        ("3", "Third", 'he said "hi"', {"year": "1970"}, 6),
    ]
    (bad,) = [r for r in got if isinstance(r, SkippedRecord)]
    assert (bad.path, bad.line) == (str(path), 5) and "empty id" in bad.reason


def test_a_tsv_with_mapped_columns(tmp_path: Path) -> None:
    path = tmp_path / "collection.tsv"
    path.write_text("pid\tpassage\np1\tfirst passage\np2\tsecond\n")
    source = open_source(path, FieldMap(id="pid", text="passage"))
    assert [(r.id, r.text) for r in records(source)] == [("p1", "first passage"), ("p2", "second")]


def test_a_missing_column_names_the_columns_and_the_option(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("doc,body\na,x\n")
    with pytest.raises(EmbedFleetError) as info:
        open_source(path)
    assert "has no column 'id' (its columns: doc, body)" in str(info.value)
    assert "--id-field" in info.value.fix
    with pytest.raises(EmbedFleetError, match="no column 'text'"):
        open_source(path, FieldMap(id="doc"))
    with pytest.raises(EmbedFleetError, match="name columns of a CSV/TSV or Parquet source"):
        jsonl = tmp_path / "c.jsonl"
        jsonl.write_text('{"id": "a", "text": "x"}\n')
        open_source(jsonl, FieldMap(text="body"))


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


ROWS = [{"_id": f"d{i}", "text": f"text {i}", "title": f"T{i}", "lang": "en"} for i in range(10)]


def test_a_parquet_folder_cut_by_row_groups(tmp_path: Path) -> None:
    """A dataset folder (README.md beside the data, as HF keeps it): Parquet wins over
    the .md; ranges are runs of row groups; every record's line is its row in its file."""
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("# a dataset card")
    rows = [*ROWS[:3], {"_id": "", "text": "no id", "title": None, "lang": "en"}, *ROWS[3:]]
    write_parquet(folder / "data" / "train-0.parquet", rows, row_group_size=2)
    more = [
        {"_id": "e0", "text": None, "title": "x", "lang": "de"},
        {"_id": "e1", "text": "last", "title": "y", "lang": "de"},
    ]
    write_parquet(folder / "data" / "train-1.parquet", more, row_group_size=1)
    source = open_source(folder, FieldMap(metadata=["lang"]))
    assert (source.kind, source.name, len(source.files)) == ("parquet", "dataset", 2)
    whole = records(source)
    docs = [r for r in whole if isinstance(r, Document)]
    assert [d.id for d in docs] == [*(f"d{i}" for i in range(10)), "e1"]
    assert docs[0].title == "T0" and docs[0].metadata == {"lang": "en"} and docs[0].line == 1
    assert (docs[3].id, docs[3].line) == ("d3", 5)  # after the skipped row 4
    skips = [(Path(r.path).name, r.line, r.reason) for r in whole if isinstance(r, SkippedRecord)]
    assert skips == [
        ("train-0.parquet", 4, "empty id (column '_id')"),
        ("train-1.parquet", 1, "no value in column 'text'"),
    ]
    ranges = cut_ranges(source, range_bytes=1)  # one row group per range
    assert len(ranges) == 6 + 2
    assert [(Path(r.path).name, r.start, r.end) for r in ranges[5:]] == [
        ("train-0.parquet", 5, 6),
        ("train-1.parquet", 0, 1),
        ("train-1.parquet", 1, 2),
    ]
    by_range = [
        record
        for part in ranges
        for record in read_range("parquet", part, ReadProgress(), source.fields)
    ]
    assert [(r.path, r.line) for r in by_range] == [(r.path, r.line) for r in whole]
    assert len(cut_ranges(source, range_bytes=1 << 30)) == 2  # a range per file at most


def test_empty_tabular_sources(tmp_path: Path) -> None:
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,text\n")
    assert is_empty(open_source(header_only))
    no_rows = write_parquet(tmp_path / "n.parquet", [], 1) if False else tmp_path / "n.parquet"
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), no_rows
    )
    assert is_empty(open_source(no_rows))
    full = tmp_path / "f.csv"
    full.write_text("id,text\na,x\n")
    assert not is_empty(open_source(full))


def test_a_tsv_field_is_never_quoted(tmp_path: Path) -> None:
    """MS MARCO-style passages may open with a quote: it is text, and the rows after it
    are rows."""
    path = tmp_path / "collection.tsv"
    path.write_text('id\ttext\np1\t"Quoted" start\np2\t"unbalanced start\np3\tthird\n')
    got = [(r.id, r.text) for r in records(open_source(path))]
    assert got == [("p1", '"Quoted" start'), ("p2", '"unbalanced start'), ("p3", "third")]


def test_a_row_with_the_wrong_number_of_cells_is_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("id,text,year\na,hello, world,1999\nb,fine,2001\nc,short\n")
    got = records(open_source(path, FieldMap(metadata=["year"])))
    assert [(r.line, r.reason) for r in got if isinstance(r, SkippedRecord)] == [
        (2, "4 cells, the header has 3 (a delimiter inside an unquoted field?)"),
        (4, "2 cells, the header has 3 (a delimiter inside an unquoted field?)"),
    ]
    assert [(r.id, r.metadata) for r in got if isinstance(r, Document)] == [("b", {"year": "2001"})]


def test_a_byte_order_mark_and_bad_bytes_where_they_matter(tmp_path: Path) -> None:
    """Excel writes a BOM before a quoted header; invalid UTF-8 is a bad row only in a
    column the job reads, and the reason names it."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b'\xef\xbb\xbf"id","text","junk"\na,alpha,\xff\nb,b\xffeta,x\n')
    got = records(open_source(path))
    assert [r.id for r in got if isinstance(r, Document)] == ["a"]
    assert [r.reason for r in got if isinstance(r, SkippedRecord)] == ["invalid UTF-8 in 'text'"]


def test_parquet_cells_that_are_not_strings(tmp_path: Path) -> None:
    """pandas stores an int id column with gaps as float64; text may be binary."""
    table = pa.table(
        {
            "id": pa.array([1.0, 2.0, float("nan"), 4.5]),
            "text": pa.array([b"bytes text", b"two", b"three", b"four"], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    got = records(open_source(tmp_path / "t.parquet"))
    assert [(r.id, r.text) for r in got if isinstance(r, Document)] == [
        ("1", "bytes text"),
        ("2", "two"),
        ("4.5", "four"),
    ]
    assert [(r.line, r.reason) for r in got if isinstance(r, SkippedRecord)] == [
        (3, "empty id (column 'id')")
    ]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("c.jsonl.gz", b'{"id": "a", "text": "x"}\n'),  # not gzip at all
        ("c.parquet", b"PAR1 not really"),
        ("c.csv.gz", b"\x1f\x8b\x08\x00garbage"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_one_clear_error(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableFileError) as info:
        source = open_source(path)
        records(source)
    message = str(info.value)
    assert str(path) in message
    assert "cannot be read" in message or "not a readable Parquet file" in message
    assert "complete copy" in info.value.fix


def test_a_gzip_file_cut_short_fails_at_the_line_it_ends_on(tmp_path: Path) -> None:
    import gzip

    lines = b"".join(b'{"id": "%d", "text": "%s"}\n' % (i, b"x" * 200) for i in range(2000))
    packed = gzip.compress(lines)
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    source = open_source(path)
    with pytest.raises(UnreadableFileError) as info:
        records(source)
    assert 1 < info.value.line < 2000
    assert "cannot be read on" in info.value.reason
