"""The broadcast padding mask: the same mask as transformers' sdpa_mask, the same
vectors as the bare library, and the one the fleet's models run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from crossencoder import build_tiny_cross_encoder
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model
from workers.inference import dense
from workers.inference.attention_mask import IMPLEMENTATION, padding_mask, use_broadcast_mask
from workers.inference.engine import Inference
from workers.inference.rerank import load_cross_encoder

CRANFIELD = Path(__file__).resolve().parents[1] / "examples" / "cranfield"


def _args(mask: torch.Tensor, function: object, skip: bool) -> dict[str, object]:
    batch, length = mask.shape
    return {
        "batch_size": batch,
        "q_length": length,
        "kv_length": length,
        "mask_function": function,
        "attention_mask": mask,
        "allow_is_causal_skip": False,
        "allow_is_bidirectional_skip": skip,
    }


def test_the_padding_mask_is_sdpa_masks_own() -> None:
    padded = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    expected = sdpa_mask(**_args(padded, bidirectional_mask_function, True))  # type: ignore[arg-type]
    mine = padding_mask(**_args(padded, bidirectional_mask_function, True))  # type: ignore[arg-type]
    assert expected is not None and mine is not None
    assert mine.shape == expected.shape == (3, 1, 4, 4) and torch.equal(mine, expected)
    full = torch.ones(2, 5, dtype=torch.bool)  # no padding: no mask at all, as sdpa_mask
    assert sdpa_mask(**_args(full, bidirectional_mask_function, True)) is None  # type: ignore[arg-type]
    assert padding_mask(**_args(full, bidirectional_mask_function, True)) is None  # type: ignore[arg-type]
    # Anything else (here a decoder's causal mask) is sdpa_mask's, unchanged.
    causal = padding_mask(**_args(padded, causal_mask_function, False))  # type: ignore[arg-type]
    assert causal is not None
    assert torch.equal(causal, sdpa_mask(**_args(padded, causal_mask_function, False)))  # type: ignore[arg-type]


def test_a_switched_model_encodes_as_the_bare_one() -> None:
    """MiniLM with the broadcast mask against MiniLM as sentence-transformers loads it,
    on padded batches of real text: the same vectors."""
    from sentence_transformers import SentenceTransformer

    folder = str(resolve_model(DEFAULT_DENSE_MODEL).path)
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:96]
    texts = [json.loads(line)["text"] for line in lines]
    bare = SentenceTransformer(folder, device="cpu")
    switched = SentenceTransformer(folder, device="cpu")
    assert use_broadcast_mask(switched) == 1
    assert use_broadcast_mask(switched) == 0  # already switched
    expected = bare.encode(texts, batch_size=32)
    got = switched.encode(texts, batch_size=32)
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.parametrize("kind", ["dense", "rerank"])
def test_the_fleets_models_run_the_broadcast_mask(kind: str, tmp_path: Path) -> None:
    """Loaded through the worker's model manager, a dense model and a CrossEncoder run
    :data:`IMPLEMENTATION` (the vectors' equality with the bare library is test_feed's)."""
    from transformers import PreTrainedModel

    inference = Inference(requested_device="cpu")
    if kind == "dense":
        model = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "fp32").model
    else:
        folder = build_tiny_cross_encoder(tmp_path / "cross")
        model = load_cross_encoder(inference, str(folder), "cpu", "fp32").model
    inner = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    assert inner and all(m.config._attn_implementation == IMPLEMENTATION for m in inner)
