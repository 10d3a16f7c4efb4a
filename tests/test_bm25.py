"""BM25 computed the fleet's way (per-batch statistics merged at the aggregator) equals
bm25s over the whole collection in one pass."""

from __future__ import annotations

import json
import random

import bm25s
import numpy as np
import pytest
import Stemmer
from conftest import CRANFIELD

from shared.records.schemas import BM25Params, SparseRow
from workers.inference.engine import Inference
from workers.inference.sparse import SparseVectorGenerator, bm25_tokenize
from workers.ranking.sparse_weights import BM25Statistics


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines()]
    return [f"{d['title']}\n\n{d['text']}" for d in docs]


@pytest.fixture(scope="module")
def queries() -> list[str]:
    return [
        json.loads(line)["text"] for line in (CRANFIELD / "queries.jsonl").read_text().splitlines()
    ]


def merged(corpus: list[str], batch_size: int) -> tuple[BM25Statistics, list[SparseRow]]:
    stats = BM25Statistics(BM25Params(k1=1.2, b=0.75))
    rows: list[SparseRow] = []
    for start in range(0, len(corpus), batch_size):
        batch_rows, doc_freqs = SparseVectorGenerator(Inference())._bm25(
            corpus[start : start + batch_size]
        )
        stats.add(batch_rows, doc_freqs)
        rows += batch_rows
    return stats, rows


def test_statistics_merged_from_batches_equal_one_pass(corpus) -> None:
    one, _ = merged(corpus, len(corpus))
    many, _ = merged(corpus, 37)
    assert many.documents == one.documents == len(corpus)
    assert many.total_length == one.total_length
    assert many.doc_freqs == one.doc_freqs


def test_scores_equal_bm25s_for_every_cranfield_query(corpus, queries) -> None:
    stats, rows = merged(corpus, 128)
    weights = [stats.weights(row) for row in rows]
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    retriever.index(
        bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False),
        show_progress=False,
    )
    assert len(queries) == 225
    compared = 0
    for query, terms in zip(queries, bm25_tokenize(queries), strict=True):
        known = [t for t in terms if t in retriever.vocab_dict]
        if not known:
            continue
        expected = retriever.get_scores(known)
        # The fleet's score: a sparse dot product of query term counts and chunk weights.
        ours = np.array([sum(w.get(t, 0.0) for t in terms) for w in weights])
        np.testing.assert_allclose(ours, expected, atol=1e-4, err_msg=query)
        compared += 1
    assert compared >= 220


def test_tokenisation_is_bm25s(corpus) -> None:
    sample = random.Random(7).sample(corpus, 20)
    expected = bm25s.tokenize(
        sample,
        stopwords="en",
        stemmer=Stemmer.Stemmer("english"),
        return_ids=False,
        show_progress=False,
    )
    assert bm25_tokenize(sample) == expected
