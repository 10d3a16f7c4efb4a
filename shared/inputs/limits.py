"""How a reader keeps one record within ``--max-record-bytes``: lines read up to the limit
and no further, an oversized one read past in small blocks and named as a bad record.

A collection is untrusted input: one JSONL line of 400 MB (which a 500 KB ``.gz`` can
hold), a CSV row whose quote never closes, a text file of gigabytes. Reading such a
record whole would take a worker's memory before anything could look at it, so every
reader (:mod:`shared.inputs.sources`, :mod:`shared.inputs.tabular`) reads through these
and holds at most the limit (:class:`~shared.records.schemas.InputLimits`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# How much of an oversized line is read (and dropped) at a time.
SKIP_BYTES = 1 << 20
OPTION = "--max-record-bytes"


@dataclass(frozen=True)
class LongLine:
    """A line longer than the reader's limit, read past without being kept.

    Attributes:
        size: Its bytes (characters, for a text stream), its line break included.
    """

    size: int


def bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | LongLine]:
    """A byte stream's lines, each at most ``limit`` bytes before its line break; a
    longer one comes out as a :class:`LongLine`, read past in 1 MiB blocks, so that no
    line costs more than ``limit`` bytes of memory."""
    while raw := handle.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        size = len(raw)
        del raw
        while block := handle.readline(SKIP_BYTES):
            size += len(block)
            if block.endswith(b"\n"):
                break
        yield LongLine(size)


class BoundedRows:
    """A CSV/TSV text stream's lines for the ``csv`` reader, each row at most ``limit``
    characters: a row over it is read past, never held, and the reader gets a line
    that ends the row there, so the row comes out (mangled) and its caller names it a
    bad record (:attr:`over`).

    A CSV row may run over many lines inside a quoted field, so the limit is a row's,
    counted over its lines; where one runs over it inside quotes, it is read on until
    its quotes balance (``""`` counts twice, as the reader reads it). A TSV field is
    never quoted: a row is a line.

    The caller calls :meth:`row_ended` after each row the reader gives, and reads a row's
    last line from :attr:`line` (the file's, skipped lines counted).
    """

    def __init__(self, text: io.TextIOBase, limit: int, quoted: bool) -> None:
        self._text = text
        self._limit = limit
        self._quoted = quoted
        self._used = 0  # characters of the row so far
        self._quotes = 0  # quote characters of the row so far
        self.line = 0
        self.over = 0
        """The characters of the row just read when it was over the limit, else 0."""

    def __iter__(self) -> BoundedRows:
        return self

    def row_ended(self) -> None:
        self._used = self._quotes = self.over = 0

    def __next__(self) -> str:
        line = self._text.readline(self._limit + 1)
        if not line:
            raise StopIteration
        ended = line.endswith(("\n", "\r"))
        if self._used + len(line) <= self._limit and (ended or len(line) <= self._limit):
            self.line += 1  # a whole line, or the last one without a break
            self._used += len(line)
            self._quotes += line.count('"') if self._quoted else 0
            return line
        inside = self._quotes % 2 == 1  # the reader is in a quoted field of this row
        size, quotes = self._used + len(line), self._quotes + line.count('"')
        del line
        self.line += int(ended)
        while True:  # to the end of the row: a line end with the quotes balanced
            if ended and not (self._quoted and quotes % 2):
                break
            piece = self._text.readline(SKIP_BYTES)
            if not piece:
                self.line += int(not ended)  # the last line, without a break
                break
            size += len(piece)
            quotes += piece.count('"')
            ended = piece.endswith(("\n", "\r"))
            self.line += int(ended)
        self.over = size
        return '"\n' if inside else "\n"


def too_large(size: int, limit: int, unit: str = "bytes") -> str:
    """Why a record over the limit is a bad record, and what to do about it."""
    what = f"record of {size:,} {unit}" if size else "record"
    return (
        f"{what}, over the limit of {limit:,} {unit} ({OPTION} raises it; "
        "or is the file missing line breaks, or a quote left open?)"
    )
