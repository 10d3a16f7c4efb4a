"""Retrieval quality of each ranking against relevance judgements, with pytrec_eval.

The fleet ranks chunks, but judgements (qrels) grade documents, so a chunk ranking is
first turned into a document ranking by :func:`document_ranking`: a document takes the
rank of its best chunk (max over its chunks), as BEIR does for passage-split corpora.

:func:`evaluate` then computes, per ranking, the mean over the judged queries of

* nDCG@10 (``ndcg_cut_10``), with the graded judgements as gains;
* Recall@100 (``recall_100``);
* MRR@10 (``recip_rank`` on the list truncated to its first 10 documents; trec_eval's
  ``recip_rank`` alone looks at the whole list).

pytrec_eval (trec_eval's own C code) is used rather than a reimplementation so that the
numbers are those reported in papers and by BEIR. Two of its habits are corrected for:

* It orders a run by score, breaking ties by document id, and ignores the order it was
  given; so each document is given ``len(list) - position`` as its score, which
  reproduces our order exactly.
* It averages only over the queries present in the run, silently dropping a judged
  query the run has no documents for; that would reward a retriever for returning
  nothing on hard queries. Here every judged query counts, and a missing (or empty) one
  scores 0 on every measure.

A query is judged when at least one document has a grade > 0; a query without any
relevant document has no defined recall or nDCG and is left out, as trec_eval does.
Grades <= 0 are non-relevant (gain 0). Queries of a run that are not judged are ignored.
"""

from __future__ import annotations

from importlib import metadata

import pytrec_eval

from shared.records.schemas import RankingMetrics

__all__ = ["EVALUATOR_MEASURES", "document_ranking", "evaluate", "evaluator_description"]

NDCG = "ndcg_cut_10"
RECALL = "recall_100"
MRR = "recip_rank"
MRR_DEPTH = 10
"""MRR is computed on the first ``MRR_DEPTH`` documents of each list."""

EVALUATOR_MEASURES = f"{NDCG}, {RECALL}, {MRR} over the top {MRR_DEPTH}"

DECIMALS = 4
"""Metrics are rounded to this many decimals: enough to compare runs, no false precision."""


def document_ranking(doc_ids_in_chunk_order: list[str]) -> list[str]:
    """Turn a chunk ranking into a document ranking.

    Why: judgements grade documents, and a document is as relevant as its best passage,
    so it takes the rank of its best (first) chunk; its later chunks add nothing.

    Args:
        doc_ids_in_chunk_order: The document id of each ranked chunk, best chunk first.

    Returns:
        Document ids, each once, at the position of its first occurrence.
    """
    return list(dict.fromkeys(doc_ids_in_chunk_order))


def evaluator_description() -> str:
    """Name the evaluator and its version, recorded in ``metrics.json`` for audit."""
    try:
        version = metadata.version("pytrec-eval-terrier")
    except metadata.PackageNotFoundError:
        version = str(getattr(pytrec_eval, "__version__", "unknown"))
    return f"pytrec_eval-terrier {version} ({EVALUATOR_MEASURES})"


def _as_run(ranked: dict[str, list[str]], depth: int | None = None) -> dict[str, dict[str, float]]:
    """Scores for pytrec_eval that reproduce each list's order exactly (no ties).

    A document repeated in a list keeps its first position (see :func:`document_ranking`);
    queries with an empty list are left out (they are scored 0 by the caller).
    """
    run: dict[str, dict[str, float]] = {}
    for query_id, doc_ids in ranked.items():
        docs = document_ranking(doc_ids)[:depth]
        if docs:
            run[query_id] = {doc_id: float(len(docs) - i) for i, doc_id in enumerate(docs)}
    return run


def _mean(per_query: dict[str, dict[str, float]], measure: str, judged: list[str]) -> float:
    """Mean of one measure over every judged query, 0 where pytrec_eval has none."""
    if not judged:
        return 0.0
    total = sum(per_query.get(query_id, {}).get(measure, 0.0) for query_id in judged)
    return round(total / len(judged), DECIMALS)


def evaluate(
    qrels: dict[str, dict[str, int]], runs: dict[str, dict[str, list[str]]]
) -> tuple[dict[str, RankingMetrics], str]:
    """Score each ranking against the judgements.

    Args:
        qrels: Query id -> document id -> grade (> 0 relevant; higher is better).
        runs: Ranking name -> query id -> ranked document ids, best first (see
            :func:`document_ranking`).

    Returns:
        Per ranking, its :class:`RankingMetrics` (means over all judged queries, rounded
        to 4 decimals; ``queries`` is the number of judged queries), and a description
        of the evaluator for ``metrics.json``.
    """
    judged_qrels = {
        query_id: {doc_id: max(grade, 0) for doc_id, grade in grades.items()}
        for query_id, grades in qrels.items()
        if any(grade > 0 for grade in grades.values())
    }
    judged = sorted(judged_qrels)
    full = pytrec_eval.RelevanceEvaluator(judged_qrels, {NDCG, RECALL})
    top = pytrec_eval.RelevanceEvaluator(judged_qrels, {MRR})

    metrics: dict[str, RankingMetrics] = {}
    for name, ranked in runs.items():
        judged_run = {query_id: ranked[query_id] for query_id in judged if query_id in ranked}
        full_scores: dict[str, dict[str, float]] = full.evaluate(_as_run(judged_run))
        top_scores: dict[str, dict[str, float]] = top.evaluate(_as_run(judged_run, MRR_DEPTH))
        metrics[name] = RankingMetrics(
            ndcg_at_10=_mean(full_scores, NDCG, judged),
            recall_at_100=_mean(full_scores, RECALL, judged),
            mrr_at_10=_mean(top_scores, MRR, judged),
            queries=len(judged),
        )
    return metrics, evaluator_description()
