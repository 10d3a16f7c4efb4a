"""Token ids computed once: who made them (the tokenizer's identity) and how a staged
batch keeps them.

The chunk stage has to tokenize every chunk to cut it, with the first dense model's
tokenizer; the ids it computes are kept in the staged batch (:class:`StagedTokens`),
two bytes an id while the vocabulary fits, so the encode and rerank stages never
tokenize that text again. A model may use them only if its tokenizer gives the same
ids for every text: the identity below is a digest of exactly what decides the ids
(the normalizer, the pre-tokenizer, the model with its vocabulary and merges, the
post-processor and the added tokens), and not of the truncation and padding that each
worker applies itself for its own model (all-MiniLM-L6-v2's and the bundled SPLADE's
``tokenizer.json`` differ only in those two, so they share ids).

This module imports no torch: the producer stages query ids with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.records.schemas import IdDtype, StagedTokens

# The parts of a tokenizer.json that decide the ids of a text (truncation, padding and
# the decoder do not).
IDENTITY_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor")
UINT16_VOCABULARY = 2**16


def tokenizer_identity(backend: Any) -> str:
    """The identity of a Rust tokenizer (``tokenizers.Tokenizer``, or a Hugging Face fast
    tokenizer's ``backend_tokenizer``): ``tok1:`` and a sha256 over what decides its ids,
    plus whether it splits special tokens written in the text."""
    state = json.loads(backend.to_str())
    decisive = {key: state.get(key) for key in IDENTITY_KEYS}
    decisive["encode_special_tokens"] = bool(getattr(backend, "encode_special_tokens", False))
    canonical = json.dumps(decisive, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "tok1:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def id_dtype(vocabulary_size: int) -> IdDtype:
    """The narrowest dtype that holds every id of a vocabulary."""
    return "uint16" if vocabulary_size <= UINT16_VOCABULARY else "uint32"


def _numpy_dtype(dtype: IdDtype) -> np.dtype[Any]:
    return np.dtype("<u2" if dtype == "uint16" else "<u4")


def pack(tokenizer: str, dtype: IdDtype, ids: Sequence[Sequence[int]]) -> StagedTokens:
    """Every item's ids in one :class:`StagedTokens` (one buffer, not an object per id)."""
    lengths = [len(item) for item in ids]
    flat = np.fromiter(
        (token for item in ids for token in item), dtype=_numpy_dtype(dtype), count=sum(lengths)
    )
    return StagedTokens(tokenizer=tokenizer, dtype=dtype, ids=flat.tobytes(), lengths=lengths)


Flat = tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int64]]]


def flat(tokens: StagedTokens) -> Flat:
    """Every item's ids end to end as one int64 array, and each item's length: what a
    worker lays a unit out from, without an array per item.

    Raises:
        ValueError: if the lengths do not add up to the buffer (a corrupt batch).
    """
    ids = np.frombuffer(tokens.ids, dtype=_numpy_dtype(tokens.dtype)).astype(np.int64)
    lengths = np.asarray(tokens.lengths, dtype=np.int64)
    if int(lengths.sum()) != len(ids):
        raise ValueError(
            f"staged token ids hold {len(ids)} ids but their lengths add up to {int(lengths.sum())}"
        )
    return ids, lengths


def unpack(tokens: StagedTokens) -> list[np.ndarray[Any, np.dtype[np.int64]]]:
    """Each item's ids as an int64 array (views into one converted buffer).

    Raises:
        ValueError: if the lengths do not add up to the buffer (a corrupt batch).
    """
    ids, lengths = flat(tokens)
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []


def to_bytes(ids: np.ndarray[Any, Any], dtype: IdDtype) -> bytes:
    """One item's ids as :class:`StagedTokens` stores them (for a fused group's passages)."""
    return np.asarray(ids).astype(_numpy_dtype(dtype)).tobytes()


def from_bytes(data: bytes, dtype: IdDtype) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The inverse of :func:`to_bytes`."""
    return np.frombuffer(data, dtype=_numpy_dtype(dtype)).astype(np.int64)


def from_many(data: Sequence[bytes], dtype: IdDtype) -> Flat:
    """:func:`from_bytes` of many items at once (a fused group's passages): their ids end
    to end, converted in one call, and each item's length."""
    numpy_dtype = _numpy_dtype(dtype)
    ids = np.frombuffer(b"".join(data), dtype=numpy_dtype).astype(np.int64)
    size = numpy_dtype.itemsize
    return ids, np.fromiter((len(raw) // size for raw in data), np.int64, len(data))
