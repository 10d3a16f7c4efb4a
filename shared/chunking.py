"""Documents into chunks that fit the first dense model, cut on word boundaries.

The window is counted in the first dense model's own tokens, so a chunk is never
truncated by that model. Chunks end where a word ends (a word longer than the window is
the only exception), so re-tokenising a chunk's text gives back the same tokens.
Long documents are tokenised in segments, so a 5 MB document streams through in
bounded memory instead of as one million-token encoding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from shared import ids
from shared.errors import EmbedFleetError
from shared.models import resolve_model
from shared.schemas import Chunk, Document, JobSpec

SEGMENT_CHARS = 32_768
# The last whitespace character (of any kind) of a span: where a segment may end.
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")
TITLE_SEPARATOR = "\n\n"


class _Token(NamedTuple):
    pos: int  # position in the document's token stream
    start: int  # character offsets in the text being chunked
    end: int
    word: tuple[int, int]  # (segment, word id): equal for pieces of one word


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # chunking long texts is deliberate, not a mistake
    return AutoTokenizer.from_pretrained(model_dir)


def chunker_for(spec: JobSpec) -> Chunker:
    """The job's chunker: its first dense model's tokenizer and the spec's window."""
    model = resolve_model(spec.dense_models[0])
    return Chunker(load_tokenizer(str(model.path)), spec.chunk_tokens, spec.chunk_overlap)


def model_max_tokens(model_dir: Path, tokenizer: Any) -> int:
    """The model's max sequence length (sentence-transformers' config, else the
    tokenizer's limit, capped at 512)."""
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 512)
    return min(int(limit), 512)


class Chunker:
    """Cut documents into token windows.

    Args:
        tokenizer: A fast (Rust) Hugging Face tokenizer; word ids and offsets need it.
        chunk_tokens: Tokens per chunk *including* the model's special tokens, so the
            default (the model's max sequence length) fills the model exactly.
        overlap: Tokens shared by consecutive chunks of one document.
    """

    def __init__(self, tokenizer: Any, chunk_tokens: int, overlap: int = 0) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise EmbedFleetError(
                "the first dense model has no fast tokenizer", "Use a model with tokenizer.json"
            )
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.window = chunk_tokens - tokenizer.num_special_tokens_to_add(pair=False)
        self.overlap = overlap
        if self.window < 8:
            raise EmbedFleetError(
                f"--chunk-tokens {chunk_tokens} leaves {self.window} tokens of text per chunk",
                "Use at least 16",
            )
        if not 0 <= overlap <= self.window // 2:
            raise EmbedFleetError(
                f"--chunk-overlap {overlap} must be between 0 and half the window "
                f"({self.window // 2})",
                "Lower --chunk-overlap",
            )

    def chunk(self, doc: Document) -> list[Chunk]:
        """All chunks of a document; an empty list for a document with no text."""
        full = f"{doc.title}{TITLE_SEPARATOR}{doc.text}" if doc.title.strip() else doc.text
        body_offset = len(full) - len(doc.text)
        if not full.strip():
            return []
        chunks: list[Chunk] = []
        for tokens in self._windows(full):
            start, end = tokens[0].start, tokens[-1].end
            chunks.append(
                Chunk(
                    chunk_id=ids.chunk_id(doc.id, len(chunks)),
                    doc_id=doc.id,
                    index=len(chunks),
                    text=full[start:end],
                    n_tokens=len(tokens),
                    span=(max(0, start - body_offset), max(0, end - body_offset)),
                    metadata=doc.metadata,
                )
            )
        return chunks

    def _tokens(self, text: str) -> Iterator[_Token]:
        index = 0
        for segment, (lo, hi) in enumerate(_segments(text)):
            encoding = self.tokenizer(
                text[lo:hi], add_special_tokens=False, return_offsets_mapping=True
            )
            words = encoding.word_ids()
            for (s, e), word in zip(encoding["offset_mapping"], words, strict=True):
                yield _Token(index, lo + s, lo + e, (segment, word if word is not None else -index))
                index += 1

    def _windows(self, text: str) -> Iterator[list[_Token]]:
        buffer: list[_Token] = []
        emitted_to = 0  # stream index one past the last emitted token
        for token in self._tokens(text):
            buffer.append(token)
            if len(buffer) <= self.window:
                continue
            # buffer holds window + 1 tokens: cut where a new word starts.
            cut = self.window
            while cut > 0 and buffer[cut].word == buffer[cut - 1].word:
                cut -= 1
            if cut == 0:  # one word longer than the window
                cut = self.window
            yield buffer[:cut]
            emitted_to = buffer[cut - 1].pos + 1
            # Next chunk starts `overlap` tokens back, moved forward to a word start.
            nxt = max(1, cut - self.overlap)
            while nxt < cut and buffer[nxt].word == buffer[nxt - 1].word:
                nxt += 1
            buffer = buffer[nxt:]
        if buffer and buffer[-1].pos >= emitted_to:
            yield buffer


@dataclass
class ChunkTally:
    """What :func:`chunk_batches` cut so far: chunks, tokens, documents without text."""

    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    empty: list[str] = field(default_factory=list)


def chunk_batches(
    chunker: Chunker, documents: Iterable[Document], batch_chunks: int, tally: ChunkTally
) -> Iterator[list[Chunk]]:
    """The documents' chunks in batches of ``batch_chunks`` (the last one smaller), in
    reading order: how the producer and a chunk unit alike cut what they stage."""
    pending: list[Chunk] = []
    for doc in documents:
        tally.documents += 1
        doc_chunks = chunker.chunk(doc)
        if not doc_chunks:
            tally.empty.append(doc.id)
        for chunk in doc_chunks:
            pending.append(chunk)
            tally.chunks += 1
            tally.tokens += chunk.n_tokens
            if len(pending) >= batch_chunks:
                yield pending
                pending = []
    if pending:
        yield pending


def _segments(text: str) -> Iterator[tuple[int, int]]:
    """Split text at whitespace into pieces of at most SEGMENT_CHARS characters."""
    lo, n = 0, len(text)
    while lo < n:
        hi = min(n, lo + SEGMENT_CHARS)
        if hi < n:
            match = _LAST_SPACE.search(text, lo, hi)
            if match and match.start() > lo:
                hi = match.start()
        yield lo, hi
        lo = hi
