"""Collections on disk, read one record at a time.

Three layouts: a BEIR folder (``corpus.jsonl`` with ``_id``, ``title``, ``text``), a
JSONL file (``id``, ``text``, optional ``title`` and ``metadata``), or a folder of
``.txt`` / ``.md`` files. Nothing holds the whole collection: readers yield records
as they go, and a bad record comes out as a :class:`SkippedRecord` naming file, line
and reason, so the caller decides between failing and skipping.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.errors import BadRecordError, EmbedFleetError
from shared.schemas import Document, SkippedRecord

SourceKind = Literal["beir", "jsonl", "text-dir"]
TEXT_SUFFIXES = (".txt", ".md")


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
    """

    path: Path
    kind: SourceKind
    name: str
    files: list[Path] = field(default_factory=list)

    @property
    def bytes_total(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def open_source(path: str | Path) -> Source:
    """Recognise a collection's layout.

    Raises:
        EmbedFleetError: if the path is missing or holds no collection.
    """
    p = Path(path).expanduser()
    hint = "Pass a BEIR folder (with corpus.jsonl), a .jsonl file, or a folder of .txt/.md files"
    if not p.exists():
        raise EmbedFleetError(f"source {str(path)!r} does not exist", hint)
    if p.is_file():
        return Source(p, "beir" if _uses_beir_ids(p) else "jsonl", p.stem, [p])
    if (p / "corpus.jsonl").is_file():
        return Source(p, "beir", p.resolve().name, [p / "corpus.jsonl"])
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise EmbedFleetError(f"{str(path)!r} holds no corpus.jsonl and no .txt/.md files", hint)
    return Source(p, "text-dir", p.resolve().name, files)


def _uses_beir_ids(path: Path) -> bool:
    """A JSONL file whose first record has ``_id`` (and no ``id``) is a BEIR corpus."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    first = msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    return False
                return isinstance(first, dict) and "_id" in first and "id" not in first
    return False


@dataclass
class ReadProgress:
    """Shared with the caller, so it can report bytes read while records stream."""

    documents: int = 0
    bytes_read: int = 0


def read_records(
    source: Source, progress: ReadProgress | None = None
) -> Iterator[Document | SkippedRecord]:
    """Yield every record of the source: a Document, or a SkippedRecord saying why not.

    Duplicate ids are caught here (the first occurrence wins), so every reader and both
    passes of the producer agree on which records are bad.
    """
    progress = progress or ReadProgress()
    seen: dict[str, int] = {}
    reader = (
        _read_text_dir(source, progress)
        if source.kind == "text-dir"
        else _read_jsonl(source, progress)
    )
    for record in reader:
        if isinstance(record, Document):
            first = seen.get(record.id)
            if first is not None:
                yield SkippedRecord(
                    path=record.path,
                    line=record.line,
                    reason=f"duplicate id {record.id!r} (first seen at line {first})",
                )
                continue
            seen[record.id] = record.line
            progress.documents += 1
        yield record


def documents(
    source: Source, on_bad_record: Literal["fail", "skip"], progress: ReadProgress | None = None
) -> Iterator[Document | SkippedRecord]:
    """Like :func:`read_records`, but raise on the first bad record under ``fail``."""
    for record in read_records(source, progress):
        if isinstance(record, SkippedRecord) and on_bad_record == "fail":
            raise BadRecordError(record.path, record.line, record.reason)
        yield record


def _read_jsonl(source: Source, progress: ReadProgress) -> Iterator[Document | SkippedRecord]:
    kind: type[_JsonlRecord] | type[_BeirRecord] = (
        _BeirRecord if source.kind == "beir" else _JsonlRecord
    )
    decoder = msgspec.json.Decoder(kind)
    for path in source.files:
        shown = str(path)
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                progress.bytes_read += len(raw)
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


def _read_text_dir(source: Source, progress: ReadProgress) -> Iterator[Document | SkippedRecord]:
    for path in source.files:
        data = path.read_bytes()
        progress.bytes_read += len(data)
        rel = path.relative_to(source.path).as_posix()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            yield SkippedRecord(
                path=str(path), line=line, reason=f"invalid UTF-8 at byte {exc.start}"
            )
            continue
        yield Document(id=rel, text=text, path=str(path), line=1)
