"""Token ids computed once: staged with the chunks, laid out per model, and vectors equal
to the models' own ``encode`` / ``predict`` (the real models, the real loading code).

Every encoder here is compared in fp32 with sentence-transformers on the same texts, at
most 1e-5 apart: all-MiniLM-L6-v2 from the staged ids, a model with a byte-level BPE
tokenizer of its own (tokenized in the worker, truncated at its own limit), a model with
a query prompt (its own ``preprocess``), SPLADE-tiny from the staged ids, and a
CrossEncoder whose passages come from the staged ids.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from crossencoder import build_tiny_cross_encoder
from test_dense import chunker
from tiny_models import bpe_tokenizer, build_bpe_sentence_transformer, build_prompted_minilm

from shared.inputs import tokens
from shared.inputs.chunking import Chunker, ChunkTally, chunk_batches, load_tokenizer
from shared.inputs.models import BUNDLED_SPLADE, DEFAULT_DENSE_MODEL, resolve_model
from shared.records.schemas import Candidate, ChunkBatch, Document, FusedGroup, QueryCandidates
from workers.inference import dense
from workers.inference.batch_runner import (
    model_dtype,
    pad_multiple,
    padded_width,
    token_budget_batches,
)
from workers.inference.engine import Inference
from workers.inference.feed import StagedIds, encode_inputs, staged_ids, text_feed
from workers.inference.layout import _longest_first_many, learn_layout
from workers.inference.rerank import load_cross_encoder, pairs_feed, rerank_fused
from workers.inference.sparse import SparseVectorGenerator

CRANFIELD = Path(__file__).resolve().parents[1] / "examples" / "cranfield" / "corpus.jsonl"
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cranfield(count: int) -> list[Document]:
    lines = CRANFIELD.read_text().splitlines()[:count]
    records = [json.loads(line) for line in lines]
    return [Document(id=r["_id"], text=r["text"], title=r.get("title", "")) for r in records]


def staged(
    docs: list[Document], batch_chunks: int = 64, cut: Chunker | None = None
) -> list[ChunkBatch]:
    """The batches the chunk stage stages for these documents (with their ids)."""
    runs = chunk_batches(cut or chunker(), docs, batch_chunks, ChunkTally())
    return [
        ChunkBatch(job_id="j", batch_id=f"b{i:05d}", chunks=run.chunks, tokens=run.tokens)
        for i, run in enumerate(runs)
    ]


@pytest.fixture(scope="module")
def batches() -> list[ChunkBatch]:
    return staged(cranfield(120))


@pytest.fixture(scope="module")
def texts(batches: list[ChunkBatch]) -> list[str]:
    return [chunk.text for batch in batches for chunk in batch.chunks]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("feed-models")
    return {
        "bpe": str(build_bpe_sentence_transformer(folder / "bpe")),
        "prompted": str(build_prompted_minilm(folder / "prompted")),
        "cross": str(build_tiny_cross_encoder(folder / "cross")),
    }


# --- staged ids --------------------------------------------------------------------------


def test_staged_ids_are_what_the_tokenizer_gives(batches: list[ChunkBatch]) -> None:
    tokenizer = chunker().tokenizer
    for batch in batches:
        assert batch.tokens is not None and batch.tokens.dtype == "uint16"
        expected = tokenizer([c.text for c in batch.chunks], add_special_tokens=False)
        got = [ids.tolist() for ids in tokens.unpack(batch.tokens)]
        assert got == expected["input_ids"]
        assert [len(ids) for ids in got] == [c.n_tokens for c in batch.chunks]
    # Two bytes an id: a batch's ids are smaller than its texts.
    size = sum(len(b.tokens.ids) for b in batches if b.tokens)
    assert size < sum(len(t.encode()) for b in batches for t in (c.text for c in b.chunks))


@pytest.mark.parametrize("overlap", [0, 24])
def test_windows_of_a_long_document_keep_exact_ids(overlap: int) -> None:
    """A long document's windows are slices of its ids for a word-separable tokenizer
    (WordPiece), and tokenised again for one that is not (byte-level BPE); either way
    each chunk's ids are exactly its own text's."""
    text = " ".join(doc.text for doc in cranfield(40))
    word_piece = Chunker(chunker().tokenizer, 96, overlap)
    bpe = Chunker(bpe_tokenizer(), 96, overlap)  # type: ignore[arg-type]
    assert word_piece.word_separable and not bpe.word_separable
    for cut in (word_piece, bpe):
        (chunks,) = cut.cut([Document(id="long", text=f"  {text}\n")])
        assert len(chunks) > 5
        expected = cut.tokenizer([c.text for c, _ in chunks], add_special_tokens=False)
        assert [ids for _, ids in chunks] == expected["input_ids"]


def test_identity_is_what_decides_the_ids() -> None:
    minilm = load_tokenizer(str(resolve_model(DEFAULT_DENSE_MODEL).path))
    splade = load_tokenizer(str(resolve_model(BUNDLED_SPLADE).path))
    identity = tokens.tokenizer_identity(minilm.backend_tokenizer)
    # The two tokenizer.json files differ only in truncation and padding.
    assert tokens.tokenizer_identity(splade.backend_tokenizer) == identity
    backend = minilm.backend_tokenizer
    backend.enable_truncation(17)
    backend.enable_padding(length=40)
    assert tokens.tokenizer_identity(backend) == identity
    other = load_tokenizer(str(resolve_model(DEFAULT_DENSE_MODEL).path))
    other.add_tokens(["hypersonicity"])
    assert tokens.tokenizer_identity(other.backend_tokenizer) != identity
    assert tokens.tokenizer_identity(bpe_tokenizer().backend_tokenizer) != identity  # type: ignore[attr-defined]


def test_ids_pack_in_two_or_four_bytes() -> None:
    small = tokens.pack("t", tokens.id_dtype(30522), [[1, 2, 65535], [], [7]])
    assert small.dtype == "uint16" and len(small.ids) == 8
    assert [ids.tolist() for ids in tokens.unpack(small)] == [[1, 2, 65535], [], [7]]
    large = tokens.pack("t", tokens.id_dtype(250_002), [[70_000, 3]])
    assert large.dtype == "uint32" and tokens.unpack(large)[0].tolist() == [70_000, 3]
    small.lengths[0] = 4
    with pytest.raises(ValueError, match="lengths"):
        tokens.unpack(small)


# --- layouts --------------------------------------------------------------------------


def test_pair_truncation_is_the_tokenizers_longest_first() -> None:
    """Against the real tokenizer: every combination of side lengths around a limit."""
    tokenizer = chunker().tokenizer
    rng = random.Random(5)
    words = ["flow", "wedge", "shock", "layer"]
    for _ in range(120):
        n1, n2, limit = rng.randint(0, 70), rng.randint(0, 70), rng.randint(4, 60)
        a, b = (" ".join(rng.choices(words, k=n)) for n in (n1, n2))
        # Lists: a lone empty second text would not be taken for a pair.
        kept = []
        for first, second in ((a, b), (b, a)):  # either side the longer
            encoded = tokenizer([first], [second], truncation="longest_first", max_length=limit + 3)
            types = encoded["token_type_ids"][0]
            kept.append((types.count(0) - 2, types.count(1) - 1))
        # The rule for a unit's pairs at once, both orders in one call.
        many = _longest_first_many(np.array([n1, n2]), np.array([n2, n1]), limit)
        assert [tuple(int(k) for k in keep) for keep in zip(*many, strict=True)] == kept, (
            n1,
            n2,
            limit,
        )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pairs", [False, True])
def test_a_layout_pads_on_the_tokenizers_side(side: str, pairs: bool) -> None:
    """A tokenizer that pads on the left (a decoder's) or the right, for texts and pairs:
    the layout is learned only if its batches equal the tokenizer's own (learn_layout
    checks every probe), and a batch of a few items of other lengths equals it too."""
    tokenizer = load_tokenizer(str(resolve_model(DEFAULT_DENSE_MODEL).path))  # its own copy
    tokenizer.padding_side = side

    def own(items: list[Any]) -> dict[str, Any]:
        if pairs:
            queries, passages = [list(side) for side in zip(*items, strict=True)]
            return dict(
                tokenizer(queries, passages, padding=True, truncation=True, return_tensors="pt")
            )
        return dict(tokenizer(items, padding=True, truncation=True, return_tensors="pt"))

    layout = learn_layout(tokenizer, own, pairs)
    assert layout is not None and layout.left_padding == (side == "left")
    texts = ["flow", "a shock wave ahead of a blunt body", "heat transfer " * 300, "x y"]
    items: list[Any] = [(t, texts[-1 - i]) for i, t in enumerate(texts)] if pairs else texts
    rust = tokenizer.backend_tokenizer
    ids = [
        tuple(
            np.asarray(rust.encode(t, add_special_tokens=False).ids, dtype=np.int64)
            for t in (item if pairs else [item])
        )
        for item in items
    ]
    mine = layout.tensors([layout.fit(item) for item in ids])
    for key, value in own(items).items():
        assert torch.equal(mine[key], value), key


def test_special_tokens_of_two_type_ids_and_shared_pieces_lay_out_as_a_tokenizer_would() -> None:
    """A pair template whose separator between the texts mixes type ids (``</s>`` of the
    query's type, then ``</s>`` of the passage's): the special tokens are split where
    the type steps, and every pair, laid out from pieces that several pairs share
    (truncated longest-first, on the right and on the left), has the ids and type ids
    written out by hand here."""
    from types import SimpleNamespace

    from workers.inference.layout import InputLayout, Pieces, _template

    encoding = SimpleNamespace(ids=[0, 5, 2, 2, 6, 2], type_ids=[0, 0, 0, 1, 1, 1])
    pair = _template(encoding, [[5], [6]])
    assert pair is not None
    assert [(p.tokens, p.slot, p.slot_type) for p in pair.parts] == [
        ((0,), None, 0),
        ((), 0, 0),
        ((2,), None, 0),
        ((2,), None, 0),
        ((), 1, 1),
        ((2,), None, 0),
    ]
    assert [p.types for p in pair.parts if p.slot is None] == [(0,), (0,), (1,), (1,)]
    single = _template(SimpleNamespace(ids=[0, 5, 2], type_ids=[0, 0, 0]), [[5]])
    assert single is not None
    queries = [np.array([11, 12], dtype=np.int64), np.array([13], dtype=np.int64)]
    passages = [np.arange(20, 20 + n, dtype=np.int64) for n in (1, 9, 3)]
    query_of, passage_of = np.array([0, 1, 0, 1]), np.array([0, 1, 1, 2])
    for left in (False, True):
        layout = InputLayout(single, pair, 10, 1, 0, False, left, ("input_ids", "token_type_ids"))
        arranged = layout.arrange_pieces(
            [(Pieces.of(queries), query_of), (Pieces.of(passages), passage_of)]
        )
        expected_ids, expected_types = [], []
        for q, p in zip(query_of, passage_of, strict=True):
            a, b = queries[q].tolist(), passages[p].tolist()
            keep_b = min(len(b), 10 - 4 - len(a))  # the query is the shorter: kept whole
            b = b[len(b) - keep_b :] if left else b[:keep_b]
            expected_ids.append([0, *a, 2, 2, *b, 2])
            expected_types.append([0] * (len(a) + 2) + [1] * (len(b) + 2))
        assert arranged.lengths.tolist() == [len(ids) for ids in expected_ids]
        batch = arranged.tensors([3, 0, 1, 2])
        width = max(map(len, expected_ids))
        for row, item in enumerate([3, 0, 1, 2]):
            pad = width - len(expected_ids[item])
            assert batch["input_ids"][row].tolist() == expected_ids[item] + [1] * pad
            assert batch["token_type_ids"][row].tolist() == expected_types[item] + [0] * pad


def test_a_layout_is_refused_when_it_cannot_reproduce_preprocess() -> None:
    tokenizer = chunker().tokenizer

    def shuffled(texts: list[Any]) -> dict[str, Any]:
        out = dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
        out["input_ids"] = out["input_ids"].flip(1)  # what no layout lays out
        return out

    def plain(texts: list[Any]) -> dict[str, Any]:
        return dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))

    assert learn_layout(tokenizer, shuffled) is None
    assert learn_layout(tokenizer, plain) is not None


# --- encoders equal to the bare library ------------------------------------------------


def test_dense_ensemble_equals_encode_whatever_each_tokenizer(
    models: dict[str, str], batches: list[ChunkBatch], texts: list[str]
) -> None:
    """One ensemble: MiniLM from the staged ids, a model with a tokenizer of its own
    (tokenized in the worker, truncated at its 128 ids), each equal to its own encode."""
    from sentence_transformers import SentenceTransformer

    inference = Inference(requested_device="cpu")
    names = [DEFAULT_DENSE_MODEL, models["bpe"]]
    outcome = dense.encode_batches(inference, batches, names, max_batch_tokens=2048, dtype="fp32")
    assert [s.batch_id for s in outcome.shards] == [b.batch_id for b in batches]
    assert sum(p.items for p in outcome.parts) == len(texts)
    folders = {
        DEFAULT_DENSE_MODEL: resolve_model(DEFAULT_DENSE_MODEL).path,
        str(Path(models["bpe"]).resolve()): Path(models["bpe"]),
    }
    assert list(outcome.shards[0].vectors) == list(folders)
    for name, folder in folders.items():
        bare = SentenceTransformer(str(folder), device="cpu").encode(
            texts, normalize_embeddings=True, batch_size=32
        )
        fleet = np.concatenate([s.vectors[name].to_numpy() for s in outcome.shards])
        assert np.abs(fleet - bare).max() <= TOLERANCE, name
    loaded = dense.load_dense(inference, models["bpe"], "fp32")
    inputs = encode_inputs(inference, "dense", loaded.info.name, loaded.model, "documents")
    feed = text_feed(inputs, texts, staged_ids(batches, inputs.identity), lambda i: 0)
    assert (feed.source, feed.tokenized) == ("tokenized", len(texts))
    assert max(feed.lengths) == 128  # its own limit, not the chunk stage's
    minilm = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "fp32")
    inputs = encode_inputs(inference, "dense", minilm.info.name, minilm.model, "documents")
    feed = text_feed(inputs, texts, staged_ids(batches, inputs.identity), lambda i: 0)
    assert (feed.source, feed.tokenized) == ("staged", 0)  # nothing tokenized again


def test_a_unit_of_staged_and_unstaged_batches_lays_out_as_preprocess(
    batches: list[ChunkBatch],
) -> None:
    """Items with staged ids and items the worker tokenizes, interleaved and picked out
    of order (as a unit's distinct texts are), give preprocess's own tensors; a batch
    whose ids are for another number of chunks is named."""
    inference = Inference(requested_device="cpu")
    loaded = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "fp32")
    inputs = encode_inputs(inference, "dense", loaded.info.name, loaded.model, "documents")
    bare = msgspec.structs.replace(batches[1], tokens=None)
    unit = [batches[0], bare, batches[2]]
    every = [chunk.text for batch in unit for chunk in batch.chunks]
    picked = [*range(len(every) - 1, 0, -3), 0, 1]
    feed = text_feed(
        inputs, [every[i] for i in picked], staged_ids(unit, inputs.identity).pick(picked), len
    )
    unstaged = range(len(batches[0].chunks), len(batches[0].chunks) + len(bare.chunks))
    assert (feed.source, feed.tokenized) == ("tokenized", len(set(picked) & set(unstaged)))
    assert 0 < feed.tokenized < len(picked)
    mine = feed.features(loaded.model, list(range(len(picked))), "cpu")
    theirs = loaded.model.preprocess([every[i] for i in picked])
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(mine[key], theirs[key]), key
    assert batches[0].tokens is not None
    short = msgspec.structs.replace(batches[0], chunks=batches[0].chunks[:-1], batch_id="b-short")
    with pytest.raises(ValueError, match="b-short holds ids for"):
        staged_ids([short], inputs.identity)


def test_a_bf16_model_on_a_cpu_gets_widths_of_16_and_the_same_vectors(
    batches: list[ChunkBatch], texts: list[str]
) -> None:
    """What bounds a bf16 worker's memory (batch_runner.pad_multiple): its batches are
    laid out 16 wide, the extra columns padding the mask hides, so each row's vector is
    the one the exact width gives; in fp32 the widths stay exact."""
    import torch

    inference = Inference(requested_device="cpu")
    loaded = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "bf16")
    model = loaded.model
    assert model_dtype(model) == torch.bfloat16
    inputs = encode_inputs(inference, "dense", loaded.info.name, model, "documents")
    feed = text_feed(inputs, texts, staged_ids(batches, inputs.identity), lambda i: 0)
    assert feed.arranged is not None
    groups = token_budget_batches(feed.lengths, 2048, pad_multiple("cpu", torch.bfloat16))
    odd = [g for g in groups if max(feed.lengths[i] for i in g) % 16]
    assert odd, "no batch whose longest item is off a multiple of 16"
    for group in odd[:4]:
        rounded = feed.features(model, group, "cpu")
        exact = feed.arranged.tensors(group)
        width = exact["input_ids"].shape[1]
        assert rounded["input_ids"].shape[1] == padded_width(width, 16) > width
        for key, value in exact.items():
            if isinstance(value, torch.Tensor):  # (not the layout's extras: modality)
                assert torch.equal(rounded[key][:, :width], value)
        assert not rounded["attention_mask"][:, width:].any()
        with torch.inference_mode():
            got = model(rounded)["sentence_embedding"].float()
            want = model(exact)["sentence_embedding"].float()
        cosine = torch.nn.functional.cosine_similarity(got, want)
        assert cosine.min() > 0.999, cosine.min()
    fp32 = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "fp32").model
    group = odd[0]
    assert feed.features(fp32, group, "cpu")["input_ids"].shape[1] == max(
        feed.lengths[i] for i in group
    )


def test_queries_with_a_prompt_equal_encode_query(models: dict[str, str]) -> None:
    from sentence_transformers import SentenceTransformer

    queries = ["what is a shock wave", "boundary layer transition on a flat plate", "x"]
    cut = chunker()
    ids = cut.tokenizer(queries, add_special_tokens=False)["input_ids"]
    batch = staged([Document(id=f"q{i}", text=q) for i, q in enumerate(queries)])[0]
    batch.tokens = tokens.pack(cut.identity, cut.id_dtype, ids)
    inference = Inference(requested_device="cpu")
    for folder, source in ((models["prompted"], "preprocess"), (DEFAULT_DENSE_MODEL, "staged")):
        outcome = dense.encode_batches(inference, [batch], [folder], kind="queries", dtype="fp32")
        bare = SentenceTransformer(str(resolve_model(folder).path), device="cpu").encode_query(
            queries, normalize_embeddings=True
        )
        (matrix,) = outcome.shard.vectors.values()
        assert np.abs(matrix.to_numpy() - bare).max() <= TOLERANCE
        loaded = dense.load_dense(inference, folder, "fp32")
        inputs = encode_inputs(inference, "dense", loaded.info.name, loaded.model, "queries")
        assert (
            text_feed(inputs, queries, staged_ids([batch], inputs.identity), lambda i: 9).source
            == source
        )
    # The prompt changes the vectors: the comparison above could fail.
    prompted = SentenceTransformer(models["prompted"], device="cpu")
    assert np.abs(prompted.encode_query(queries) - prompted.encode(queries)).max() > 0.01


def test_splade_equals_sparse_encoder_from_staged_ids(
    batches: list[ChunkBatch], texts: list[str]
) -> None:
    from sentence_transformers import SparseEncoder

    inference = Inference(requested_device="cpu")
    generator = SparseVectorGenerator(inference, "cpu", 1024, dtype="fp32")
    outcome = generator.encode_batches(batches[:2], [BUNDLED_SPLADE])
    rows = [row for shard in outcome.shards for row in shard.rows[BUNDLED_SPLADE]]
    n = len(rows)
    model = SparseEncoder(str(resolve_model(BUNDLED_SPLADE).path), device="cpu")
    bare = model.encode(texts[:n], convert_to_tensor=True).to_dense().numpy()
    vocab = generator.vocabularies[BUNDLED_SPLADE]
    index = {term: i for i, term in enumerate(vocab)}
    for i, row in enumerate(rows):
        assert row.source == "live"
        mine = np.zeros(bare.shape[1], dtype=np.float64)
        mine[[index[t] for t in row.tokens]] = row.weights
        assert np.abs(mine - bare[i]).max() <= TOLERANCE
        assert set(np.flatnonzero(bare[i])) == {index[t] for t in row.tokens}


def test_rerank_from_staged_passages_equals_predict(
    models: dict[str, str], batches: list[ChunkBatch]
) -> None:
    """The fuse step hands the reranker the passages' staged ids (the tiny CrossEncoder
    has MiniLM's tokenizer): each query is tokenized once, no passage again, and the
    scores are predict's. Two groups scored together (a rerank message of several)
    each get their own queries' scores and pairs; the call's batches count once."""
    from sentence_transformers import CrossEncoder

    chunks = [chunk for batch in batches for chunk in batch.chunks][:40]
    ids = [ids for batch in batches for ids in tokens.unpack(batch.tokens)][:40]  # type: ignore[arg-type]
    queries = [
        QueryCandidates(
            query_id=f"q{n}",
            text=text,
            candidates=[
                Candidate(
                    chunk_id=c.chunk_id,
                    doc_id=c.doc_id,
                    dense_score=None,
                    sparse_score={},
                    fused_score=1.0,
                )
                for c in chunks[n::2]
            ],
        )
        for n, text in enumerate(["what is a shock wave", "heat transfer to a flat plate"])
    ]
    identity = chunker().identity
    group = FusedGroup(
        job_id="j",
        group_id="q-g00000",
        queries=queries,
        texts={c.chunk_id: c.text for c in chunks},
        tokenizer=identity,
        ids={c.chunk_id: tokens.to_bytes(i, "uint16") for c, i in zip(chunks, ids, strict=True)},
    )
    # The same candidates as two groups of one query each.
    halves = [
        msgspec.structs.replace(group, group_id=f"q-g0000{n}", queries=[query])
        for n, query in enumerate(queries)
    ]
    inference = Inference(requested_device="cpu")
    shards, _ = rerank_fused(inference, halves, models["cross"], 50, "fp32")
    (whole,), _ = rerank_fused(inference, [group], models["cross"], 50, "fp32")
    bare = CrossEncoder(models["cross"], device="cpu")
    for shard, query in zip(shards, queries, strict=True):
        assert list(shard.scores) == [query.query_id]
        pairs = [(query.text, group.texts[c.chunk_id]) for c in query.candidates]
        expected = bare.predict(pairs)
        got = np.array(shard.scores[query.query_id], dtype=np.float64)
        assert np.abs(got - expected).max() <= TOLERANCE
        assert shard.stats.pairs_asked == shard.stats.pairs_scored == len(pairs)
    assert np.ptp(expected) > 0.01
    assert shards[0].stats.batch_sizes == whole.stats.batch_sizes
    assert not shards[1].stats.batch_sizes
    assert sum(s.stats.tokens for s in shards) == whole.stats.tokens
    loaded = load_cross_encoder(inference, models["cross"], "cpu", "fp32")
    pairs = [(q.text, group.texts[c.chunk_id]) for q in queries for c in q.candidates]
    passage_ids = StagedIds.of_arrays(
        [tokens.from_bytes(group.ids[c.chunk_id], "uint16") for q in queries for c in q.candidates]
    )
    feed = pairs_feed(inference, loaded.model, loaded.info.name, pairs, passage_ids, identity)
    assert (feed.source, feed.tokenized) == ("staged", 0)
    other = pairs_feed(inference, loaded.model, loaded.info.name, pairs, passage_ids, "tok1:other")
    assert other.tokenized == len({p for _, p in pairs}) and other.lengths == feed.lengths
    mine = feed.features(loaded.model, list(range(len(pairs))), "cpu")
    theirs = loaded.model.preprocess([list(p) for p in pairs])
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(mine[key], theirs[key])


def test_a_text_a_unit_holds_twice_is_encoded_once_and_both_rows_get_its_vector() -> None:
    """Repeated passages (the same documents again under other ids): MiniLM and SPLADE
    run on each distinct text once; every repeat's row is its first row's, bit for bit,
    and all rows still equal the models' own encode of every text."""
    from sentence_transformers import SentenceTransformer, SparseEncoder

    originals = cranfield(30)
    copies = [Document(id=f"{d.id}-copy", text=d.text, title=d.title) for d in originals[:12]]
    batches = staged([*originals, *copies], batch_chunks=16)
    chunks = [chunk for batch in batches for chunk in batch.chunks]
    texts = [chunk.text for chunk in chunks]
    distinct = len(set(texts))
    assert distinct < len(texts)
    first = {text: texts.index(text) for text in texts}
    repeats = [(i, first[t]) for i, t in enumerate(texts) if first[t] != i]
    inference = Inference(requested_device="cpu")

    outcome = dense.encode_batches(inference, batches, [DEFAULT_DENSE_MODEL], dtype="fp32")
    assert sum(outcome.batch_sizes) == distinct  # model rows: each distinct text once
    assert [p.items for p in outcome.parts] == [len(b.chunks) for b in batches]
    fleet = np.concatenate([s.vectors[DEFAULT_DENSE_MODEL].to_numpy() for s in outcome.shards])
    for row, earlier in repeats:
        assert fleet[row].tobytes() == fleet[earlier].tobytes()
    bare = SentenceTransformer(str(resolve_model(DEFAULT_DENSE_MODEL).path), device="cpu")
    assert np.abs(fleet - bare.encode(texts, normalize_embeddings=True)).max() <= TOLERANCE

    generator = SparseVectorGenerator(inference, "cpu", 1024, dtype="fp32")
    outcome = generator.encode_batches(batches, [BUNDLED_SPLADE])
    assert sum(outcome.batch_sizes) == distinct
    rows = [row for shard in outcome.shards for row in shard.rows[BUNDLED_SPLADE]]
    for row, earlier in repeats:
        assert (rows[row].tokens, rows[row].weights) == (
            rows[earlier].tokens,
            rows[earlier].weights,
        )
    model = SparseEncoder(str(resolve_model(BUNDLED_SPLADE).path), device="cpu")
    bare_sparse = model.encode(texts, convert_to_tensor=True).to_dense().numpy()
    index = {term: i for i, term in enumerate(generator.vocabularies[BUNDLED_SPLADE])}
    for i, row in enumerate(rows):
        mine = np.zeros(bare_sparse.shape[1], dtype=np.float64)
        mine[[index[t] for t in row.tokens]] = row.weights
        assert row.source == "live" and np.abs(mine - bare_sparse[i]).max() <= TOLERANCE
