"""Where a collection lives: a path on disk, or objects in S3-compatible storage.

``locate("s3://bucket/beir/nfcorpus")`` gives an :class:`S3Path`: the few pathlib
methods the readers of :mod:`shared.inputs.sources` and :mod:`shared.inputs.tabular` use (``name``,
``suffix``, ``/``, ``is_file``, ``rglob``, ``stat().st_size``, ``open("rb")``), over
ranged GETs. So a collection in S3 is read as one on disk is, with the same guarantees
and the same read ranges: the producer cuts a JSONL object at line starts with a few
small reads (never downloading it), a Parquet object is read by row groups and only the
columns asked for, and each prepare worker fetches only its own range. Nothing is copied
to local disk first.

The endpoint and credentials are the output's (``S3_ENDPOINT_URL``, the AWS variables
and files), through :class:`shared.records.storage.S3Store`'s client and its transient window:
an outage mid-read is waited out, not taken for a bad file. Every read of an object
after the first names its ETag (``If-Match``), so an object replaced while a job reads
it is an error, not a silent mix of two versions.
"""

from __future__ import annotations

import fnmatch
import functools
import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeAlias

from shared.records.errors import EmbedFleetError
from shared.records.storage import NO_OBJECT_CODES, S3Store, s3_error_code

# One ranged GET per this many bytes of a sequential read, the next fetched while this
# one is parsed (bench/s3_source.py: 8 MiB blocks read at 0.53x bare boto3's speed,
# 16 MiB at 0.75x, on SeaweedFS; S3's own guidance is 8-16 MiB per request).
READ_BYTES = 16 << 20


@dataclass(frozen=True)
class ObjectStat:
    """What :meth:`S3Path.stat` knows: the size, as ``Path.stat()`` names it."""

    st_size: int


class S3Path:
    """An object (or a folder: a key prefix) in an S3-compatible bucket.

    Equal paths are the same bucket and key; ``str()`` is the ``s3://`` URL, which is
    what a job spec and a read range keep, so a worker anywhere reads the same object.
    """

    def __init__(
        self, store: S3Store, key: str, size: int | None = None, etag: str | None = None
    ) -> None:
        self.store = store
        self.key = key.strip("/")
        self._size = size
        self._etag = etag

    @classmethod
    def from_url(cls, url: str, transient_window_s: float = 0.0) -> S3Path:
        bucket, _, key = url[len("s3://") :].partition("/")
        if not bucket:
            raise EmbedFleetError(f"no bucket in {url!r}", "Use s3://BUCKET/PREFIX")
        return cls(_bucket(bucket, transient_window_s), key)

    # --- names, as pathlib has them -----------------------------------------------

    @property
    def bucket(self) -> str:
        return self.store.bucket

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.key or self.bucket)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._pure.suffixes

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.bucket, *PurePosixPath(self.key).parts)

    def __truediv__(self, name: str) -> S3Path:
        return S3Path(self.store, f"{self.key}/{name}" if self.key else name)

    def expanduser(self) -> S3Path:
        return self

    def resolve(self) -> S3Path:
        return self

    def relative_to(self, root: S3Path) -> PurePosixPath:
        return (
            PurePosixPath(self.key).relative_to(root.key) if root.key else PurePosixPath(self.key)
        )

    # --- what is there ------------------------------------------------------------

    def _head(self) -> dict[str, Any] | None:
        """The object's HEAD, or None when there is no object at this key."""
        from botocore.exceptions import ClientError

        if not self.key:
            return None
        try:
            head: dict[str, Any] = self.store._patient(
                "head", lambda: self.store.client.head_object(Bucket=self.bucket, Key=self.key)
            )
        except ClientError as exc:
            if s3_error_code(exc) in NO_OBJECT_CODES:
                return None
            raise
        return head

    def is_file(self) -> bool:
        if self._size is not None:
            return True
        head = self._head()
        if head is None:
            return False
        self._size, self._etag = int(head["ContentLength"]), str(head.get("ETag") or "") or None
        return True

    def is_dir(self) -> bool:
        prefix = f"{self.key}/" if self.key else ""
        page = self.store._patient(
            "list",
            lambda: self.store.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1),
        )
        return bool(page.get("KeyCount") or page.get("Contents"))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> ObjectStat:
        if not self.is_file():
            raise FileNotFoundError(f"no object {self}")
        assert self._size is not None
        return ObjectStat(self._size)

    def rglob(self, pattern: str) -> Iterator[S3Path]:
        """Every object under this prefix whose name matches ``pattern``, in key order
        (one listing; sizes and ETags kept, so no object is asked for them again)."""
        prefix = f"{self.key}/" if self.key else ""

        def listing() -> list[dict[str, Any]]:
            pages = self.store.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            return [item for page in pages for item in page.get("Contents", [])]

        for item in sorted(self.store._patient("list", listing), key=lambda i: str(i["Key"])):
            key = str(item["Key"])
            if key.endswith("/"):  # a "folder" marker some tools write
                continue
            found = S3Path(self.store, key, int(item["Size"]), str(item.get("ETag") or "") or None)
            if fnmatch.fnmatchcase(found.name, pattern):
                yield found

    # --- reading ------------------------------------------------------------------

    def get_range(self, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end), retried over the window;
        of the version first seen (``If-Match``)."""
        if length <= 0:
            return b""
        self.stat()  # the size and ETag
        extra = {"IfMatch": self._etag} if self._etag else {}

        def get() -> bytes:
            response = self.store.client.get_object(
                Bucket=self.bucket,
                Key=self.key,
                Range=f"bytes={start}-{start + length - 1}",
                **extra,
            )
            return bytes(response["Body"].read())

        try:
            return self.store._patient("get", get)
        except Exception as exc:
            if s3_error_code(exc) in ("PreconditionFailed", "412"):
                raise ObjectReplacedError(f"{self} was replaced while it was being read") from None
            raise

    def read_bytes(self) -> bytes:
        return self.get_range(0, self.stat().st_size)

    def open(self, mode: str = "rb", buffering: int = -1) -> io.BufferedReader:
        """The object as a seekable binary file, read ``buffering`` bytes (a GET) at a
        time (-1: ``READ_BYTES``)."""
        if mode != "rb":
            raise ValueError(f"S3 objects are read only as 'rb', not {mode!r}")
        size = READ_BYTES if buffering < 0 else max(buffering, 1)
        self.stat()
        return io.BufferedReader(RangeReader(self, read_ahead=True), buffer_size=size)

    def open_raw(self) -> RangeReader:
        """The object unbuffered: each read one GET of just what was asked (for Parquet,
        whose reader asks for exactly the column chunks it needs)."""
        self.stat()
        return RangeReader(self)


class ObjectReplacedError(OSError):
    """An object changed between two reads of one job. An ``OSError``, as a file that
    cannot be read on is: the readers name the object and the line reached, and the
    job stops on bad input (no retry would read the version it began with)."""


class RangeReader(io.RawIOBase):
    """A seekable read-only file over an object's ranged GETs.

    Read front to back in blocks of ``READ_BYTES`` (``S3Path.open``'s buffered reader
    filling its buffer), the next block is fetched in the background while the caller
    works on this one, so a sequential read costs about the parsing or the transfer, whichever
    is slower, not both. Any other read (a seek, a look at a few lines, Parquet's
    column chunks) is one GET of what was asked, nothing ahead."""

    def __init__(self, obj: S3Path, read_ahead: bool = False) -> None:
        super().__init__()
        self.obj = obj
        self.read_ahead = read_ahead
        self.size = obj.stat().st_size
        self.position = 0
        self._ahead: tuple[int, Future[bytes]] | None = None  # (start, its block)
        self._fetcher: ThreadPoolExecutor | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"seek before the start of {self.obj}")
        self.position = base + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        length = min(len(view), self.size - self.position)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == self.position and length == READ_BYTES:
            data = ahead[1].result()
        else:
            data = self.obj.get_range(self.position, length)
        view[: len(data)] = data
        self.position += len(data)
        if self.read_ahead and len(view) == READ_BYTES and self.position < self.size:
            self._fetch_ahead()
        return len(data)

    def _fetch_ahead(self) -> None:
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-ahead")
        start = self.position
        length = min(READ_BYTES, self.size - start)
        self._ahead = (start, self._fetcher.submit(self.obj.get_range, start, length))

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
            self._fetcher = None
        self._ahead = None
        super().close()


SourcePath: TypeAlias = Path | S3Path
"""A file or folder of a collection, on disk or in S3."""


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def locate(location: str | Path, transient_window_s: float = 0.0) -> SourcePath:
    """``s3://bucket/key`` as an :class:`S3Path` (an outage retried over the window),
    anything else as a local path (``~`` expanded)."""
    if is_s3(location):
        return S3Path.from_url(str(location), transient_window_s)
    if "://" in str(location):
        raise EmbedFleetError(
            f"unsupported source URL {str(location)!r}",
            "Pass a local path or s3://BUCKET/PREFIX (the endpoint from S3_ENDPOINT_URL)",
        )
    return Path(location).expanduser()


def canonical(location: str | Path) -> str:
    """How a job spec names a source: an ``s3://`` URL as given (no trailing ``/``), a
    local path absolute."""
    if is_s3(location):
        return str(location).rstrip("/")
    return str(Path(location).expanduser().resolve())


def relative_name(path: SourcePath, root: SourcePath) -> str:
    """``path`` under ``root``, ``/``-separated (a text folder's document ids)."""
    if isinstance(path, S3Path) and isinstance(root, S3Path):
        return path.relative_to(root).as_posix()
    assert isinstance(path, Path) and isinstance(root, Path)
    return path.relative_to(root).as_posix()


def check_reachable(path: SourcePath) -> None:
    """For an S3 source: raise a clear error unless its bucket is there and readable
    (the endpoint answers, the credentials are accepted)."""
    if isinstance(path, S3Path):
        try:
            path.store.check()
        except EmbedFleetError as exc:
            raise EmbedFleetError(f"source {path}: {exc.cause}", exc.fix) from None


@functools.lru_cache(maxsize=16)
def _bucket(bucket: str, transient_window_s: float) -> S3Store:
    """One client per bucket and window in a process (a client costs ~50 ms to make and
    is thread-safe)."""
    return S3Store(f"s3://{bucket}", transient_window_s)
