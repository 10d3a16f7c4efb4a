"""Dense encoding through the real loading code and the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from shared.inputs import tokens
from shared.inputs.chunking import Chunker, load_tokenizer
from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model
from shared.records.schemas import Chunk, ChunkBatch
from workers.inference import dense
from workers.inference.engine import Inference

TEXTS = [
    "supersonic flow over a wedge",
    "boundary layer transition on a flat plate " * 20,
    "heat transfer in hypersonic flight",
    "x",
]


@functools.cache
def chunker() -> Chunker:
    return Chunker(load_tokenizer(str(resolve_model(DEFAULT_DENSE_MODEL).path)), 256)


def batch(texts: list[str] | None = None, batch_id: str = "b000000") -> ChunkBatch:
    """A batch as the chunk stage stages it: each text's real token count, and its ids
    made by all-MiniLM-L6-v2's tokenizer."""
    texts = texts or TEXTS
    cut = chunker()
    ids = cut.tokenizer(texts, add_special_tokens=False)["input_ids"]
    chunks = [
        Chunk(
            chunk_id=f"d{i}#0",
            doc_id=f"d{i}",
            index=0,
            text=t,
            n_tokens=len(ids[i]),
            span=(0, len(t)),
        )
        for i, t in enumerate(texts)
    ]
    staged = tokens.pack(cut.identity, cut.id_dtype, ids)
    return ChunkBatch(job_id="j", batch_id=batch_id, chunks=chunks, tokens=staged)


def test_default_model_resolves_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model("all-MiniLM-L6-v2")
    assert resolved.name == DEFAULT_DENSE_MODEL
    assert (resolved.path / "config.json").is_file()


def test_ensemble_of_a_name_and_a_path_matches_bare_sentence_transformers(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_model(DEFAULT_DENSE_MODEL).path
    # Tiny budget: several model batches, out of input order; rows must come back in order.
    # fp32: the comparison is with bare fp32 (auto may pick bf16 on a CPU with AVX512-BF16).
    inference = Inference()
    result = dense.encode_batch(
        inference, batch(), [DEFAULT_DENSE_MODEL, str(folder)], max_batch_tokens=64, dtype="fp32"
    )
    assert list(result.shard.vectors) == [DEFAULT_DENSE_MODEL, str(folder.resolve())]
    assert len(result.batch_sizes) > 1
    bare = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, normalize_embeddings=True)
    for matrix in result.shard.vectors.values():
        vectors = matrix.to_numpy()
        assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(vectors, bare, atol=1e-5)
    assert {m.source for m in result.models} == {"bundled", "path"}
    assert (
        dense.load_dense(inference, DEFAULT_DENSE_MODEL).model
        is dense.load_dense(inference, "all-MiniLM-L6-v2").model
    )


def test_zero_vector_stays_zero() -> None:
    out = dense.l2_normalise(np.array([[0.0, 0.0], [3.0, 4.0]]))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, [[0, 0], [0.6, 0.8]])


def test_unknown_model_says_how_to_stage_it(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from shared.records.errors import EmbedFleetError

    with pytest.raises(EmbedFleetError, match="hf download"):
        resolve_model("nobody/nothing")


def test_a_name_in_the_shared_hf_cache_loads_through_the_same_code(tmp_path, monkeypatch) -> None:
    """Stage the model the way `hf download` lays out HF_HOME, then load it by name."""
    import shutil

    source = resolve_model(DEFAULT_DENSE_MODEL).path
    repo = tmp_path / "hub" / "models--acme--minilm-copy"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model("acme/minilm-copy")
    assert (resolved.source, resolved.revision) == ("hf-cache", revision)
    result = dense.encode_batch(Inference(), batch(), ["acme/minilm-copy"], max_batch_tokens=4096)
    assert result.models[0].revision == revision
    assert result.shard.vectors["acme/minilm-copy"].to_numpy().shape == (len(TEXTS), 384)
