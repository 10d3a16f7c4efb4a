"""Structured logs: one JSON object per line, quiet (WARNING) by default.

Fields passed with ``extra={"fields": {...}}`` become keys of the object, so log
pipelines can filter on job_id, batch_id or stage without parsing messages.
"""

from __future__ import annotations

import logging
import sys

import msgspec

LOGGER = "embed_fleet"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return msgspec.json.encode(entry).decode()


def configure(level: str = "WARNING") -> logging.Logger:
    """Attach one JSON handler to the fleet's logger (idempotent)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(getattr(h, "_embed_fleet", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._embed_fleet = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER}.{name}")
