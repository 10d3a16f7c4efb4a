"""A collection file's bytes, decompressed on the fly by its name: ``.gz``, ``.zst`` or plain.

Its own module because every reader needs it (JSON lines in :mod:`shared.inputs.sources`,
CSV/TSV in :mod:`shared.inputs.tabular`), and neither reader should import the other.
"""

from __future__ import annotations

import contextlib
import gzip
import io
from collections.abc import Iterator
from typing import Any, BinaryIO

from shared.inputs.locations import SourcePath

COMPRESSED_SUFFIXES = (".gz", ".zst")
# The read buffer for a look at a few lines (the first record, a header, where a range
# starts): in S3 one ranged GET, so a cut of a large object reads little of it.
PEEK_BYTES = 1 << 16


def compression(path: SourcePath) -> str:
    """``.gz``, ``.zst``, or ``""`` for a plain file (by the name's last suffix)."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSED_SUFFIXES else ""


def read_errors(path: SourcePath) -> tuple[type[Exception], ...]:
    """What reading ``path`` raises when the file itself is bad (cut short, not the
    compression its name says), as opposed to one bad record."""
    errors: tuple[type[Exception], ...] = (OSError, EOFError)
    if compression(path) == ".zst":
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


@contextlib.contextmanager
def open_lines(path: SourcePath, buffering: int = -1) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """A JSONL file's lines as bytes, decompressed on the fly, and the underlying file
    (whose ``tell()`` is how far into the file on disk the reading is). ``buffering``:
    :data:`PEEK_BYTES` for a look at the start of the file only (in S3 a read of the
    buffer is one GET)."""
    with path.open("rb", buffering=buffering) as raw:
        kind = compression(path)
        if kind == ".gz":
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield io.BufferedReader(unzipped), raw
        elif kind == ".zst":
            yield io.BufferedReader(ZstdFrames(raw)), raw
        else:
            yield raw, raw


class ZstdFrames(io.RawIOBase):
    """A ``.zst`` file's frames, decompressed one after another.

    Not zstandard's ``stream_reader``: at a frame cut short (an interrupted download) it
    ends as if the file ended there, and the records after the cut would be lost without
    a word. This raises ``EOFError`` there, as gzip does, so the reader names the file
    and the line it reached."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        super().__init__()
        self.raw = raw
        self.new_frame = zstandard.ZstdDecompressor().decompressobj
        self.frame = self.new_frame()
        self.in_frame = False  # bytes of the current frame were read, and it has not ended
        self.out = b""
        self.at = 0  # how much of ``out`` was handed on

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.at >= len(self.out):
            # 64 KiB at a time: what one block decompresses to stays small.
            block = self.raw.read(1 << 16)
            if not block:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame (cut short?)")
                return 0
            self.out, self.at = self._decompress(block), 0
        view = memoryview(buffer).cast("B")
        taken = self.out[self.at : self.at + len(view)]
        view[: len(taken)] = taken
        self.at += len(taken)
        return len(taken)

    def _decompress(self, block: bytes) -> bytes:
        out: list[bytes] = []
        while block:
            if self.frame.eof:
                self.frame = self.new_frame()
            out.append(self.frame.decompress(block))
            self.in_frame = not self.frame.eof
            block = self.frame.unused_data if self.frame.eof else b""
        return b"".join(out)
