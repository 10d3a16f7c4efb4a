"""Documents into chunks that fit the first dense model, cut on word boundaries.

The window is counted in the first dense model's own tokens, so a chunk is never
truncated by that model. Chunks end where a word ends (a word longer than the window is
the only exception), so re-tokenising a chunk's text gives back the same tokens.
Long documents are tokenised in segments, so a 5 MB document streams through in
bounded memory instead of as one million-token encoding.

The ids the cut needed are kept: each staged batch carries its chunks' token ids
(:class:`~shared.records.schemas.StagedTokens`), exactly those the tokenizer gives for the chunk's
text, so no later stage tokenizes it again. A document that is one chunk as it stands
(most of a retrieval corpus) has them already; a chunk cut from a longer text, or
stripped of surrounding whitespace, is tokenised once more here, in one call per group
of documents, because the ids of a substring are not always a slice of the whole's.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from shared.inputs import tokens
from shared.inputs.models import resolve_model
from shared.records import ids
from shared.records.errors import EmbedFleetError
from shared.records.schemas import (
    Chunk,
    ChunkBatch,
    Document,
    InputLimits,
    JobSpec,
    SkippedRecord,
    StagedTokens,
)

SEGMENT_CHARS = 32_768
# Documents tokenised in one call by chunk_batches.
CHUNK_GROUP = 64
# The last whitespace character (of any kind) of a span: where a segment may end.
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")
TITLE_SEPARATOR = "\n\n"


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # chunking long texts is deliberate, not a mistake
    return AutoTokenizer.from_pretrained(model_dir)


def chunker_for(spec: JobSpec) -> Chunker:
    """The job's chunker: its first dense model's tokenizer and the spec's window."""
    model = resolve_model(spec.dense_models[0])
    return Chunker(
        load_tokenizer(str(model.path)),
        spec.chunk_tokens,
        spec.chunk_overlap,
        spec.limits.max_document_chunks,
    )


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
        max_document_chunks: The most chunks of one document: the cut of a longer one
            stops at one more, so a book-sized record costs the tokenizing of that many
            chunks, not of all of it.
    """

    def __init__(
        self,
        tokenizer: Any,
        chunk_tokens: int,
        overlap: int = 0,
        max_document_chunks: int = InputLimits().max_document_chunks,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise EmbedFleetError(
                "the first dense model has no fast tokenizer", "Use a model with tokenizer.json"
            )
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.window = chunk_tokens - tokenizer.num_special_tokens_to_add(pair=False)
        self.overlap = overlap
        self.max_document_chunks = max_document_chunks
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
        # The Rust tokenizer itself, without the truncation or padding its tokenizer.json
        # may set (the Hugging Face wrapper turns them off on every call): offsets and
        # word ids of many texts in one call, with no Python object per token.
        self._rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._rust.no_truncation()
        self._rust.no_padding()
        self.identity = tokens.tokenizer_identity(tokenizer.backend_tokenizer)
        self.id_dtype = tokens.id_dtype(self._rust.get_vocab_size(with_added_tokens=True))
        self.word_separable = _word_separable(self._rust)
        """Whether a text's ids are the ids of its words, each alone (BERT's WordPiece
        behind a whitespace-and-punctuation pre-tokenizer), so a chunk cut between
        words, or stripped of surrounding whitespace, has the slice of its document's
        ids. Not so for byte-level BPE or SentencePiece, which mark a word's leading
        space in its first token: their chunks are tokenised again."""

    def chunk(self, doc: Document) -> list[Chunk] | None:
        """All chunks of a document; an empty list for a document with no text, ``None``
        for one of more than ``max_document_chunks``."""
        return self.chunk_many([doc])[0]

    def chunk_many(self, docs: Sequence[Document]) -> list[list[Chunk] | None]:
        """The chunks of each document (see :meth:`cut`)."""
        return [None if cut is None else [c for c, _ in cut] for cut in self.cut(docs)]

    def cut(self, docs: Sequence[Document]) -> list[list[tuple[Chunk, list[int]]] | None]:
        """The chunks of each document, each with its text's token ids (no special
        tokens). Texts of one segment are tokenised together in one call, and one that
        fits the window is one chunk at once: most documents of a retrieval corpus take
        no per-token work in Python at all.

        A chunk's ids are the slice of its document's that it covers when the tokenizer
        is :attr:`word_separable`; otherwise a chunk that is not its whole document's
        text is tokenised once more, all such chunks of the group in one call.

        A document of more than ``max_document_chunks`` chunks gets ``None``.
        """
        fulls = [f"{d.title}{TITLE_SEPARATOR}{d.text}" if d.title.strip() else d.text for d in docs]
        whole = [i for i, full in enumerate(fulls) if full.strip() and len(full) <= SEGMENT_CHARS]
        encoded = self._rust.encode_batch([fulls[i] for i in whole], add_special_tokens=False)
        encodings = dict(zip(whole, encoded, strict=True))
        out: list[list[tuple[Chunk, list[int]]] | None] = []
        again: list[tuple[list[int], Chunk]] = []  # chunks whose ids need their own call
        for i, (doc, full) in enumerate(zip(docs, fulls, strict=True)):
            if not full.strip():
                out.append([])
                continue
            first = encodings.get(i)
            windows: list[tuple[int, int, list[int]]]
            if first is not None and len(first.offsets) <= self.window:
                offsets = first.offsets
                windows = [(offsets[0][0], offsets[-1][1], first.ids)] if offsets else []
            else:
                windows = list(
                    itertools.islice(self._windows(full, first), self.max_document_chunks + 1)
                )
                if len(windows) > self.max_document_chunks:
                    out.append(None)
                    continue
            cut: list[tuple[Chunk, list[int]]] = []
            for chunk, (_, _, window_ids) in zip(
                self._chunks(doc, full, windows), windows, strict=True
            ):
                if self.word_separable or chunk.text == full:
                    cut.append((chunk, window_ids))
                else:
                    cut.append((chunk, []))
                    again.append((cut[-1][1], chunk))
            out.append(cut)
        if again:
            texts = [chunk.text for _, chunk in again]
            encoded = self._rust.encode_batch(texts, add_special_tokens=False)
            # Filled in place: each placeholder list is the one in ``out``.
            for (placeholder, _), encoding in zip(again, encoded, strict=True):
                placeholder.extend(encoding.ids)
        return out

    def _chunks(
        self, doc: Document, full: str, windows: list[tuple[int, int, list[int]]]
    ) -> list[Chunk]:
        """A document's chunks from their (start, end, ids) in ``full``."""
        body_offset = len(full) - len(doc.text)
        chunks: list[Chunk] = []
        for start, end, window_ids in windows:
            n_tokens = len(window_ids)
            chunks.append(
                Chunk(
                    chunk_id=ids.chunk_id(doc.id, len(chunks)),
                    doc_id=doc.id,
                    index=len(chunks),
                    text=full[start:end],
                    n_tokens=n_tokens,
                    span=(max(0, start - body_offset), max(0, end - body_offset)),
                    metadata=doc.metadata,
                )
            )
        return chunks

    def _windows(self, text: str, first: Any = None) -> Iterator[tuple[int, int, list[int]]]:
        """The (start, end, ids) of each window of a text longer than one window:
        ``window`` tokens, cut back to where a word starts (unless one word fills the
        window), the next starting ``overlap`` tokens back, moved on to a word start.
        Segment by segment, keeping only the tokens a window still needs, so a long
        document streams through. ``first``: a one-segment text's encoding, made."""
        starts: list[int] = []
        ends: list[int] = []
        token_ids: list[int] = []
        words: list[tuple[int, int]] = []  # equal for the pieces of one word
        base = 0  # stream position of starts[0]
        at = 0  # where the next window starts, in the lists
        emitted_to = 0  # stream position one past the last token emitted
        for segment, (lo, hi) in enumerate(_segments(text)):
            encoding = first or self._rust.encode(text[lo:hi], add_special_tokens=False)
            position = base + len(starts)
            starts += [lo + s for s, _ in encoding.offsets]
            ends += [lo + e for _, e in encoding.offsets]
            token_ids += encoding.ids
            words += [
                (segment, word if word is not None else -(position + k))
                for k, word in enumerate(encoding.word_ids)
            ]
            while at + self.window < len(starts):  # window + 1 tokens: cut at a word start
                cut = self.window
                while cut > 0 and words[at + cut] == words[at + cut - 1]:
                    cut -= 1
                if cut == 0:  # one word longer than the window
                    cut = self.window
                yield starts[at], ends[at + cut - 1], token_ids[at : at + cut]
                emitted_to = base + at + cut
                nxt = max(1, cut - self.overlap)
                while nxt < cut and words[at + nxt] == words[at + nxt - 1]:
                    nxt += 1
                at += nxt
            del starts[:at], ends[:at], token_ids[:at], words[:at]
            base, at = base + at, 0
        if starts and base + len(starts) - 1 >= emitted_to:
            yield starts[0], ends[-1], token_ids


@dataclass
class ChunkTally:
    """What :func:`chunk_batches` cut so far: chunks, tokens, documents without text."""

    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    empty: list[str] = field(default_factory=list)
    too_long: list[SkippedRecord] = field(default_factory=list)
    """Documents of more chunks than the chunker's ``max_document_chunks``, as bad
    records (not counted in ``documents``), in reading order."""


@dataclass
class ChunkRun:
    """A batch's worth of chunks, with their token ids as the staged batch keeps them, and
    where each stands in reading order within its like-length window (``ChunkBatch.
    reading``; empty: in reading order)."""

    chunks: list[Chunk]
    tokens: StagedTokens
    reading: list[int] = field(default_factory=list)

    def staged(self, job_id: str, batch_id: str) -> ChunkBatch:
        """The staged batch of this run: its chunks, their ids and their reading order."""
        return ChunkBatch(
            job_id=job_id,
            batch_id=batch_id,
            chunks=self.chunks,
            tokens=self.tokens,
            reading=self.reading,
        )


# Staged batches sorted by length together (``JobSpec.sort_window``). Each unit's model
# batches are cut from its chunks sorted by length, and a staged batch of 128 chunks in
# reading order spans nearly every length: its model batches padded MiniLM's Cranfield
# chunks to 1.18x their tokens in bf16 (bare encode, sorting all 1,837: 1.01x). Sorted
# 16 batches at a time: 1.05x, and 15 units took 28.4 s instead of 34.9 (dense) and
# 34.2 s instead of 37.5 (SPLADE) on a 2-core EPYC. 2,048 chunks held at once while
# cutting, and a window's vectors while a part is written.
LIKE_LENGTH_BATCHES = 16


def like_length_window(batch_chunks: int, part_rows: int) -> int:
    """How many staged batches a job sorts by length together: :data:`LIKE_LENGTH_BATCHES`,
    fewer where a window would hold more chunks than an export part (a part holds whole
    windows, so that it can write their chunks back in reading order)."""
    return max(1, min(LIKE_LENGTH_BATCHES, part_rows // max(1, batch_chunks)))


def chunk_batches(
    chunker: Chunker,
    documents: Iterable[Document],
    batch_chunks: int,
    tally: ChunkTally,
    on_too_long: Callable[[SkippedRecord], None] | None = None,
    window: int = 1,
) -> Iterator[ChunkRun]:
    """The documents' chunks in batches of ``batch_chunks`` (the last one smaller), with
    their ids: how the producer and a chunk unit alike cut what they stage. A document
    of too many chunks stages none: it goes to ``tally.too_long``, and ``on_too_long``
    (if given) is called with it first, so a caller under ``--on-bad-record fail`` can
    stop there.

    With ``window`` above 1, every ``window`` batches' worth of chunks (in reading order)
    are sorted longest first, ties in reading order, before they are cut, and each run
    says where its chunks stand in reading order within the window (``reading``): batches
    of like lengths, whose model batches pad little. With 1, batches in reading order."""
    pending: list[Chunk] = []
    pending_ids: list[list[int]] = []
    held = batch_chunks * max(1, window)

    def runs() -> Iterator[ChunkRun]:
        if window <= 1:
            yield ChunkRun(pending, tokens.pack(chunker.identity, chunker.id_dtype, pending_ids))
            return
        order = sorted(range(len(pending)), key=lambda i: -len(pending_ids[i]))
        for start in range(0, len(order), batch_chunks):
            rows = order[start : start + batch_chunks]
            yield ChunkRun(
                chunks=[pending[i] for i in rows],
                tokens=tokens.pack(
                    chunker.identity, chunker.id_dtype, [pending_ids[i] for i in rows]
                ),
                reading=rows,
            )

    docs = iter(documents)
    while group := list(itertools.islice(docs, CHUNK_GROUP)):
        for doc, cut in zip(group, chunker.cut(group), strict=True):
            if cut is None:
                record = SkippedRecord(
                    path=doc.path, line=doc.line, reason=too_many_chunks(chunker)
                )
                if on_too_long is not None:
                    on_too_long(record)
                tally.too_long.append(record)
                continue
            tally.documents += 1
            if not cut:
                tally.empty.append(doc.id)
            for chunk, chunk_ids in cut:
                pending.append(chunk)
                pending_ids.append(chunk_ids)
                tally.chunks += 1
                tally.tokens += chunk.n_tokens
                if len(pending) >= held:
                    yield from runs()
                    pending, pending_ids = [], []
    if pending:
        yield from runs()


def too_many_chunks(chunker: Chunker) -> str:
    """The reason a document cut into too many chunks is bad, with the options."""
    return (
        f"more than {chunker.max_document_chunks:,} chunks of {chunker.chunk_tokens} tokens "
        "(--max-document-chunks; or split the document)"
    )


# Texts whose pieces (cut between words, as windows are) show whether a tokenizer is
# word-separable: punctuation, digits, accents, CJK, emoji, a long word, line breaks
# and surrounding whitespace.
_SEPARABILITY_PROBES = (
    "  The boundary-layer (δ ≈ 0.37x/Re^0.2) thickens; at M=2.5 shocks form.\n\nNext ",
    "naïve café 東京タワー 😀 supercalifragilisticexpialidocious, e.g. U.S.A.-made 3.14159",
    "\tline one\nline two\r\n\u00a0non-breaking\u2003em space end.\t",
)


def _word_separable(rust: Any) -> bool:
    """Whether every run of whole words of the probes tokenises, alone, to the slice
    of the probe's ids it covers (see :attr:`Chunker.word_separable`)."""
    for probe in _SEPARABILITY_PROBES:
        encoding = rust.encode(probe, add_special_tokens=False)
        ids, offsets, words = encoding.ids, encoding.offsets, encoding.word_ids
        starts = [k for k in range(len(ids)) if k == 0 or words[k] != words[k - 1]]
        bounds = [*starts, len(ids)]
        pieces = [(a, b) for a, b in itertools.combinations(bounds, 2) if b - a <= 12]
        texts = [probe[offsets[a][0] : offsets[b - 1][1]] for a, b in pieces]
        for (a, b), again in zip(
            pieces, rust.encode_batch(texts, add_special_tokens=False), strict=True
        ):
            if again.ids != ids[a:b]:
                return False
    return True


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
