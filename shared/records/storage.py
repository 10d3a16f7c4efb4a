"""One small interface over the places artifacts live: S3-compatible stores and folders.

``open_store(url)`` takes ``s3://bucket/prefix`` (endpoint and credentials from the
standard AWS variables, plus ``S3_ENDPOINT_URL``) or a plain path. Keys are relative,
``/``-separated and sanitised, so a collection or job name can never climb out of
the store's root.

An S3 outage is normal (a restart, a failover, a throttled bucket): with a transient
window (``EMBED_FLEET_TRANSIENT_WINDOW`` in workers and the producer) every call that
cannot connect, or that the server answers with a 5xx or ``SlowDown``, is retried with
backoff up to 5 s until the window is spent, so a unit's own retries (its failure
budget) are not used up by an outage. ``check()`` is never patient: a producer must
hear at once that its output is unreachable.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from shared.records.errors import EmbedFleetError
from shared.records.logs import get_logger

log = get_logger("storage")
T = TypeVar("T")
# Backoff between tries of a call during an outage: doubling from the first to the cap.
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0
# S3 error codes that say "later", not "no".
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
)

# What S3-compatible servers answer for an object, and for a bucket, that is not there.
NO_OBJECT_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_BUCKET_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})

_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """Turn a user-supplied name (a collection, a folder) into one safe key segment."""
    cleaned = _SAFE_SEGMENT.sub("-", name).strip(".-")
    return cleaned[:128] or "collection"


def join_key(*parts: str) -> str:
    """Join key segments, refusing anything that could escape the store root."""
    segments: list[str] = []
    for part in parts:
        for segment in part.split("/"):
            if segment in ("", "."):
                continue
            if segment == ".." or "\\" in segment or "\x00" in segment:
                raise ValueError(f"unsafe object key segment {segment!r}")
            segments.append(segment)
    if not segments:
        raise ValueError("empty object key")
    return "/".join(segments)


class ObjectStore(Protocol):
    """What the fleet needs of a store. Keys are relative to the store's root."""

    url: str

    def check(self) -> None:
        """Raise :class:`EmbedFleetError` unless the store is reachable and writable."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove an object; no error if it is not there."""

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete_folder(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many there were."""

    def folders(self, prefix: str = "") -> Sequence[str]:
        """The names of the folders directly under ``prefix`` (one listing call)."""

    def locate(self, key: str) -> str:
        """The full URL or path of a key, for people to read."""


class LocalStore:
    """A folder. Writes go to a temporary file first and are renamed into place, so a
    reader never sees half an object."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / join_key(key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise EmbedFleetError(
                f"cannot write to output folder {self.root}: {exc.strerror or exc}",
                "Pass a writable --output folder or an s3:// URL",
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._writer(self._path(key)) as handle:
            handle.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with self._writer(self._path(key)) as handle, path.open("rb") as source:
            shutil.copyfileobj(source, handle, 1 << 20)

    @contextlib.contextmanager
    def _writer(self, target: Path) -> Iterator[IO[bytes]]:
        """Write to a hidden temporary file beside the target, then rename it into place.

        The file is created with mode 0666 so the kernel applies the process umask, as
        for any ordinary file (mkstemp would make it 0600)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def delete_folder(self, prefix: str) -> int:
        base = self._path(prefix)
        count = sum(1 for path in base.rglob("*") if path.is_file()) if base.is_dir() else 0
        shutil.rmtree(base, ignore_errors=True)
        return count

    def folders(self, prefix: str = "") -> Sequence[str]:
        base = self._path(prefix) if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def locate(self, key: str) -> str:
        return str(self._path(key))


class S3Store:
    """An S3-compatible bucket (AWS, SeaweedFS, MinIO, ...) under an optional prefix.

    The endpoint comes from ``S3_ENDPOINT_URL`` (or boto3's own ``AWS_ENDPOINT_URL``);
    credentials from the standard AWS variables or files. With a custom endpoint,
    path-style addressing is used, which every S3-compatible server understands.
    """

    def __init__(self, url: str, transient_window_s: float = 0.0) -> None:
        """Args:
        url: ``s3://bucket/prefix``.
        transient_window_s: Seconds a call is retried while S3 cannot be reached or
            answers 5xx/``SlowDown`` (0: botocore's own 3 attempts only).
        """
        import boto3
        from botocore.config import Config

        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise EmbedFleetError(f"no bucket in {url!r}", "Use s3://BUCKET/PREFIX")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint else {},
        )
        # A session of its own: boto3's default session caches the first credentials it
        # resolved and is not thread-safe.
        session = boto3.session.Session()
        self.client: Any = session.client("s3", endpoint_url=self.endpoint, config=config)
        self.transient_window_s = transient_window_s

    def _patient(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried over the transient window while the error is transient."""
        deadline: float | None = None
        delay = FIRST_BACKOFF_S
        while True:
            try:
                return call()
            except Exception as exc:
                if self.transient_window_s <= 0 or not transient_s3_error(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.transient_window_s
                    fields = {
                        "endpoint": self.endpoint or "aws",
                        "call": what,
                        "error": type(exc).__name__,
                        "window_s": self.transient_window_s,
                    }
                    log.warning("S3 unavailable; retrying", extra={"fields": fields})
                if now >= deadline:
                    raise
                time.sleep(min(delay, deadline - now))  # the last try at the deadline
                delay = min(delay * 2, MAX_BACKOFF_S)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key) if self.prefix else join_key(key)

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = self.endpoint or "the default AWS endpoint"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = s3_error_code(exc)
            if code in _NO_BUCKET_CODES:
                raise EmbedFleetError(
                    f"bucket {self.bucket!r} does not exist at {where}",
                    f"Create it first (e.g. `aws s3 mb s3://{self.bucket}`)",
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise EmbedFleetError(
                    f"access to bucket {self.bucket!r} at {where} was denied ({code})",
                    "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
                ) from None
            raise EmbedFleetError(
                f"S3 error {code} on bucket {self.bucket!r} at {where}", "Check the endpoint"
            ) from None
        except NoCredentialsError:
            raise EmbedFleetError(
                f"no S3 credentials were found for bucket {self.bucket!r} at {where}",
                "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)",
            ) from None
        except BotoCoreError as exc:
            raise EmbedFleetError(
                f"cannot reach S3 endpoint {where}: {type(exc).__name__}",
                "Check S3_ENDPOINT_URL and that the server is running",
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._patient(
            "put", lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        )

    def put_file(self, key: str, path: Path) -> None:
        # upload_file switches to multipart for large files, so memory stays flat.
        full = self._key(key)
        self._patient("upload", lambda: self.client.upload_file(str(path), self.bucket, full))

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)

        def get() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())

        return self._patient("get", get)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)
        try:
            self._patient("head", lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        except ClientError as exc:
            if s3_error_code(exc) in NO_OBJECT_CODES:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._patient("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def _folder(self, prefix: str) -> str:
        """The full key of the folder ``prefix`` (under the store's prefix), ending in
        ``/``, or "" for the bucket's root."""
        full = self._key(prefix) if prefix else self.prefix
        return f"{full}/" if full else ""

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._folder(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def listing() -> list[str]:
            # Whole, so that a retry after an outage starts the listing again.
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=full)
            return [str(item["Key"])[strip:] for page in pages for item in page.get("Contents", [])]

        yield from self._patient("list", listing)

    def delete_folder(self, prefix: str) -> int:
        keys = [self._key(key) for key in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a call
            self._delete_objects(keys[start : start + 1000])
        return len(keys)

    def _delete_objects(self, keys: Sequence[str]) -> None:
        batch = {"Objects": [{"Key": key} for key in keys]}
        self._patient(
            "delete", lambda: self.client.delete_objects(Bucket=self.bucket, Delete=batch)
        )

    def folders(self, prefix: str = "") -> Sequence[str]:
        full = self._folder(prefix)

        def listing() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
            found = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
            return sorted(str(p)[len(full) :].rstrip("/") for p in found)

        return self._patient("list", listing)

    def locate(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def transient_s3_error(exc: BaseException) -> bool:
    """Whether an S3 call's error says "try later": no connection, a timeout, a dropped
    connection, or the server's 5xx/``SlowDown`` (also inside boto3's
    ``S3UploadFailedError``, which wraps the client error of an upload)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return transient_s3_error(exc.__context__)
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or s3_error_code(exc) in _TRANSIENT_CODES
    return False


def s3_error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ...),
    or "" for any other error."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def open_store(url: str, transient_window_s: float = 0.0) -> ObjectStore:
    """Open ``s3://bucket/prefix`` or a local folder; an S3 store retries transient
    errors over ``transient_window_s`` (see the module doc)."""
    if url.startswith("s3://"):
        return S3Store(url, transient_window_s)
    if "://" in url:
        raise EmbedFleetError(
            f"unsupported output URL {url!r}", "Use s3://BUCKET/PREFIX or a local folder path"
        )
    return LocalStore(url)
