"""Chunking with the real tokenizer of the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from shared.inputs.chunking import (
    SEGMENT_CHARS,
    Chunker,
    ChunkTally,
    chunk_batches,
    like_length_window,
    load_tokenizer,
)
from shared.inputs.models import resolve_model
from shared.inputs.tokens import unpack
from shared.records.errors import EmbedFleetError
from shared.records.schemas import Chunk, Document

WORDS = [
    "alpha",
    "embedding",
    "antidisestablishmentarianism",
    "internationalization",
    "photosynthesis",
    "x",
    "river",
    "quantum",
    "electroencephalography",
    "tea",
    "zebra",
    "microarchitecture",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(str(resolve_model("all-MiniLM-L6-v2").path))


def n_tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def prose(n_words: int, seed: int = 0) -> str:
    """Words only (no punctuation), many of them several word pieces long."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def assert_word_boundaries(text: str, chunks: list[Chunk]) -> None:
    """Every chunk starts and ends where a whitespace-separated word does."""
    for chunk in chunks:
        start, end = chunk.span
        assert start == 0 or text[start - 1].isspace(), (
            chunk.chunk_id,
            text[start - 5 : start + 5],
        )
        assert end == len(text) or text[end].isspace(), (chunk.chunk_id, text[end - 5 : end + 5])
        assert not chunk.text[0].isspace() and not chunk.text[-1].isspace()


def test_ids_are_stable_and_numbered(tok: Any) -> None:
    chunker = Chunker(tok, 32, 4)
    doc = Document(id="doc-7", text=prose(300), title="A title", metadata={"k": "v"})
    first = chunker.chunk(doc)
    second = Chunker(tok, 32, 4).chunk(doc)
    assert len(first) > 3
    assert first == second
    assert [c.chunk_id for c in first] == [f"doc-7#{n}" for n in range(len(first))]
    assert [c.index for c in first] == list(range(len(first)))
    assert all(c.doc_id == "doc-7" for c in first)
    assert all(c.metadata == {"k": "v"} for c in first)


def test_title_goes_on_the_first_chunk_only(tok: Any) -> None:
    title = "Zanzibar Quarterly"
    doc = Document(id="d", text=prose(300, seed=1), title=title)
    chunks = Chunker(tok, 32).chunk(doc)
    assert len(chunks) > 2
    assert chunks[0].text.startswith(title + "\n\n")
    assert chunks[0].span[0] == 0
    for chunk in chunks[1:]:
        assert "Zanzibar" not in chunk.text
    # Without a title (or a blank one) nothing is prepended.
    for blank in ("", "   "):
        plain = Chunker(tok, 32).chunk(Document(id="d", text=doc.text, title=blank))
        assert plain[0].text == doc.text[: len(plain[0].text)]


@pytest.mark.parametrize(("chunk_tokens", "overlap"), [(16, 0), (32, 0), (32, 7), (128, 20)])
def test_chunks_fit_the_window_when_retokenised(tok: Any, chunk_tokens: int, overlap: int) -> None:
    doc = Document(
        id="d",
        text=prose(800, seed=chunk_tokens) + ". Punctuation, too; (and) brackets!",
        title="Title words",
    )
    chunks = Chunker(tok, chunk_tokens, overlap).chunk(doc)
    assert len(chunks) > 3
    for chunk in chunks:
        assert n_tokens(tok, chunk.text) == chunk.n_tokens
        assert 0 < chunk.n_tokens <= chunk_tokens - 2
    # Windows are filled, not cut needlessly short: most chunks come close to the limit
    # (a cut only moves back over the pieces of one word).
    longest_word = max(n_tokens(tok, w) for w in WORDS)
    for chunk in chunks[:-1]:
        assert chunk.n_tokens > chunk_tokens - 2 - longest_word


def test_chunks_end_on_word_boundaries(tok: Any) -> None:
    text = prose(1000, seed=3)
    chunks = Chunker(tok, 24).chunk(Document(id="d", text=text))
    assert len(chunks) > 10
    assert_word_boundaries(text, chunks)
    # No overlap: the chunks together are exactly the document's words, in order.
    assert " ".join(c.text for c in chunks).split() == text.split()


def test_word_longer_than_the_window_is_split(tok: Any) -> None:
    rng = random.Random(5)
    monster = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(90))
    assert n_tokens(tok, monster) > 14  # longer than the window of 16 - 2
    text = f"start here {monster} end there"
    chunks = Chunker(tok, 16).chunk(Document(id="d", text=text))
    assert len(chunks) >= 2
    assert all(c.n_tokens <= 14 for c in chunks)
    # Nothing is lost or repeated: the spans tile the text (gaps are whitespace only).
    assert chunks[0].span[0] == 0
    assert chunks[-1].span[1] == len(text)
    for a, b in itertools.pairwise(chunks):
        assert a.span[1] <= b.span[0]
        assert text[a.span[1] : b.span[0]].strip() == ""
    assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_overlap_shares_text_between_consecutive_chunks(tok: Any) -> None:
    text = prose(600, seed=4)
    doc = Document(id="d", text=text)
    with_overlap = Chunker(tok, 32, 8).chunk(doc)
    without = Chunker(tok, 32, 0).chunk(doc)
    assert len(with_overlap) > len(without) > 3
    for a, b in itertools.pairwise(with_overlap):
        assert b.span[0] < a.span[1], "consecutive chunks should overlap"
        assert b.span[0] > a.span[0], "every chunk must move forward"
        shared = text[b.span[0] : a.span[1]]
        assert shared.strip()
        assert a.text.endswith(shared)
        assert b.text.startswith(shared)
        assert n_tokens(tok, shared) <= 8
    for a, b in itertools.pairwise(without):
        assert b.span[0] >= a.span[1], "chunks without overlap must not share text"
    assert_word_boundaries(text, with_overlap)


def test_spans_map_back_into_the_document(tok: Any) -> None:
    text = "Intro line.\n\n" + prose(400, seed=6) + "\n\nLast paragraph, with commas."
    for title in ("", "Some heading"):
        doc = Document(id="d", text=text, title=title)
        chunks = Chunker(tok, 32, 5).chunk(doc)
        assert len(chunks) > 3
        for chunk in chunks:
            start, end = chunk.span
            assert 0 <= start < end <= len(text)
            piece = text[start:end]
            assert piece in chunk.text
            if not (title and chunk.index == 0):
                assert piece == chunk.text
        assert chunks[-1].span[1] == len(text)
    titled = Chunker(tok, 32).chunk(Document(id="d", text=text, title="Some heading"))
    assert titled[0].text == "Some heading\n\n" + text[: titled[0].span[1]]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n"])
def test_empty_document_has_no_chunks(tok: Any, text: str) -> None:
    assert Chunker(tok, 32).chunk(Document(id="e", text=text)) == []


def test_title_only_document_is_one_chunk(tok: Any) -> None:
    chunks = Chunker(tok, 32).chunk(Document(id="t", text="", title="Only a title"))
    assert len(chunks) == 1
    assert chunks[0].text.startswith("Only a title")
    assert chunks[0].span == (0, 0)


def test_short_document_is_one_chunk(tok: Any) -> None:
    text = "  A short note about rivers.  "
    chunks = Chunker(tok, 256).chunk(Document(id="s", text=text))
    assert len(chunks) == 1
    assert chunks[0].text == text.strip()
    assert chunks[0].n_tokens == n_tokens(tok, text)


# --- a long document -------------------------------------------------------------------


class CountingTokenizer:
    """A chunker's own (Rust) tokenizer, recording how many characters each call is given."""

    def __init__(self, chunker: Chunker) -> None:
        self.inner = chunker._rust
        self.calls: list[int] = []
        chunker._rust = self  # type: ignore[assignment]

    def encode(self, text: str, **kwargs: Any) -> Any:
        self.calls.append(len(text))
        return self.inner.encode(text, **kwargs)

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        self.calls += [len(text) for text in texts]
        return self.inner.encode_batch(texts, **kwargs)


def big_text(chars: int) -> str:
    rng = random.Random(42)
    parts: list[str] = []
    total = 0
    while total < chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        part = sentence.capitalize() + (". " if rng.random() < 0.8 else ".\n\n")
        parts.append(part)
        total += len(part)
    return "".join(parts)


@pytest.fixture(scope="module")
def big(tok: Any) -> tuple[str, list[Chunk], CountingTokenizer]:
    text = big_text(5_000_000)
    chunker = Chunker(tok, 256)
    counting = CountingTokenizer(chunker)
    chunks = chunker.chunk(Document(id="big", text=text))
    return text, chunks, counting


def test_big_document_chunks_fit(tok: Any, big: tuple[str, list[Chunk], CountingTokenizer]) -> None:
    text, chunks, _ = big
    assert len(chunks) > len(text) // (254 * 8)  # far more than a handful
    assert [c.index for c in chunks] == list(range(len(chunks)))
    lengths = [
        len(ids) for ids in tok([c.text for c in chunks], add_special_tokens=False)["input_ids"]
    ]
    assert lengths == [c.n_tokens for c in chunks]
    assert max(lengths) <= 254


def test_big_document_is_covered(big: tuple[str, list[Chunk], CountingTokenizer]) -> None:
    text, chunks, _ = big
    assert chunks[0].span[0] == len(text) - len(text.lstrip())
    assert chunks[-1].span[1] == len(text.rstrip())
    for a, b in itertools.pairwise(chunks):
        assert a.span[1] <= b.span[0]
        assert text[a.span[1] : b.span[0]].strip() == "", (a.chunk_id, b.chunk_id)
    for chunk in chunks[:: max(1, len(chunks) // 200)]:
        assert text[chunk.span[0] : chunk.span[1]] == chunk.text
    assert sum(len(c.text.split()) for c in chunks) >= len(text.split())
    rebuilt = " ".join(c.text for c in chunks)
    assert rebuilt.replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_big_document_is_tokenised_in_segments(
    tok: Any, big: tuple[str, list[Chunk], CountingTokenizer]
) -> None:
    text, _, counting = big
    assert max(counting.calls) <= SEGMENT_CHARS
    assert sum(counting.calls) == len(text)
    assert len(counting.calls) >= len(text) // SEGMENT_CHARS
    # Windows stream out as segments are read: the first chunk needs one segment only.
    chunker = Chunker(tok, 256)
    lazy = CountingTokenizer(chunker)
    windows = chunker._windows(text)
    next(windows)
    assert len(lazy.calls) == 1


def test_segment_cut_respects_any_whitespace(tok: Any) -> None:
    rng = random.Random(1)
    text = "\t".join(rng.choice(WORDS[2:5]) for _ in range(6000))
    assert len(text) > 2 * SEGMENT_CHARS and " " not in text and "\n" not in text
    chunks = Chunker(tok, 64).chunk(Document(id="tsv", text=text))
    lengths = [
        len(ids) for ids in tok([c.text for c in chunks], add_special_tokens=False)["input_ids"]
    ]
    assert lengths == [c.n_tokens for c in chunks]


# --- options ---------------------------------------------------------------------------


def test_overlap_limits(tok: Any) -> None:
    window = 64 - tok.num_special_tokens_to_add(pair=False)
    Chunker(tok, 64, window // 2)  # the largest overlap allowed
    with pytest.raises(EmbedFleetError) as info:
        Chunker(tok, 64, window // 2 + 1)
    assert "--chunk-overlap" in str(info.value)
    with pytest.raises(EmbedFleetError):
        Chunker(tok, 64, -1)


def test_chunk_tokens_too_small(tok: Any) -> None:
    special = tok.num_special_tokens_to_add(pair=False)
    Chunker(tok, 8 + special)  # the smallest window allowed
    for too_small in (7 + special, 2, 0):
        with pytest.raises(EmbedFleetError) as info:
            Chunker(tok, too_small)
        assert "--chunk-tokens" in str(info.value)


def test_like_length_windows_sort_their_batches_and_say_the_reading_order(tok: Any) -> None:
    """Three batches of four at a time are sorted longest first; each chunk keeps its
    ids, and its place in reading order puts the window back as a window of 1 cuts it."""
    docs = [Document(id=f"d{i}", text=prose(5 + (i * 37) % 120, seed=i)) for i in range(40)]
    plain = list(chunk_batches(Chunker(tok, 32), docs, 4, ChunkTally()))
    windowed = list(chunk_batches(Chunker(tok, 32), docs, 4, ChunkTally(), window=3))
    assert all(not run.reading for run in plain)
    assert [len(run.chunks) for run in windowed] == [len(run.chunks) for run in plain]
    reading = [chunk.chunk_id for run in plain for chunk in run.chunks]
    ids_of = {
        c.chunk_id: list(i)
        for run in plain
        for c, i in zip(run.chunks, unpack(run.tokens), strict=True)
    }
    spread = 0
    for start in range(0, len(windowed), 3):
        runs = windowed[start : start + 3]
        chunks = [chunk for run in runs for chunk in run.chunks]
        lengths = [len(i) for run in runs for i in unpack(run.tokens)]
        assert lengths == sorted(lengths, reverse=True)
        spread += max(lengths) - min(lengths)
        positions = [row for run in runs for row in run.reading]
        assert sorted(positions) == list(range(len(chunks)))
        back = [chunk.chunk_id for _, chunk in sorted(zip(positions, chunks, strict=True))]
        assert back == reading[start * 4 : start * 4 + len(chunks)]
        for run in runs:
            for chunk, token_ids in zip(run.chunks, unpack(run.tokens), strict=True):
                assert list(token_ids) == ids_of[chunk.chunk_id]
    assert spread > 0  # the chunks had different lengths to sort


def test_a_window_holds_no_more_chunks_than_an_export_part() -> None:
    assert like_length_window(128, 100_000) == 16
    assert like_length_window(128, 300) == 2
    assert like_length_window(128, 20) == like_length_window(8, 4) == 1
