"""Errors a user can act on, and the exit codes every command ends with.

Every error the CLI shows is an :class:`EmbedFleetError`: it carries the cause and the
fix, so the CLI prints one line and exits with an :class:`ExitCode` instead of a
traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How every command of the fleet ends (the docs' exit-code table is generated from
    these docstrings)."""

    OK = 0
    """The job is complete; or the command did what was asked."""
    INCOMPLETE = 1
    """The job ended ``partial`` (the manifest lists what is missing) or ``failed`` (the
    error line says why)."""
    BAD_INPUT = 2
    """Bad input or configuration, or the fleet cannot be reached (Redis refused the
    credentials, S3 unreachable): no job was started; one line on stderr says what to
    do."""
    RUNNING = 3
    """``status``, ``resume --detach``: the job is still running. A GPU worker: every GPU
    of its host is leased (it exits instead of sharing one)."""
    INTERRUPTED = 130
    """Interrupted: Ctrl-C, or SIGTERM (``kill``, ``timeout``), which every command takes
    as Ctrl-C."""


class EmbedFleetError(Exception):
    """A failure with a cause the user can fix.

    Args:
        cause: What went wrong, naming the thing (file, URL, model) involved.
        fix: What to do about it.
    """

    def __init__(self, cause: str, fix: str = "") -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}. {fix}".strip() if fix else cause)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Celery hands a task's exception on by pickling it (and, when that fails, a
        # base class that does pickle): rebuild from the arguments, not the message.
        return type(self), (self.cause, self.fix)


class BadInputError(EmbedFleetError):
    """The collection itself is wrong (a bad record, a file that cannot be read, no
    valid document): every try would fail alike, so the fleet does not retry it and
    fails the job on bad input (exit 2)."""


class BadRecordError(BadInputError):
    """A record of a collection that cannot be read; names the file and line."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(
            f"{path}:{line}: {reason}",
            "Fix the record, or pass --on-bad-record skip to skip bad records "
            "(they are counted and listed in the manifest)",
        )

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:  # type: ignore[override]
        return type(self), (self.path, self.line, self.reason)


class NoDocumentsError(BadInputError):
    """Every record of a collection was skipped (``--on-bad-record skip``), so the job
    would embed nothing; ``--allow-empty`` runs it anyway.

    Args:
        source: The collection.
        skipped: How many records were skipped.
        first: The first skipped record, as ``path:line: reason`` ("" if none listed).
    """

    def __init__(self, source: str, skipped: int, first: str = "") -> None:
        self.source = source
        self.skipped = skipped
        self.first = first
        super().__init__(
            f"{source} holds no valid documents: all {skipped} records were skipped"
            + (f" (the first, {first})" if first else ""),
            "Fix the records (see the reason), or pass --allow-empty to run anyway",
        )

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:  # type: ignore[override]
        return type(self), (self.source, self.skipped, self.first)


class UnreadableFileError(BadRecordError):
    """A collection file that cannot be read on from some line (or row): cut short, not
    the compression or format its name says, corrupt. A bad input like a bad record (no
    retry, exit 2), but no record can be skipped past it."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(path, line, reason)
        self.fix = (
            "Check the file: it may be cut short (an interrupted download) or not the "
            "format its name says; get a complete copy and run again"
        )
        Exception.__init__(self, f"{self.cause}. {self.fix}")
