"""Tabular collections: CSV/TSV files with a header, and Parquet files or folders.

How HF datasets, Ray and data lakes store text. A :class:`~shared.records.schemas.FieldMap`
says which columns hold the id, the text, the title and the metadata; the columns are
checked when the source is opened (:func:`check_columns`), so a wrong name fails before
anything is enqueued, naming the columns there are. Records come out as they do from a
JSONL file: a :class:`Document`, or a :class:`SkippedRecord` naming the file and its
line (CSV: the line the row ends on) or row (Parquet: the row in the file, from 1).

A CSV file is read as one range: a quoted field may hold a newline, so a cut at a line
start could fall inside a record. A Parquet file is cut between row groups.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.inputs.compressed import PEEK_BYTES, open_lines, read_errors
from shared.inputs.limits import BoundedRows, too_large
from shared.inputs.locations import SourcePath
from shared.records.errors import EmbedFleetError, UnreadableFileError
from shared.records.schemas import (
    DEFAULT_MAX_RECORD_BYTES,
    Document,
    FieldMap,
    ReadRange,
    SkippedRecord,
)

CSV_SUFFIXES = (".csv", ".tsv")
# The reader's own bound on a field is not the limit: BoundedRows bounds every row.
csv.field_size_limit(sys.maxsize)
PARQUET_SUFFIX = ".parquet"
# Rows decoded from Parquet at a time.
BATCH_ROWS = 1024


class Progress(Protocol):
    """What a reader updates of the caller's progress (``shared.inputs.sources.ReadProgress``)."""

    bytes_read: int
    lines: int


def id_column(fields: FieldMap, columns: list[str]) -> str:
    """The id column: the one named, else ``id``, else ``_id`` (BEIR's)."""
    if fields.id:
        return fields.id
    return "_id" if "_id" in columns and "id" not in columns else "id"


def check_columns(path: SourcePath, fields: FieldMap, columns: list[str]) -> None:
    """Raise, naming the columns there are, if a mapped column is missing."""
    wanted = [("--id-field", id_column(fields, columns)), ("--text-field", fields.text)]
    wanted += [("--title-field", fields.title)] if fields.title else []
    wanted += [("--metadata-fields", name) for name in fields.metadata]
    for option, name in wanted:
        if name not in columns:
            raise EmbedFleetError(
                f"{path} has no column {name!r} (its columns: {', '.join(columns) or 'none'})",
                f"Name the column with {option} NAME",
            )


def csv_columns(path: SourcePath) -> list[str]:
    """The header of a CSV/TSV file."""
    broken: tuple[type[Exception], ...] = (*read_errors(path), csv.Error)
    try:
        with open_lines(path, PEEK_BYTES) as (lines, _):
            text = io.TextIOWrapper(lines, encoding="utf-8-sig", errors="replace", newline="")
            lines_read = BoundedRows(text, DEFAULT_MAX_RECORD_BYTES, _quoted(path))
            header: list[str] = next(_rows(lines_read, path), [])
    except broken as exc:
        raise UnreadableFileError(str(path), 1, f"cannot be read ({exc})") from None
    return [name.strip() for name in header]


def _quoted(path: SourcePath) -> bool:
    """Whether a field of the file may be quoted (CSV), or never is (TSV)."""
    return ".tsv" not in path.name.lower()


def _rows(text: Iterable[str], path: SourcePath) -> Any:
    """A CSV reader, or for TSV a tab splitter: a TSV field is never quoted (a ``"``
    that opens a passage is text, not the start of a field that runs on)."""
    if not _quoted(path):
        return csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(text)


def read_csv(
    path: SourcePath, fields: FieldMap, progress: Progress, most: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[Document | SkippedRecord]:
    """Every row of a CSV/TSV file as a record; line numbers are the file's. A row over
    ``most`` characters (a line of it, or a field) is a bad record, read past."""
    line = 1
    broken: tuple[type[Exception], ...] = (*read_errors(path), csv.Error)
    try:
        for record in _csv_records(path, fields, progress, most):
            line = record.line
            yield record
    except broken as exc:  # the file, not a row: nothing after it can be read
        raise UnreadableFileError(str(path), line + 1, f"cannot be read on ({exc})") from None


def _csv_records(
    path: SourcePath, fields: FieldMap, progress: Progress, most: int
) -> Iterator[Document | SkippedRecord]:
    shown = str(path)
    with open_lines(path) as (lines, on_disk):
        text = io.TextIOWrapper(lines, encoding="utf-8-sig", errors="surrogateescape", newline="")
        bounded = BoundedRows(text, most, _quoted(path))
        rows = _rows(bounded, path)
        header = [name.strip() for name in next(rows, [])]
        bounded.row_ended()
        at = {name: i for i, name in enumerate(header)}
        id_name = id_column(fields, header)
        title = fields.title or ("title" if "title" in at else None)
        mapped = [name for name in (id_name, fields.text, title, *fields.metadata) if name]
        for row in rows:
            line, over = bounded.line, bounded.over
            bounded.row_ended()
            progress.lines = line
            progress.bytes_read = on_disk.tell()
            if over:  # read past, not kept: what the reader made of it is not the row
                reason = too_large(over, most, "characters")
                yield SkippedRecord(path=shown, line=line, reason=reason)
                continue
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield SkippedRecord(
                    path=shown,
                    line=line,
                    reason=f"{len(row)} cells, the header has {len(header)} "
                    "(a delimiter inside an unquoted field?)",
                )
                continue
            values = {name: row[i] for name, i in at.items()}
            bad = next((name for name in mapped if _bad_utf8(values.get(name) or "")), None)
            if bad is not None:
                yield SkippedRecord(path=shown, line=line, reason=f"invalid UTF-8 in {bad!r}")
                continue
            yield _record(values, id_name, fields, title, shown, line)


def _bad_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(value: Any) -> str | None:
    """A cell as text: bytes decoded, a whole float as an integer (pandas stores an int
    column with gaps as float64), NaN and None as nothing."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def _record(
    values: dict[str, Any], id_name: str, fields: FieldMap, title: str | None, path: str, line: int
) -> Document | SkippedRecord:
    doc_id, text = _text(values.get(id_name)), _text(values.get(fields.text))
    if doc_id is None or not doc_id.strip():
        return SkippedRecord(path=path, line=line, reason=f"empty id (column {id_name!r})")
    if text is None:
        return SkippedRecord(path=path, line=line, reason=f"no value in column {fields.text!r}")
    metadata = {name: _plain(values.get(name)) for name in fields.metadata}
    return Document(
        id=doc_id,
        text=text,
        title=(_text(values.get(title)) or "") if title else "",
        metadata=metadata,
        path=path,
        line=line,
    )


def _plain(value: Any) -> Any:
    """A metadata value as JSON holds it (dates and the like as text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def parquet_file(path: SourcePath) -> Any:
    """A Parquet file opened, or an error naming it when it is not one (cut short,
    corrupt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # An S3 object unbuffered: the reader asks for exactly the column chunks it needs.
        return pq.ParquetFile(path if isinstance(path, Path) else path.open_raw())
    except (OSError, pa.ArrowException) as exc:
        raise UnreadableFileError(str(path), 1, f"is not a readable Parquet file ({exc})") from None


def parquet_columns(path: SourcePath) -> list[str]:
    return list(parquet_file(path).schema_arrow.names)


def parquet_ranges(files: list[SourcePath], range_bytes: int) -> list[ReadRange]:
    """Each file cut into runs of row groups of about ``range_bytes`` (compressed)."""
    ranges: list[ReadRange] = []
    for path in files:
        meta = parquet_file(path).metadata
        sizes = [_group_bytes(meta, g) for g in range(meta.num_row_groups)]
        start, size = 0, 0
        for group, group_bytes in enumerate(sizes):
            size += group_bytes
            if size >= range_bytes or group == len(sizes) - 1:
                ranges.append(
                    ReadRange(
                        index=len(ranges),
                        path=str(path.resolve()),
                        start=start,
                        end=group + 1,
                        bytes=size,
                    )
                )
                start, size = group + 1, 0
    return ranges


def _group_bytes(meta: Any, group: int) -> int:
    row_group = meta.row_group(group)
    return sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))


def read_parquet(
    path: SourcePath,
    first: int,
    end: int | None,
    fields: FieldMap,
    progress: Progress,
    most: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[Document | SkippedRecord]:
    """The rows of row groups ``first`` up to ``end`` (None: to the last); each record's
    line is its row in the file, counted from 1. A row whose text and title hold more
    than ``most`` bytes is a bad record: its cells are measured in Arrow and dropped
    before the row becomes Python objects (Arrow itself holds a page of the column at a
    time, as the file's writer cut it)."""
    import pyarrow as pa

    handle = parquet_file(path)
    meta = handle.metadata
    columns = list(handle.schema_arrow.names)
    id_name = id_column(fields, columns)
    title = fields.title or ("title" if "title" in columns else None)
    wanted = [id_name, fields.text, *([title] if title else []), *fields.metadata]
    wanted = [name for name in dict.fromkeys(wanted) if name in columns]
    sized = [name for name in (fields.text, title) if name and name in columns]
    row = sum(meta.row_group(g).num_rows for g in range(first))
    shown = str(path)
    try:
        for group in range(first, meta.num_row_groups if end is None else end):
            # In batches: a row group of a large dataset can hold hundreds of MB of text.
            batches = handle.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=wanted)
            for batch in batches:
                sizes = _cell_bytes(batch, sized)
                over = sizes > most
                if over.any():
                    batch = _blanked(batch, sized, over)
                for k, values in enumerate(batch.to_pylist()):
                    row += 1
                    if over[k]:
                        reason = too_large(int(sizes[k]), most)
                        yield SkippedRecord(path=shown, line=row, reason=reason)
                        continue
                    yield _record(values, id_name, fields, title, shown, row)
            progress.bytes_read += _group_bytes(meta, group)
            progress.lines = row
    except (OSError, pa.ArrowException) as exc:  # the file, not a row: nothing after it
        raise UnreadableFileError(shown, row + 1, f"cannot be read on ({exc})") from None


def _cell_bytes(batch: Any, names: list[str]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Each row's bytes in the named string (or binary) columns, from Arrow's offsets."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = np.zeros(batch.num_rows, dtype=np.int64)
    for name in names:
        column = batch.column(name)
        kind = column.type
        if (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
        ):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            total += lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    return total


def _blanked(batch: Any, names: list[str], rows: np.ndarray[Any, Any]) -> Any:
    """The batch with the named columns' cells of ``rows`` set to null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pa.array(rows)
    arrays = [
        pc.if_else(mask, pa.nulls(batch.num_rows, batch.column(i).type), batch.column(i))
        if batch.schema.field(i).name in names
        else batch.column(i)
        for i in range(batch.num_columns)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def parquet_rows(path: SourcePath) -> int:
    return int(parquet_file(path).metadata.num_rows)
