"""Settings read from the environment, shared by the producer and the workers.

Workers on other hosts get the same settings from their own environment, so nothing
secret travels in messages: a message names a store URL, each process brings its own
credentials.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from shared.errors import EmbedFleetError

ENV_PREFIX = "EMBED_FLEET_"
# Where a worker started without REDIS_URL / CELERY_BROKER_URL looks for its broker.
DEFAULT_WORKER_BROKER = "redis://127.0.0.1:6379/0"


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise EmbedFleetError(
            f"{ENV_PREFIX}{name}={raw!r} is not a number", f"Set {ENV_PREFIX}{name} to seconds"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Process-wide settings.

    Attributes:
        broker_url: Redis URL of the broker and ledger; ``None`` means "no shared
            broker configured", which makes the CLI start the embedded local fleet.
        visibility_timeout: Seconds before an unacknowledged task is handed to another
            worker. Must exceed the longest task (tasks are idempotent either way).
        unacked_restore_interval: Seconds between kombu's scans for expired
            unacknowledged tasks (``None``: kombu's default). Tests set it low.
        max_retries: Retries of a failing batch before it is recorded as failed.
        ledger_ttl: Seconds a finished job's ledger stays in Redis.
        log_level: Level of the fleet's own structured logs.
        rerank_batch_timeout: Seconds one CrossEncoder model batch may run before it is
            split, moved to the CPU, or left unreranked (0: no limit).
    """

    broker_url: str | None
    visibility_timeout: float = 3600.0
    unacked_restore_interval: float | None = None
    max_retries: int = 3
    ledger_ttl: float = 7 * 24 * 3600.0
    log_level: str = "WARNING"
    rerank_batch_timeout: float | None = 120.0

    @property
    def worker_broker_url(self) -> str:
        """The broker a worker uses: the configured one, else Redis on localhost."""
        return self.broker_url or DEFAULT_WORKER_BROKER

    @classmethod
    def from_env(cls) -> Settings:
        url = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL") or None
        return cls(
            broker_url=url,
            visibility_timeout=_env_float("VISIBILITY_TIMEOUT", 3600.0) or 3600.0,
            unacked_restore_interval=_env_float("UNACKED_RESTORE_INTERVAL", None),
            max_retries=int(_env_float("MAX_RETRIES", 3) or 0),
            ledger_ttl=_env_float("LEDGER_TTL", 7 * 24 * 3600.0) or 7 * 24 * 3600.0,
            log_level=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "WARNING").upper(),
            rerank_batch_timeout=_env_float("RERANK_BATCH_TIMEOUT", 120.0) or None,
        )


_USERINFO = re.compile(r"(?<=://)[^@/]*@")


def redact_url(url: str) -> str:
    """Hide the credentials of a URL (``redis://:secret@host`` → ``redis://***@host``)."""
    return _USERINFO.sub("***@", url)
