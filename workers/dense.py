"""Dense ensemble encoding: each model loaded once per worker process, batches cut by
a token budget, vectors L2-normalised float32, one matrix per model."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.models import canonical_name, resolve_model
from shared.schemas import BatchKind, ChunkBatch, DenseShard, Matrix, ModelInfo
from workers.batching import token_budget_batches
from workers.precision import PROBE_ITEMS, apply_precision, parameter_count, vectors_agree
from workers.stage import StageResult


@dataclass
class DenseModel:
    """A loaded SentenceTransformer and what the manifest records about it."""

    model: Any
    info: ModelInfo


_loaded: dict[tuple[str, str], DenseModel] = {}
_lock = threading.Lock()


def pick_device() -> str:
    """``EMBED_FLEET_DEVICE`` if set (a GPU lease sets it), else CUDA when present, else
    CPU."""
    forced = os.environ.get("EMBED_FLEET_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_dense(name: str, dtype: str = "auto", probe: list[str] | None = None) -> DenseModel:
    """Load a model once per process and dtype policy; later calls return the same
    instance. ``probe`` (texts) decides whether ``auto`` may keep bf16."""
    name = canonical_name(name)
    with _lock:
        if (name, dtype) not in _loaded:
            from sentence_transformers import SentenceTransformer

            resolved = resolve_model(name)
            device = pick_device()

            def load() -> Any:
                return SentenceTransformer(str(resolved.path), device=device)

            texts = (probe or ["a probe sentence"])[:PROBE_ITEMS]
            model, precision = apply_precision(
                load(),
                dtype,
                device,
                lambda m: m.encode(texts, batch_size=len(texts), show_progress_bar=False),
                vectors_agree,
                load,
            )
            info = ModelInfo(
                name=resolved.name,
                source=resolved.source,
                revision=resolved.revision,
                dim=int(_embedding_dim(model)),
                dtype=precision.dtype,
                device=str(model.device),
                max_seq_length=int(model.max_seq_length or 0),
                dtype_reason=precision.reason,
                parameters=parameter_count(model),
            )
            _loaded[(name, dtype)] = DenseModel(model, info)
        return _loaded[(name, dtype)]


# Padded tokens per model batch when the job leaves it to the worker. Measured on a
# 2-core CPU with all-MiniLM-L6-v2 (chunks/s): 4096 -> 37.7, 8192 -> 31.8, 16384 -> 27.0;
# bare encode(batch_size=32) -> 33.5. Large batches only pay off on a GPU.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}


def default_batch_tokens(device: str) -> int:
    return DEFAULT_BATCH_TOKENS.get(device.split(":")[0], DEFAULT_BATCH_TOKENS["cpu"])


def encode_batch(
    batch: ChunkBatch,
    models: list[str],
    max_batch_tokens: int | None = None,
    kind: BatchKind = "documents",
    dtype: str = "auto",
) -> StageResult:
    """Encode every chunk of a staged batch with every model of the ensemble.

    Chunks are grouped by :func:`token_budget_batches` (longest first, so the padded
    tensor stays within the budget) and each group is one ``encode`` call; vectors are
    written back in the batch's chunk order. A batch of queries goes through
    ``encode_query``, which applies a model's query prompt where it has one (e5, bge).
    """
    texts = [chunk.text for chunk in batch.chunks]
    # +2: [CLS] and [SEP], which n_tokens (text tokens only) leaves out.
    lengths = [chunk.n_tokens + 2 for chunk in batch.chunks]
    budget = max_batch_tokens or default_batch_tokens(pick_device())
    groups = token_budget_batches(lengths, budget)
    vectors: dict[str, Matrix] = {}
    infos: list[ModelInfo] = []
    for name in models:
        dense = load_dense(name, dtype, texts)
        out = np.zeros((len(texts), dense.info.dim), dtype=np.float32)
        encode = dense.model.encode_query if kind == "queries" else dense.model.encode
        for group in groups:
            encoded = encode(
                [texts[i] for i in group],
                batch_size=len(group),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
            out[group] = encoded
        vectors[dense.info.name] = Matrix.from_numpy(l2_normalise(out))
        infos.append(dense.info)
    shard = DenseShard(
        job_id=batch.job_id,
        batch_id=batch.batch_id,
        chunk_ids=[chunk.chunk_id for chunk in batch.chunks],
        vectors=vectors,
    )
    device = infos[0].device if infos else pick_device()
    return StageResult(shard, [len(g) for g in groups], sum(lengths), infos, device)


def l2_normalise(matrix: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Unit-length rows in float32; an all-zero row stays zero instead of NaN."""
    matrix = matrix.astype(np.float32, copy=False)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalised: np.ndarray[Any, np.dtype[np.float32]] = np.divide(
        matrix, norms, out=np.zeros_like(matrix), where=norms > 0
    )
    return normalised


def _embedding_dim(model: Any) -> int:
    # sentence-transformers 6 renamed the method; 5 has only the old name.
    getter = (
        getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    )
    return int(getter() or 0)
