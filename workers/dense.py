"""Dense ensemble encoding: each model loaded once per worker process, batches cut by
a token budget, vectors L2-normalised float32, one matrix per model."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shared.schemas import BatchKind, ChunkBatch, DenseShard, Matrix, ModelInfo
from workers.adaptive import run_adaptive
from workers.measure import StageFigures
from workers.model_manager import Loaded, ModelFamily, manager
from workers.precision import vectors_agree
from workers.stage import StageResult


def pick_device() -> str:
    """``EMBED_FLEET_DEVICE`` if set (a GPU lease sets it), else CUDA when present, else
    CPU."""
    forced = os.environ.get("EMBED_FLEET_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


def _probe(model: Any, texts: list[str]) -> np.ndarray[Any, Any]:
    vectors: np.ndarray[Any, Any] = model.encode(
        texts, batch_size=len(texts), show_progress_bar=False
    )
    return vectors


DENSE = ModelFamily(
    kind="dense",
    load=_load,
    probe=_probe,
    agree=vectors_agree,
    dim=lambda model: _embedding_dim(model),
    max_seq_length=lambda model: int(model.max_seq_length or 0),
)


def load_dense(name: str, dtype: str = "auto", probe: list[str] | None = None) -> Loaded:
    """The dense model, hydrated on this worker's device by the :class:`ModelManager`;
    ``probe`` (texts) decides whether ``auto`` may keep bf16."""
    return manager().get(DENSE, name, pick_device(), dtype, probe)


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
    device = pick_device()
    ceiling = max_batch_tokens or default_batch_tokens(device)
    vectors: dict[str, Matrix] = {}
    infos: list[ModelInfo] = []
    sizes: list[int] = []
    figures = StageFigures()
    for name in models:
        dense = load_dense(name, dtype, texts)
        out = np.zeros((len(texts), dense.info.dim), dtype=np.float32)
        encode = dense.model.encode_query if kind == "queries" else dense.model.encode

        def run(group: list[int], encode: Any = encode, out: Any = out) -> None:
            out[group] = encode(
                [texts[i] for i in group],
                batch_size=len(group),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )

        done = run_adaptive(
            lengths,
            run,
            stage="dense",
            model=dense.info.name,
            device=device,
            ceiling=ceiling,
            figures=figures,
        )
        sizes += done.batch_sizes
        vectors[dense.info.name] = Matrix.from_numpy(l2_normalise(out))
        infos.append(dense.info)
    shard = DenseShard(
        job_id=batch.job_id,
        batch_id=batch.batch_id,
        chunk_ids=[chunk.chunk_id for chunk in batch.chunks],
        vectors=vectors,
    )
    return StageResult(shard, sizes, sum(lengths), infos, device, figures)


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
