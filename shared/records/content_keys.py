"""What a vector is keyed by, defined once: the text of its chunk and the model that made it.

A vector may be taken for another chunk (a later job's, or a repeat in the same job)
only when everything that could change it matches. The key comes in two halves, since
one half belongs to a chunk and the other to a vector column:

- the **text key** of a chunk (:func:`text_key`): 128 bits of the sha256 of its text,
  as the model reads it (a first chunk's title included). Chunking parameters enter
  through the text: the same text gives the same vector, however it was cut.
- the **model key** of a column (:func:`model_key`): a sha256 over the model's name, the
  digest of its files (the hub revision, or a sha256 of its weights and of the
  configuration that decides its outputs: pooling, normalisation), the identity of its
  tokenizer (:func:`shared.inputs.tokens.tokenizer_identity`) and the dtype its worker
  actually ran.

A chunk's vector in a column is reusable where both halves match. Every part carries
each chunk's text key (column ``text_key``), and the manifest each column's model key
(``chunks.model_keys``). BM25 has no model key: its weights depend on the statistics of
the whole collection, so they are recomputed for every job.
"""

from __future__ import annotations

import hashlib

# Bumped when what a key covers changes, so keys of different meanings never match.
KEY_VERSION = "ck1"
TEXT_KEY_BYTES = 16


def text_key(text: str) -> str:
    """A chunk's text key: 32 hex digits (128 bits of sha256 over its UTF-8 text)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[: 2 * TEXT_KEY_BYTES]


def model_key(name: str, files: str, tokenizer: str, dtype: str) -> str:
    """A vector column's model key: ``ck1:`` and 32 hex digits of a sha256 over what
    decides the model's vectors (see the module doc)."""
    fields = (KEY_VERSION, name, files, tokenizer, dtype)
    digest = hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:32]
    return f"{KEY_VERSION}:{digest}"
