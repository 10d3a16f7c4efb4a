"""Retrieval evaluation: chunk -> document rankings, and nDCG@10 / Recall@100 / MRR@10
through pytrec_eval on tiny cases worked out by hand.

trec_eval's nDCG uses the grade itself as the gain and log2(rank + 1) as the discount:
DCG = sum_rank grade / log2(rank + 1). Every expected number below is computed in a
comment, not by the code under test.
"""

from __future__ import annotations

import pytest

from workers.ranking.evaluation import document_ranking, evaluate

# 1 / log2(3) = 0.6309298
INV_LOG2_3 = 0.6309298

# q1: relevant d1 (grade 3), d2 (grade 1); d3 judged non-relevant.
# run [d1, x, d2]: grade 3 at rank 1, grade 1 at rank 3
#   DCG  = 3/log2(2) + 1/log2(4) = 3 + 0.5           = 3.5
#   IDCG = 3/log2(2) + 1/log2(3) = 3 + 0.6309298     = 3.6309298
#   nDCG = 3.5 / 3.6309298                           = 0.9639404
#   recall = 2/2 = 1; first relevant at rank 1 -> MRR 1
Q1_NDCG = 0.9639404
# q2: relevant d4 (grade 1); run [y, d4]
#   DCG = 1/log2(3) = 0.6309298; IDCG = 1/log2(2) = 1 -> nDCG 0.6309298
#   recall = 1/1 = 1; first relevant at rank 2 -> MRR 1/2
QRELS = {
    "q1": {"d1": 3, "d2": 1, "d3": 0},
    "q2": {"d4": 1},
}
RUN = {"q1": ["d1", "x", "d2"], "q2": ["y", "d4"]}


def test_document_ranking_keeps_each_documents_best_chunk() -> None:
    assert document_ranking(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]
    assert document_ranking([]) == []


def test_graded_ndcg_recall_and_mrr() -> None:
    metrics, evaluator = evaluate(QRELS, {"dense": RUN})
    m = metrics["dense"]
    # nDCG: (0.9639404 + 0.6309298) / 2 = 1.5948702 / 2 = 0.7974351 -> 0.7974
    assert m.ndcg_at_10 == pytest.approx(0.7974)
    # recall: (1 + 1) / 2 = 1
    assert m.recall_at_100 == pytest.approx(1.0)
    # MRR: (1 + 1/2) / 2 = 0.75
    assert m.mrr_at_10 == pytest.approx(0.75)
    assert m.queries == 2
    assert evaluator.startswith("pytrec_eval-terrier ")
    assert "(ndcg_cut_10, recall_100, recip_rank over the top 10)" in evaluator


def test_single_query_values() -> None:
    metrics, _ = evaluate({"q1": QRELS["q1"]}, {"dense": {"q1": RUN["q1"]}})
    # nDCG 3.5 / 3.6309298 = 0.9639404 -> 0.9639
    assert metrics["dense"].ndcg_at_10 == pytest.approx(0.9639)
    metrics, _ = evaluate({"q2": QRELS["q2"]}, {"dense": {"q2": RUN["q2"]}})
    # nDCG 1/log2(3) = 0.6309298 -> 0.6309; MRR 1/2
    assert metrics["dense"].ndcg_at_10 == pytest.approx(round(INV_LOG2_3, 4))
    assert metrics["dense"].mrr_at_10 == pytest.approx(0.5)


def test_judged_query_missing_from_the_run_counts_as_zero() -> None:
    qrels = {**QRELS, "q3": {"d5": 2}}
    for run in ({**RUN}, {**RUN, "q3": []}):  # absent, or an empty list
        metrics, _ = evaluate(qrels, {"dense": run})
        m = metrics["dense"]
        # nDCG: (0.9639404 + 0.6309298 + 0) / 3 = 1.5948702 / 3 = 0.5316234 -> 0.5316
        assert m.ndcg_at_10 == pytest.approx(0.5316)
        # recall: (1 + 1 + 0) / 3 = 0.6666667 -> 0.6667
        assert m.recall_at_100 == pytest.approx(0.6667)
        # MRR: (1 + 0.5 + 0) / 3 = 0.5
        assert m.mrr_at_10 == pytest.approx(0.5)
        assert m.queries == 3


def test_unjudged_run_queries_are_ignored() -> None:
    # q4 has no judgements; q5 is judged but has no grade > 0, so it is not judged.
    qrels = {**QRELS, "q5": {"d9": 0}}
    run = {**RUN, "q4": ["d1"], "q5": ["d9"]}
    metrics, _ = evaluate(qrels, {"dense": run})
    m = metrics["dense"]
    # same as q1 and q2 alone: nDCG 0.7974, recall 1, MRR 0.75 over 2 queries
    assert (m.ndcg_at_10, m.recall_at_100, m.mrr_at_10, m.queries) == pytest.approx(
        (0.7974, 1.0, 0.75, 2)
    )


def test_relevant_document_at_rank_11_does_not_count_for_mrr_at_10() -> None:
    run = [f"n{i}" for i in range(10)] + ["d"]  # d at rank 11
    metrics, _ = evaluate({"q": {"d": 1}}, {"dense": {"q": run}})
    m = metrics["dense"]
    # MRR@10: nothing relevant in the top 10 -> 0 (plain recip_rank would give 1/11)
    assert m.mrr_at_10 == 0.0
    # nDCG@10: nothing relevant in the top 10 -> DCG 0 -> 0
    assert m.ndcg_at_10 == 0.0
    # recall@100: d is within the top 100 -> 1/1
    assert m.recall_at_100 == pytest.approx(1.0)


def test_recall_at_100_cuts_at_100() -> None:
    # a at rank 1, 99 non-relevant, b at rank 101
    run = ["a"] + [f"n{i}" for i in range(99)] + ["b"]
    metrics, _ = evaluate({"q": {"a": 1, "b": 1}}, {"dense": {"q": run}})
    # recall@100: only a within the top 100 -> 1/2
    assert metrics["dense"].recall_at_100 == pytest.approx(0.5)


def test_order_is_ours_not_by_doc_id() -> None:
    # "z" ranked first; sorting by doc id (or ties) would put "a" first.
    metrics, _ = evaluate({"q": {"z": 1}}, {"dense": {"q": ["z", "a"]}})
    # relevant at rank 1 -> MRR 1, nDCG 1/log2(2) / 1 = 1
    assert metrics["dense"].mrr_at_10 == pytest.approx(1.0)
    assert metrics["dense"].ndcg_at_10 == pytest.approx(1.0)


def test_negative_grades_are_non_relevant() -> None:
    metrics, _ = evaluate({"q": {"bad": -1, "d": 1}}, {"dense": {"q": ["bad", "d"]}})
    m = metrics["dense"]
    # "bad" at rank 1 is non-relevant (gain 0), d at rank 2:
    #   DCG = 0 + 1/log2(3) = 0.6309298; IDCG = 1 -> nDCG 0.6309; MRR 1/2
    assert m.ndcg_at_10 == pytest.approx(0.6309)
    assert m.mrr_at_10 == pytest.approx(0.5)


def test_repeated_documents_count_at_their_first_position() -> None:
    # [d1, d1, x, d2] as a document ranking is [d1, x, d2], i.e. q1's run
    metrics, _ = evaluate({"q1": QRELS["q1"]}, {"dense": {"q1": ["d1", "d1", "x", "d2"]}})
    assert metrics["dense"].ndcg_at_10 == pytest.approx(0.9639)


def test_several_rankings_and_no_judged_queries() -> None:
    metrics, _ = evaluate(QRELS, {"dense": RUN, "bm25": {"q2": ["d4"]}})
    # bm25: q1 missing -> 0; q2 d4 at rank 1 -> 1. nDCG (0 + 1)/2 = 0.5, MRR 0.5, recall 0.5
    b = metrics["bm25"]
    assert (b.ndcg_at_10, b.recall_at_100, b.mrr_at_10) == pytest.approx((0.5, 0.5, 0.5))
    assert metrics["dense"].mrr_at_10 == pytest.approx(0.75)
    # no query with a grade > 0: every mean is 0 over 0 queries
    empty, _ = evaluate({"q": {"d": 0}}, {"dense": {"q": ["d"]}})
    assert (empty["dense"].ndcg_at_10, empty["dense"].queries) == (0.0, 0)
