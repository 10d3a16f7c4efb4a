"""Dense ensemble encoding: every chunk of a batch through every sentence-transformers
model of the job, in token-budget batches, as L2-normalised float32 vectors (one matrix
per model, rows in chunk order)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.schemas import BatchKind, ChunkBatch, DenseShard, Matrix, ModelInfo
from workers.inference.batch_runner import first_batch
from workers.inference.devices import default_batch_tokens
from workers.inference.engine import Inference
from workers.inference.model_manager import Loaded, ModelFamily
from workers.inference.precision import vectors_agree
from workers.runtime.measure import StageFigures, UnitOutcome


def _load(path: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


def _probe(model: Any, texts: list[str]) -> np.ndarray[Any, Any]:
    vectors: np.ndarray[Any, Any] = model.encode(
        texts, batch_size=len(texts), show_progress_bar=False
    )
    return vectors


def _embedding_dim(model: Any) -> int:
    # sentence-transformers 6 renamed the method; 5 has only the old name.
    getter = (
        getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    )
    return int(getter() or 0)


DENSE = ModelFamily(
    kind="dense",
    load=_load,
    probe=_probe,
    agree=vectors_agree,
    dim=_embedding_dim,
    max_seq_length=lambda model: int(model.max_seq_length or 0),
)


def load_dense(
    inference: Inference, name: str, dtype: str = "auto", probe: list[str] | None = None
) -> Loaded:
    """The dense model, hydrated on the worker's device; ``probe`` (the first model
    batch's texts) decides whether ``auto`` may keep bf16."""
    return inference.models.get(DENSE, name, inference.device, dtype, probe)


def encode_batch(
    inference: Inference,
    batch: ChunkBatch,
    models: list[str],
    max_batch_tokens: int | None = None,
    kind: BatchKind = "documents",
    dtype: str = "auto",
) -> UnitOutcome:
    """Encode every chunk of a staged batch with every model of the ensemble.

    Each model's chunks go through a :class:`~workers.inference.batch_runner.BatchRunner`
    (longest first, batches within the padded-token budget); vectors are written back in
    the batch's chunk order. A batch of queries goes through ``encode_query``, which
    applies a model's query prompt where it has one (e5, bge). A chunk that runs out of
    memory alone fails the unit (no vector is better than a wrong one).
    """
    texts = [chunk.text for chunk in batch.chunks]
    # +2: [CLS] and [SEP], which n_tokens (text tokens only) leaves out.
    lengths = [chunk.n_tokens + 2 for chunk in batch.chunks]
    device = inference.device
    vectors: dict[str, Matrix] = {}
    infos: list[ModelInfo] = []
    sizes: list[int] = []
    figures = StageFigures()
    # The ``auto`` probe runs the batch the model is about to run first, at its shape.
    probe = first_batch(texts, lengths, max_batch_tokens or default_batch_tokens("dense", device))
    for name in models:
        dense = load_dense(inference, name, dtype, probe)
        out = np.zeros((len(texts), dense.info.dim), dtype=np.float32)

        def run(model: Any, group: list[int], out: Any = out) -> None:
            encode = model.encode_query if kind == "queries" else model.encode
            out[group] = encode(
                [texts[i] for i in group],
                batch_size=len(group),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )

        runner = inference.runner("dense", dense.info.name, device, max_batch_tokens)
        done = runner.run(dense.model, lengths, run, figures=figures)
        sizes += done.batch_sizes
        vectors[dense.info.name] = Matrix.from_numpy(l2_normalise(out))
        infos.append(dense.info)
    shard = DenseShard(
        job_id=batch.job_id,
        batch_id=batch.batch_id,
        chunk_ids=[chunk.chunk_id for chunk in batch.chunks],
        vectors=vectors,
    )
    return UnitOutcome(
        items=len(texts),
        device=device,
        shard=shard,
        batch_sizes=sizes,
        kind=kind,
        tokens=sum(lengths),
        figures=figures,
        models=infos,
    )


def l2_normalise(matrix: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Unit-length rows in float32; an all-zero row stays zero instead of NaN."""
    matrix = matrix.astype(np.float32, copy=False)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalised: np.ndarray[Any, np.dtype[np.float32]] = np.divide(
        matrix, norms, out=np.zeros_like(matrix), where=norms > 0
    )
    return normalised
