"""Staging at worker start: the models named in ``EMBED_FLEET_PRELOAD`` are loaded into
CPU memory by each pool process before its first task, so the first batch waits only
for hydration, not for a load from disk.

``EMBED_FLEET_PRELOAD`` is a comma-separated list of ``kind:name[@dtype]`` (kind
``dense``, ``sparse`` or ``rerank``; dtype as ``--dtype``, default ``auto``), e.g.
``dense:sentence-transformers/all-MiniLM-L6-v2,rerank:cross-encoder/ms-marco-MiniLM-L6-v2``.
A worker stages only the kinds its queues serve (``dense`` → dense, ``rerank`` →
rerank, ``sparse`` → sparse); a model that cannot be staged is logged and left to the
first task, whose error then says what is wrong.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from shared.logs import get_logger
from shared.models import PRELOAD_ENV
from workers.gpu_lease import consumed_queues

log = get_logger("preload")
QUEUES_ENV = "EMBED_FLEET_WORKER_QUEUES"


def parse_preload(text: str) -> list[tuple[str, str, str]]:
    """``kind:name[@dtype]`` items into (kind, name, dtype) triples."""
    items: list[tuple[str, str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, rest = item.partition(":")
        name, _, dtype = rest.partition("@")
        if kind not in ("dense", "sparse", "rerank") or not name:
            log.warning("ignored preload item", extra={"fields": {"item": item}})
            continue
        items.append((kind, name, dtype or "auto"))
    return items


@signals.worker_init.connect
def remember_queues(sender: Any = None, **_: Any) -> None:
    """Hand the worker's queues to its pool processes (they fork after this)."""
    os.environ[QUEUES_ENV] = ",".join(sorted(consumed_queues(sender)))


@signals.worker_process_init.connect
def stage_models(**_: Any) -> None:
    """Stage the preload list's models that this worker's queues use."""
    serves = set(os.environ.get(QUEUES_ENV, "").split(","))
    for kind, name, dtype in parse_preload(os.environ.get(PRELOAD_ENV, "")):
        if kind not in serves:
            continue
        try:
            stage(kind, name, dtype)
        except Exception as exc:  # the first task will raise the real error
            fields = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            log.warning("model not staged", extra={"fields": fields})


def stage(kind: str, name: str, dtype: str) -> None:
    from workers import dense, rerank, sparse
    from workers.model_manager import manager

    if kind == "dense":
        manager().stage(dense.DENSE, name, dense.pick_device(), dtype)
    elif kind == "rerank":
        manager().stage(rerank.RERANK, name, dense.pick_device(), dtype)
    else:
        manager().stage(sparse.SPARSE, name, sparse.resolve_device(None), dtype)
