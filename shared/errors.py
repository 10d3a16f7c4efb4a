"""Errors a user can act on.

Every error the CLI shows is an :class:`EmbedFleetError`: it carries the cause and the
fix, so the CLI prints one line and exits non-zero instead of a traceback.
"""

from __future__ import annotations


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


class BadRecordError(EmbedFleetError):
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
