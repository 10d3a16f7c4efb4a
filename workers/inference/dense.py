"""Dense ensemble encoding: every chunk of a unit through every sentence-transformers
model of the job, in token-budget batches, as L2-normalised float32 vectors (one matrix
per model and staged batch, rows in chunk order)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared.records.schemas import BatchKind, ChunkBatch, DenseShard, Matrix, ModelInfo
from workers.inference.batch_runner import first_batch
from workers.inference.devices import default_batch_tokens
from workers.inference.earlier import Earlier, Taken, per_batch
from workers.inference.engine import Inference
from workers.inference.feed import (
    Distinct,
    Feed,
    encode_inputs,
    forward,
    per_device,
    served_positions,
    staged_ids,
    text_feed,
)
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
    """:func:`encode_batches` of one staged batch."""
    return encode_batches(inference, [batch], models, max_batch_tokens, kind, dtype)


def encode_batches(
    inference: Inference,
    batches: list[ChunkBatch],
    models: list[str],
    max_batch_tokens: int | None = None,
    kind: BatchKind = "documents",
    dtype: str = "auto",
    earlier: Earlier | None = None,
) -> UnitOutcome:
    """Encode every chunk of a unit's staged batches with every model of the ensemble.

    The unit's chunks go through each model together (:class:`~workers.inference.feed.Feed`:
    their staged ids where the model's tokenizer made them), in a
    :class:`~workers.inference.batch_runner.BatchRunner`'s token-budget batches, longest
    first across the whole unit, so a unit of several staged batches pads less than its
    batches would one by one. Each batch's vectors stay on the device, L2-normalised
    there, and come back in one copy per model; they are returned in chunk order, one
    shard per staged batch. A text the unit holds more than once is encoded once, its
    vector copied to each of its rows (:class:`~workers.inference.feed.Distinct`). A
    chunk whose vector an earlier job made with a model of the same key (``earlier``,
    ``run --reuse``) gets that vector, copied, and is not encoded. A
    batch of queries goes the way of ``encode_query`` (a
    model's query prompt, its ``query`` task). A chunk that runs out of memory alone
    fails the unit (no vector is better than a wrong one).
    """
    chunks = [chunk for batch in batches for chunk in batch.chunks]
    every_text = [chunk.text for chunk in chunks]
    # +2: [CLS] and [SEP], which n_tokens (text tokens only) leaves out: the length of an
    # item only the model's preprocess can lay out, and of the dtype probe's.
    every_length = [chunk.n_tokens + 2 for chunk in chunks]
    # A text the unit holds twice is encoded once (see Distinct), and a chunk whose text
    # another chunk of the job claimed first is not encoded here at all (its row is
    # filled as the shard is read: shared.records.served_rows).
    served = served_positions(batches)
    distinct = Distinct.of(every_text, served)
    texts = distinct.pick(every_text)
    approximate = distinct.pick(every_length)
    device = inference.device
    vectors: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
    infos: list[ModelInfo] = []
    sizes: list[int] = []
    figures = StageFigures()
    tokens: list[int] = []
    taken: dict[str, list[int]] = {}
    encoded: dict[str, list[int]] = {}
    # The ``auto`` probe runs the batch the model is about to run first, at its shape.
    budget = max_batch_tokens or default_batch_tokens("dense", device)
    probe = first_batch(texts, approximate, budget)
    for name in models:
        loaded = load_dense(inference, name, dtype, probe)
        found = earlier.take(loaded.info) if earlier is not None else None
        # What this model encodes: the distinct texts, less those it has vectors for.
        todo = distinct if found is None else Distinct.of(every_text, set(found.positions) | served)
        inputs = encode_inputs(inference, "dense", loaded.info.name, loaded.model, kind)
        staged = staged_ids(batches, inputs.identity).pick(todo.firsts)
        feed = text_feed(inputs, todo.pick(every_text), staged, todo.pick(every_length).__getitem__)
        truncate_dim = getattr(loaded.model, "truncate_dim", None)
        outputs: list[tuple[list[int], torch.Tensor]] = []

        def run(
            model: Any,
            group: list[int],
            feed: Feed = feed,
            outputs: Any = outputs,
            truncate_dim: int | None = truncate_dim,
        ) -> None:
            out = forward(model, feed, group)["sentence_embedding"]
            if truncate_dim:
                out = out[:, :truncate_dim]
            # Normalised on the device, in float32, as the shard keeps them.
            outputs.append((group, torch.nn.functional.normalize(out.float(), p=2, dim=1)))

        if todo.firsts:
            runner = inference.runner("dense", loaded.info.name, device, max_batch_tokens)
            done = runner.run(
                loaded.model, feed.lengths, run, figures=figures, lay_out=feed.lay_out
            )
            sizes += done.batch_sizes
        # Every row of a repeated text gets its first row's vector (a copy, not a view),
        # and a row the earlier job had gets the earlier vector.
        encoded_rows = gather_rows(outputs, len(todo.firsts), loaded.info.dim)
        vectors[loaded.info.name] = _rows_of(encoded_rows, todo, found)
        if found is not None:
            taken[loaded.info.name] = found.positions
        encoded[loaded.info.name] = todo.firsts
        infos.append(loaded.info)
        tokens = tokens or [
            feed.lengths[row] if row >= 0 else every_length[i] for i, row in enumerate(todo.rows)
        ]
    reused, fresh = per_batch(taken, batches), per_batch(encoded, batches)

    def shard(index: int, batch: ChunkBatch, rows: slice) -> DenseShard:
        matrices = {name: Matrix.from_numpy(m[rows]) for name, m in vectors.items()}
        chunk_ids = [chunk.chunk_id for chunk in batch.chunks]
        return DenseShard(
            job_id=batch.job_id,
            batch_id=batch.batch_id,
            chunk_ids=chunk_ids,
            vectors=matrices,
            reused=reused[index],
            encoded=fresh[index],
            served=batch.served,
        )

    return UnitOutcome.of_batches(
        batches,
        tokens,
        shard,
        device=device,
        batch_sizes=sizes,
        kind=kind,
        figures=figures,
        models=infos,
    )


def _rows_of(
    encoded: np.ndarray[Any, np.dtype[np.float32]], todo: Distinct, found: Taken | None
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Every chunk's vector: its distinct text's encoded row, or its earlier one, or
    zeros for a served row (filled as the shard is read)."""
    rows = np.asarray(todo.rows, dtype=np.int64)
    out = np.zeros((len(rows), encoded.shape[1]), dtype=np.float32)
    mine = rows >= 0
    if mine.any():
        out[mine] = encoded[rows[mine]]
    if found is not None:
        assert found.dense is not None
        out[found.positions] = found.dense
    return out


def gather_rows(
    outputs: list[tuple[list[int], torch.Tensor]], rows: int, width: int = 0
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Every batch's output rows ([items, width] each) back in item order, in one
    device-to-host copy per device the batches ran on (``width``: the model's, where
    no batch ran)."""
    width = int(outputs[0][1].shape[1]) if outputs else width
    out = np.zeros((rows, width), dtype=np.float32)
    for positions, values in per_device(outputs):
        out[positions] = values.to(torch.float32).cpu().numpy()
    return out


def l2_normalise(matrix: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Unit-length rows in float32; an all-zero row stays zero instead of NaN."""
    matrix = matrix.astype(np.float32, copy=False)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalised: np.ndarray[Any, np.dtype[np.float32]] = np.divide(
        matrix, norms, out=np.zeros_like(matrix), where=norms > 0
    )
    return normalised
