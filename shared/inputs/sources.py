"""Collections on disk, read one record at a time.

The layouts: a BEIR folder (``corpus.jsonl`` with ``_id``, ``title``, ``text``), a
JSONL file (``id``, ``text``, optional ``title`` and ``metadata``), a folder of
``.txt`` / ``.md`` files, and the tabular ones of :mod:`shared.inputs.tabular` (a CSV/TSV file
with a header, Parquet files or folders). A JSONL file (and a BEIR corpus) may be gzip- or
zstd-compressed (``.jsonl.gz``, ``.jsonl.zst``), as most dumps ship. Nothing holds the
whole collection: readers yield records as they go, and a bad record comes out as a
:class:`SkippedRecord` naming file, line and reason, so the caller decides between
failing and skipping.

The fleet reads a collection in ranges (:func:`cut_ranges`: byte ranges of a JSONL file
cut at line boundaries, groups of a folder's files), each by one prepare unit
(:func:`read_range`), so no one process reads it all. A compressed file cannot be
entered in the middle, so it is one range, read by one unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.inputs import tabular
from shared.inputs.compressed import (
    COMPRESSED_SUFFIXES,
    PEEK_BYTES,
    compression,
    open_lines,
    read_errors,
)
from shared.inputs.limits import LongLine, bounded_lines, too_large
from shared.inputs.locations import (
    READ_BYTES,
    S3Path,
    SourcePath,
    check_reachable,
    locate,
    relative_name,
)
from shared.records.errors import BadRecordError, EmbedFleetError, UnreadableFileError
from shared.records.schemas import (
    Document,
    FieldMap,
    InputLimits,
    ReadRange,
    SkippedRecord,
    SourceKind,
)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BEIR_CORPUS = tuple(f"corpus.jsonl{c}" for c in ("", *COMPRESSED_SUFFIXES))
ACCEPTED = (
    "Pass a BEIR folder (corpus.jsonl, .jsonl.gz or .jsonl.zst), a JSONL file (.jsonl or "
    ".ndjson, optionally .gz or .zst compressed), a CSV/TSV file with a header, a Parquet "
    "file or a folder of them, or a folder of .txt/.md files"
)
# Kinds whose records carry their line (or row) in their own file, so a range's records
# need no shifting by the lines of the ranges before it.
OWN_LINES: tuple[SourceKind, ...] = ("text-dir", "csv", "parquet")
# How many skipped records a job lists one by one (all are counted).
MAX_LISTED_SKIPS = 1000
# The most files of a text folder one range holds (however small they are).
RANGE_FILES = 1000


class _JsonlRecord(msgspec.Struct):
    id: str | int
    text: str
    title: str | None = None
    metadata: dict[str, Any] | None = None


class _BeirRecord(msgspec.Struct, rename={"id": "_id"}):
    id: str | int
    text: str
    title: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Source:
    """A collection on disk.

    Attributes:
        path: What the user passed.
        kind: Its layout.
        name: The collection's name in output keys (the folder or file stem).
        files: The files to read, in reading order.
        fields: Which columns hold what (tabular kinds).
    """

    path: SourcePath
    kind: SourceKind
    name: str
    files: list[SourcePath] = field(default_factory=list)
    fields: FieldMap = field(default_factory=FieldMap)

    @property
    def bytes_total(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def open_source(
    path: str | Path, fields: FieldMap | None = None, transient_window_s: float = 0.0
) -> Source:
    """Recognise a collection's layout (and check a tabular one's columns): a path on
    disk or ``s3://bucket/prefix`` (see :mod:`shared.inputs.locations`; an outage is retried
    over ``transient_window_s``).

    Raises:
        EmbedFleetError: if the path is missing, holds no collection, is a file of a
            format not read here (naming the accepted ones), or lacks a mapped column;
            for S3, if the bucket is missing or cannot be reached or read.
    """
    p = locate(path, transient_window_s)
    check_reachable(p)
    if not p.exists():
        raise EmbedFleetError(f"source {str(path)!r} does not exist", ACCEPTED)
    source = _recognise(p, path)
    mapped = fields or FieldMap()
    if source.kind in ("csv", "parquet"):
        for file in source.files:
            columns = (
                tabular.csv_columns(file) if source.kind == "csv" else tabular.parquet_columns(file)
            )
            tabular.check_columns(file, mapped, columns)
        return Source(source.path, source.kind, source.name, source.files, mapped)
    if mapped != FieldMap():
        raise EmbedFleetError(
            f"--id-field, --text-field, --title-field and --metadata-fields name columns of "
            f"a CSV/TSV or Parquet source; {str(path)!r} is a {source.kind} collection",
            "Drop them: its fields are fixed (id, text, title, metadata)",
        )
    return source


def _recognise(p: SourcePath, given: str | Path) -> Source:
    if p.is_file():
        if is_jsonl(p):
            return Source(p, "beir" if _uses_beir_ids(p) else "jsonl", collection_name(p), [p])
        plain = p.name.lower().removesuffix(compression(p))
        if plain.endswith(tabular.CSV_SUFFIXES):
            return Source(p, "csv", collection_name(p), [p])
        if p.suffix.lower() == tabular.PARQUET_SUFFIX:
            return Source(p, "parquet", p.stem, [p])
        raise EmbedFleetError(
            f"source {str(given)!r} is not a format embed-collections reads "
            f"(its name ends in {''.join(p.suffixes[-2:]) or 'no suffix'!r})",
            ACCEPTED,
        )
    for corpus in BEIR_CORPUS:
        if (p / corpus).is_file():
            return Source(p, "beir", p.resolve().name, [p / corpus])
    parquet = _in_order(f for f in p.rglob(f"*{tabular.PARQUET_SUFFIX}") if f.is_file())
    if parquet:  # before texts: a dataset folder keeps a README.md beside its data
        return Source(p, "parquet", p.resolve().name, parquet)
    files = _in_order(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise EmbedFleetError(
            f"{str(given)!r} holds no corpus.jsonl (or .gz, .zst), no .parquet and no "
            ".txt/.md files",
            ACCEPTED,
        )
    return Source(p, "text-dir", p.resolve().name, files)


def _in_order(paths: Iterator[SourcePath]) -> list[SourcePath]:
    """A folder's files in reading order: by path segments, on disk and in S3 alike."""
    return sorted(paths, key=lambda f: f.parts)


def open_jsonl(path: SourcePath) -> Source:
    """A file read as JSON lines whatever its name (a queries file: ``queries.json``,
    ``.txt``), decompressed by its suffix."""
    return Source(path, "beir" if _uses_beir_ids(path) else "jsonl", collection_name(path), [path])


def is_jsonl(path: SourcePath) -> bool:
    """A JSON-lines file, plain or compressed, by its name."""
    name = path.name.lower().removesuffix(compression(path))
    return name.endswith(JSONL_SUFFIXES)


def collection_name(path: SourcePath) -> str:
    """``corpus.jsonl.gz`` -> ``corpus``."""
    name = path.name.removesuffix(path.suffix) if compression(path) else path.name
    return Path(name).stem


def is_empty(source: Source) -> bool:
    """Whether no file of the collection holds anything but whitespace (reads only up
    to the first byte that is not), or, tabular, no row."""
    if source.kind == "parquet":
        return all(tabular.parquet_rows(path) == 0 for path in source.files)
    if source.kind == "csv":
        progress = ReadProgress()
        return next(tabular.read_csv(source.files[0], source.fields, progress), None) is None
    for path in source.files:
        if source.kind == "text-dir":
            if path.stat().st_size and path.read_bytes().strip():
                return False
            continue
        try:
            with open_lines(path, PEEK_BYTES) as (lines, _):
                while block := lines.read(1 << 16):
                    if block.strip():
                        return False
        except read_errors(path) as exc:
            raise UnreadableFileError(str(path), 1, f"cannot be read ({exc})") from None
    return True


def _uses_beir_ids(path: SourcePath) -> bool:
    """A JSONL file whose first record has ``_id`` (and no ``id``) is a BEIR corpus."""
    try:
        return _first_record_has_beir_id(path)
    except read_errors(path) as exc:
        raise UnreadableFileError(str(path), 1, f"cannot be read ({exc})") from None


# Lines looked at for the first record that decodes, when telling BEIR from JSONL.
_PEEK_RECORDS = 16


def _first_record_has_beir_id(path: SourcePath) -> bool:
    """Whether the first record that decodes (of the first few) has BEIR's ``_id``: a
    malformed or too deeply nested line is the reader's to name as a bad record, and
    says nothing of the file's layout."""
    with open_lines(path, PEEK_BYTES) as (handle, _):
        looked = 0
        for raw in bounded_lines(handle, InputLimits().max_record_bytes):
            if isinstance(raw, LongLine):
                looked += 1
                continue
            if not raw.strip():
                continue
            looked += 1
            try:
                first = msgspec.json.decode(raw)
            except (msgspec.DecodeError, RecursionError):
                if looked < _PEEK_RECORDS:
                    continue
                return False
            return isinstance(first, dict) and "_id" in first and "id" not in first
    return False


@dataclass
class ReadProgress:
    """Shared with the caller, so it can report bytes read while records stream."""

    documents: int = 0
    bytes_read: int = 0
    lines: int = 0  # lines of a JSONL file read, blank ones included


def read_records(
    source: Source, progress: ReadProgress | None = None, limits: InputLimits | None = None
) -> Iterator[Document | SkippedRecord]:
    """Yield every record of the source: a Document, or a SkippedRecord saying why not.

    Duplicate ids are caught here (the first occurrence wins), so every reader and both
    passes of the producer agree on which records are bad. A record over
    ``limits.max_record_bytes`` is a bad record, read past without being held.
    """
    progress = progress or ReadProgress()
    most = (limits or InputLimits()).max_record_bytes
    reader: Iterator[Document | SkippedRecord]
    if source.kind == "text-dir":
        reader = _read_text_files(source.path, source.files, progress, most)
    elif source.kind == "csv":
        reader = tabular.read_csv(source.files[0], source.fields, progress, most)
    elif source.kind == "parquet":
        reader = (
            record
            for path in source.files
            for record in tabular.read_parquet(path, 0, None, source.fields, progress, most)
        )
    else:
        reader = _read_jsonl(source.files[0], source.kind, 0, None, progress, most)
    return _first_of_each_id(reader, progress)


def read_range(
    kind: SourceKind,
    part: ReadRange,
    progress: ReadProgress | None = None,
    fields: FieldMap | None = None,
    transient_window_s: float = 0.0,
    limits: InputLimits | None = None,
) -> Iterator[Document | SkippedRecord]:
    """Yield every record of one read range, as :func:`read_records` does for a whole
    source, with lines counted from the range's first line (a range does not know how
    many lines come before it). Duplicate ids are caught within the range; across
    ranges the fleet's dedupe phase finds them. An S3 range's outage is retried over
    ``transient_window_s``."""
    progress = progress or ReadProgress()
    most = (limits or InputLimits()).max_record_bytes
    root = locate(part.path, transient_window_s)
    reader: Iterator[Document | SkippedRecord]
    if kind == "text-dir":
        reader = _read_text_files(root, [root / name for name in part.files], progress, most)
    elif kind == "csv":
        reader = tabular.read_csv(root, fields or FieldMap(), progress, most)
    elif kind == "parquet":
        mapped = fields or FieldMap()
        reader = tabular.read_parquet(root, part.start, part.end, mapped, progress, most)
    else:
        reader = _read_jsonl(root, kind, part.start, part.end, progress, most)
    return _first_of_each_id(reader, progress)


def _first_of_each_id(
    reader: Iterator[Document | SkippedRecord], progress: ReadProgress
) -> Iterator[Document | SkippedRecord]:
    seen: dict[str, int] = {}
    for record in reader:
        if isinstance(record, Document):
            first = seen.get(record.id)
            if first is not None:
                yield SkippedRecord(
                    path=record.path,
                    line=record.line,
                    reason=f"duplicate id {record.id!r} (first seen at line {first})",
                    first_seen=first,
                )
                continue
            seen[record.id] = record.line
            progress.documents += 1
        yield record


def listed_together(
    validated: list[SkippedRecord], cut: list[SkippedRecord]
) -> list[SkippedRecord]:
    """The skipped records of validation and those the chunker found (documents of too
    many chunks) in one list, by file and line as one reader would have met them;
    validation's own list as it was where the chunker found none."""
    if not cut:
        return validated
    merged = sorted([*validated, *cut], key=lambda record: (record.path, record.line))
    return merged[:MAX_LISTED_SKIPS]


def cut_ranges(source: Source, range_bytes: int) -> list[ReadRange]:
    """Cut a collection into read ranges of about ``range_bytes``: a JSONL file at the
    first line start at or after each multiple of it (a seek and one line read per
    range, never a read of the whole file), a text folder into groups of whole files."""
    if source.kind == "text-dir":
        return _file_groups(source, range_bytes)
    if source.kind == "parquet":
        return tabular.parquet_ranges(source.files, range_bytes)
    path = source.files[0]
    size = path.stat().st_size
    if compression(path) or source.kind == "csv":
        return [ReadRange(index=0, path=str(path.resolve()), start=0, end=size, bytes=size)]
    starts = [0]
    with path.open("rb", buffering=PEEK_BYTES) as handle:
        at = range_bytes
        while at < size:
            handle.seek(at - 1)
            handle.readline()  # to the end of the line holding byte at-1
            start = handle.tell()
            if start >= size:
                break
            starts.append(start)
            at = start + range_bytes
    ends = [*starts[1:], size]
    resolved = str(path.resolve())
    return [
        ReadRange(index=i, path=resolved, start=lo, end=hi, bytes=hi - lo)
        for i, (lo, hi) in enumerate(zip(starts, ends, strict=True))
    ]


def _file_groups(source: Source, range_bytes: int) -> list[ReadRange]:
    root = source.path.resolve()
    ranges: list[ReadRange] = []
    files: list[str] = []
    size = 0

    def close() -> None:
        nonlocal files, size
        ranges.append(ReadRange(index=len(ranges), path=str(root), files=files, bytes=size))
        files, size = [], 0

    for path in source.files:
        files.append(relative_name(path, source.path))
        size += path.stat().st_size
        if size >= range_bytes or len(files) >= RANGE_FILES:
            close()
    if files:
        close()
    return ranges


def lines_before(path: str | Path, offset: int, transient_window_s: float = 0.0) -> int:
    """How many lines of a file start before byte ``offset`` (counted only when a bad
    record must be named by its line in the whole file)."""
    count = 0
    with locate(path, transient_window_s).open("rb") as handle:
        while offset > 0:
            block = handle.read(min(offset, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


def documents(
    source: Source,
    on_bad_record: Literal["fail", "skip"],
    progress: ReadProgress | None = None,
    limits: InputLimits | None = None,
) -> Iterator[Document | SkippedRecord]:
    """Like :func:`read_records`, but raise on the first bad record under ``fail``."""
    for record in read_records(source, progress, limits):
        if isinstance(record, SkippedRecord) and on_bad_record == "fail":
            raise BadRecordError(record.path, record.line, record.reason)
        yield record


def _read_jsonl(
    path: SourcePath,
    source_kind: SourceKind,
    start: int,
    end: int | None,
    progress: ReadProgress,
    most: int,
) -> Iterator[Document | SkippedRecord]:
    """The records of ``path`` from byte ``start`` (a line start) up to ``end``."""
    kind: type[_JsonlRecord] | type[_BeirRecord] = (
        _BeirRecord if source_kind == "beir" else _JsonlRecord
    )
    try:
        yield from _jsonl_records(path, kind, start, end, progress, most)
    except read_errors(path) as exc:  # the file, not a record: nothing after it is readable
        where = progress.lines + 1
        raise UnreadableFileError(str(path), where, f"cannot be read on ({exc})") from None


def _jsonl_records(
    path: SourcePath,
    kind: type[_JsonlRecord] | type[_BeirRecord],
    start: int,
    end: int | None,
    progress: ReadProgress,
    most: int,
) -> Iterator[Document | SkippedRecord]:
    decoder = msgspec.json.Decoder(kind)
    shown = str(path)
    compressed = bool(compression(path))
    buffering = -1
    if end is not None and not compressed and isinstance(path, S3Path):
        # A range of an S3 object in one GET of about its size (and nothing ahead of
        # it) when it fits a read block: a worker fetches its own range, not more.
        buffering = min(READ_BYTES, end - start + PEEK_BYTES)
    with open_lines(path, buffering) as (handle, on_disk):
        if compressed:
            end = None  # a compressed file is one range; its offsets are not the lines'
        else:
            handle.seek(start)
        at, read_to = start, on_disk.tell()
        for number, raw in enumerate(bounded_lines(handle, most), start=1):
            if end is not None and at >= end:
                break
            size = raw.size if isinstance(raw, LongLine) else len(raw)
            at += size
            if compressed:  # bytes of the file on disk, as the source's size counts them
                progress.bytes_read += on_disk.tell() - read_to
                read_to = on_disk.tell()
            else:
                progress.bytes_read += size
            progress.lines += 1
            if isinstance(raw, LongLine):
                yield SkippedRecord(path=shown, line=number, reason=too_large(raw.size, most))
                continue
            if not raw.strip():
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield SkippedRecord(
                    path=shown,
                    line=number,
                    reason=f"invalid UTF-8 at byte {exc.start} of the line",
                )
                continue
            try:
                rec = decoder.decode(raw)
            except msgspec.ValidationError as exc:
                yield SkippedRecord(path=shown, line=number, reason=_explain(str(exc), kind))
                continue
            except msgspec.DecodeError as exc:
                yield SkippedRecord(path=shown, line=number, reason=f"malformed JSON ({exc})")
                continue
            except RecursionError:  # msgspec's own bound on nesting: a bad record
                reason = "JSON nested deeper than the parser allows (arrays or objects)"
                yield SkippedRecord(path=shown, line=number, reason=reason)
                continue
            doc_id = str(rec.id)
            if not doc_id.strip():
                yield SkippedRecord(path=shown, line=number, reason="empty id")
                continue
            yield Document(
                id=doc_id,
                text=rec.text,
                title=rec.title or "",
                metadata=rec.metadata or {},
                path=shown,
                line=number,
            )


def _explain(message: str, kind: type[msgspec.Struct]) -> str:
    """Turn msgspec's validation message into the field names the user wrote."""
    id_field = "_id" if kind is _BeirRecord else "id"
    if message.startswith("Object missing required field"):
        missing = message.split("`")[1]
        return f"missing required field {missing!r}"
    if message.startswith("Expected `object`"):
        return "not a JSON object"
    return message.replace("`$.id`", f"`$.{id_field}`")


def _read_text_files(
    root: SourcePath, files: list[SourcePath], progress: ReadProgress, most: int
) -> Iterator[Document | SkippedRecord]:
    """Each file one document, its id the path under ``root``; one over ``most`` bytes
    is a bad record, never opened."""
    for path in files:
        size = path.stat().st_size
        if size > most:
            progress.bytes_read += size
            yield SkippedRecord(path=str(path), line=1, reason=too_large(size, most))
            continue
        data = path.read_bytes()
        progress.bytes_read += len(data)
        rel = relative_name(path, root)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            yield SkippedRecord(
                path=str(path), line=line, reason=f"invalid UTF-8 at byte {exc.start}"
            )
            continue
        yield Document(id=rel, text=text, path=str(path), line=1)
