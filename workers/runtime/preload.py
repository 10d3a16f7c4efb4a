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

from shared.records.logs import get_logger
from workers.inference.devices import sparse_device
from workers.inference.engine import Inference
from workers.inference.model_manager import ModelFamily
from workers.runtime.context import WorkerContext

log = get_logger("preload")


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


def import_chunking_libraries() -> None:
    """What a preparing worker's chunk units load: the job's tokenizer through
    transformers, whose import takes torch with it (about 1.5 s and 240 MB).

    A worker that serves ``prepare`` imports them at start, in its main process before
    the pool forks (:func:`workers.app.boot_worker`), as every worker did before
    importing torch became a model worker's alone: its first chunk unit does not wait
    for them, and its memory at rest is what preparing needs (the memory a bad record
    costs is measured from there). An aggregator that does not prepare never pays
    them."""
    from transformers import AutoTokenizer  # noqa: F401


def stage_models(context: WorkerContext) -> None:
    """Stage the preload list's models that this worker's queues use."""
    for kind, name, dtype in parse_preload(context.settings.preload):
        if kind not in context.boot.queues:
            continue
        try:
            stage(context.inference, kind, name, dtype)
        except Exception as exc:  # the first task will raise the real error
            fields = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            log.warning("model not staged", extra={"fields": fields})


def stage(inference: Inference, kind: str, name: str, dtype: str) -> None:
    from workers.inference import dense, rerank, sparse

    families: dict[str, ModelFamily] = {
        "dense": dense.DENSE,
        "rerank": rerank.RERANK,
        "sparse": sparse.SPARSE,
    }
    device = sparse_device(None) if kind == "sparse" else inference.device
    inference.models.stage(families[kind], name, device, dtype)
