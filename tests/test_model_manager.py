"""ModelManager with the real loading code: staging, hydration, LRU eviction under a
memory budget, and results that stay correct across swaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from crossencoder import build_tiny_cross_encoder
from sentence_transformers import CrossEncoder, SentenceTransformer

from shared.control.settings import Settings, parse_bytes
from shared.inputs.models import BUNDLED_SPLADE, DEFAULT_DENSE_MODEL, resolve_model
from shared.records.errors import EmbedFleetError
from workers.inference.dense import DENSE
from workers.inference.model_manager import ModelManager, model_bytes
from workers.inference.rerank import RERANK
from workers.inference.sparse import SPARSE
from workers.runtime.preload import parse_preload

TEXTS = ["supersonic flow over a wedge", "heat transfer in hypersonic flight"]
PAIRS = [("wedge flow", TEXTS[0]), ("wedge flow", TEXTS[1])]


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "tiny-ce")


def test_budget_of_one_model_swaps_on_alternating_tasks(
    reranker_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense_path = resolve_model(DEFAULT_DENSE_MODEL).path
    bare_vectors = SentenceTransformer(str(dense_path), device="cpu").encode(TEXTS)
    bare_scores = CrossEncoder(str(reranker_folder), device="cpu").predict(PAIRS)
    dense_bytes = model_bytes(SentenceTransformer(str(dense_path), device="cpu"))
    # Room for the larger model, not for both.
    manager = ModelManager(budgets={"cpu": dense_bytes + 1})

    for round_ in range(3):
        dense = manager.get(DENSE, DEFAULT_DENSE_MODEL, "cpu", "fp32", TEXTS)
        np.testing.assert_allclose(dense.model.encode(TEXTS), bare_vectors, atol=1e-5)
        assert manager.resident("cpu") == [f"dense:{DEFAULT_DENSE_MODEL}"]
        rerank = manager.get(RERANK, str(reranker_folder), "cpu", "fp32", PAIRS)
        np.testing.assert_allclose(rerank.model.predict(PAIRS), bare_scores, atol=1e-5)
        assert manager.resident("cpu") == [f"rerank:{reranker_folder}"]
        assert manager.stats.evictions == 2 * round_ + 1
    # Each task after the first found its model evicted: hydrated (here: staged again
    # from the cache, the CPU being this worker's device) six times in all.
    assert manager.stats.hydrations == 6
    assert (dense.info.dtype, dense.info.device, dense.info.kind) == ("float32", "cpu", "dense")
    assert (rerank.info.dtype, rerank.info.device, rerank.info.kind) == ("float32", "cpu", "rerank")
    assert dense.info.parameters > rerank.info.parameters > 0


def test_without_a_budget_models_stay_and_load_once(
    reranker_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBED_FLEET_MODEL_MEMORY", raising=False)
    manager = ModelManager()
    first = manager.get(RERANK, str(reranker_folder), "cpu", "fp32", PAIRS)
    manager.get(DENSE, DEFAULT_DENSE_MODEL, "cpu", "fp32", TEXTS)
    again = manager.get(RERANK, str(reranker_folder), "cpu", "fp32", PAIRS)
    assert again.model is first.model
    assert manager.stats.loads == 2 and manager.stats.evictions == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "auto"])
def test_every_family_hands_out_its_model_in_eval_mode(reranker_folder: Path, dtype: str) -> None:
    """The fleet runs a model's forward itself, and sentence-transformers leaves its
    wrapper modules in training mode until ``encode`` or ``predict``: SPLADE's pooling
    then copies its vocabulary-wide logits instead of working in place (and a model
    with dropout in such a module would give other vectors on every call)."""
    manager = ModelManager()
    for family, name, probe in (
        (DENSE, DEFAULT_DENSE_MODEL, TEXTS),
        (SPARSE, BUNDLED_SPLADE, TEXTS),
        (RERANK, str(reranker_folder), PAIRS),
    ):
        model = manager.get(family, name, "cpu", dtype, probe).model
        training = [label or "(the model)" for label, m in model.named_modules() if m.training]
        assert training == [], f"{family.kind} {dtype}: in training mode: {training}"


def test_staging_loads_on_cpu_without_hydrating(reranker_folder: Path) -> None:
    manager = ModelManager()
    entry = manager.stage(RERANK, str(reranker_folder), "cpu", "auto")
    assert entry.model is not None and not entry.resident and entry.info is None
    assert manager.resident() == []


def test_sizes_parse_and_bad_ones_say_how(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("800MB") == 800 * 10**6
    assert parse_bytes("1234") == 1234
    with pytest.raises(EmbedFleetError, match=r"EMBED_FLEET_MODEL_MEMORY=.lots.*e\.g\. 2GiB"):
        parse_bytes("lots")
    monkeypatch.setenv("EMBED_FLEET_MODEL_MEMORY", "2GiB")
    assert ModelManager(memory=Settings.from_env().model_memory).budget("cpu") == 2 * 2**30


def test_preload_list_parses() -> None:
    assert parse_preload("dense:a/b, rerank:c@bf16,bogus,sparse:") == [
        ("dense", "a/b", "auto"),
        ("rerank", "c", "bf16"),
    ]


def test_cuda_turns_off_cudnn_attention_and_the_cpu_leaves_it() -> None:
    """cuDNN's SDPA builds a plan per new shape (bf16 first passes at a third of fp32 on
    an H100): a process that runs models on a GPU turns it off; one on the CPU does not
    touch the setting."""
    import torch

    from workers.inference.devices import prepare_cuda

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        prepare_cuda("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        prepare_cuda("cuda:0")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
