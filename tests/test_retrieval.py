"""The retrieve phase: partial top-k lists over groups of shards, merged at the
aggregator, equal a single-process brute-force search; the final candidate order."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shared.records.schemas import Candidate, DenseShard, Hits, Matrix
from workers.aggregate.results import final_order
from workers.inference.dense import l2_normalise
from workers.ranking.retrieval import dense_top_k, merge_hits, sparse_top_k, top_indices


def brute_force(scores: list[float], ids: list[str], k: int) -> list[str]:
    """Sort everything by (score desc, id asc): the definition the fleet must match."""
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    return [ids[i] for i in order[:k]]


def test_top_indices_breaks_ties_by_id() -> None:
    ids = ["d", "b", "a", "c", "e"]
    scores = [0.5, 0.9, 0.5, 0.5, 0.1]
    # 0.9 (b) first, then the three 0.5s by id: a, c, d.
    assert [ids[i] for i in top_indices(scores, ids, 3)] == ["b", "a", "c"]
    assert [ids[i] for i in top_indices(scores, ids, 10)] == ["b", "a", "c", "d", "e"]


def dense_shards(rng: np.random.Generator, batches: int, rows: int, dim: int) -> list[DenseShard]:
    shards = []
    for b in range(batches):
        vectors = l2_normalise(rng.normal(size=(rows, dim)))
        if b % 3 == 1:
            vectors[1] = vectors[0]  # identical vectors: exact ties inside a shard
        shards.append(
            DenseShard(
                job_id="j",
                batch_id=f"b{b:06d}",
                chunk_ids=[f"doc{b}-{r}#0" for r in range(rows)],
                vectors={"m1": Matrix.from_numpy(vectors), "m2": Matrix.from_numpy(-vectors)},
            )
        )
    # a duplicate of an earlier shard's rows under other ids: exact ties across groups
    twin = shards[0]
    shards.append(
        DenseShard(
            job_id="j",
            batch_id="b999999",
            chunk_ids=[f"twin-{c}" for c in twin.chunk_ids],
            vectors=dict(twin.vectors),
        )
    )
    return shards


@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_dense_partial_lists_merge_to_brute_force(group_size: int) -> None:
    rng = np.random.default_rng(3)
    shards = dense_shards(rng, batches=9, rows=40, dim=16)
    queries = {"m1": l2_normalise(rng.normal(size=(25, 16)))}
    queries["m2"] = l2_normalise(rng.normal(size=(25, 16)))
    k = 30
    groups = [shards[i : i + group_size] for i in range(0, len(shards), group_size)]
    partial = [dense_top_k(queries, group, k) for group in groups]
    merged = [merge_hits([p[q] for p in partial], k) for q in range(25)]

    ids = [c for s in shards for c in s.chunk_ids]
    for q in range(25):
        scores = []
        for shard in shards:
            for row in range(len(shard.chunk_ids)):
                # the ensemble score, computed here one pair at a time in float64
                total = sum(
                    float(np.dot(queries[m][q], shard.vectors[m].to_numpy()[row]))
                    for m in ("m1", "m2")
                )
                scores.append(total / 2)
        expected = brute_force(scores, ids, k)
        assert merged[q].chunk_ids == expected
        np.testing.assert_allclose(
            merged[q].scores,
            sorted((scores[ids.index(c)] for c in expected), reverse=True),
            atol=1e-6,
        )


def test_sparse_partial_lists_merge_to_brute_force() -> None:
    rng = random.Random(5)
    vocab = [f"t{i}" for i in range(30)]

    def vector() -> dict[str, float]:
        return {t: float(rng.choice([0.5, 1.0, 2.0])) for t in rng.sample(vocab, 4)}

    queries = {"bm25": [vector() for _ in range(20)], "splade": [vector() for _ in range(20)]}
    shards = []
    for b in range(8):
        ids = [f"d{b}-{r}#0" for r in range(25)]
        rows = {m: [vector() if r % 7 else {} for r in range(25)] for m in queries}
        shards.append((f"b{b}", ids, rows))
    k = 15
    groups = [shards[i : i + 3] for i in range(0, len(shards), 3)]
    partial = [sparse_top_k(queries, group, k) for group in groups]
    all_ids = [c for _, ids, _ in shards for c in ids]
    for model, query_vectors in queries.items():
        for q, query in enumerate(query_vectors):
            merged = merge_hits([p[model][q] for p in partial], k)
            scores = [
                sum(w * row.get(t, 0.0) for t, w in query.items())
                for _, _, rows in shards
                for row in rows[model]
            ]
            assert merged.chunk_ids == brute_force(scores, all_ids, k), (model, q)
            # Every hit names the batch its chunk came from (d<b>-<r>#0 is in b<b>).
            assert merged.batch_ids == [f"b{c[1:].split('-')[0]}" for c in merged.chunk_ids]


def candidates(n: int) -> list[Candidate]:
    return [
        Candidate(
            chunk_id=f"c{i}#0",
            doc_id=f"c{i}",
            dense_score=None,
            sparse_score={},
            fused_score=1 - i / 10,
        )
        for i in range(n)
    ]


def test_final_order_reranks_the_head_and_keeps_the_tail() -> None:
    out = final_order(candidates(5), [0.1, 0.9, 0.5])
    assert [c.chunk_id for c in out] == ["c1#0", "c2#0", "c0#0", "c3#0", "c4#0"]
    assert [c.rank for c in out] == [1, 2, 3, 4, 5]
    assert [c.rerank_score for c in out] == [0.9, 0.5, 0.1, None, None]


def test_unreranked_candidates_keep_their_fused_slot() -> None:
    # c1 was not scored: it stays at rank 2; c0 and c2 swap around it.
    out = final_order(candidates(4), [0.2, None, 0.8])
    assert [c.chunk_id for c in out] == ["c2#0", "c1#0", "c0#0", "c3#0"]
    assert out[1].rerank_score is None


def test_merge_of_empty_lists() -> None:
    assert merge_hits([Hits([], []), Hits(["a#0"], [1.0])], 5).chunk_ids == ["a#0"]
