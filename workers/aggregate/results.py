"""The aggregator's side of the query phases: final candidate order, ``results.jsonl``
lines, the rankings handed to the evaluation, and the manifest's ``rerank_run``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from shared.records.ids import doc_id_of
from shared.records.schemas import (
    DENSE_RANKING,
    Candidate,
    CrossEncoderRerankRun,
    LatencySummary,
    ModelInfo,
    QueryCandidates,
    QueryResult,
    RerankStats,
)
from workers.ranking.evaluation import document_ranking

FUSED, RERANKED = "fused", "reranked"


def final_order(candidates: list[Candidate], scores: list[float | None] | None) -> list[Candidate]:
    """Candidates in final order, ranked 1..n.

    The first ``len(scores)`` candidates were sent to the reranker. Those it scored are
    sorted by rerank score (ties keep fused order) into the positions of the reranked
    ones; a candidate it could not score (a batch that ran out of time everywhere) keeps
    its fused position, so a fallback never moves anything. The rest stay in fused order.
    """
    out = list(candidates)
    if scores:
        head = out[: len(scores)]
        scored = [i for i, s in enumerate(scores) if s is not None]
        ranked = sorted(scored, key=lambda i: (-(scores[i] or 0.0), i))
        for slot, source in zip(scored, ranked, strict=True):
            out[slot] = head[source]
            out[slot].rerank_score = round(float(scores[source] or 0.0), 6)
    for rank, candidate in enumerate(out, start=1):
        candidate.rank = rank
    return out


def query_result(query: QueryCandidates, scores: list[float | None] | None) -> QueryResult:
    return QueryResult(
        query_id=query.query_id, text=query.text, candidates=final_order(query.candidates, scores)
    )


class RankingCollector:
    """Document rankings per ranking name and query, for the evaluation."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, list[str]]] = {}

    def add(self, query: QueryCandidates, result: QueryResult, reranked: bool) -> None:
        for name, hits in query.rankings.items():
            label = name if name == DENSE_RANKING else f"sparse:{name}"
            self._put(label, query.query_id, [doc_id_of(c) for c in hits.chunk_ids])
        self._put(FUSED, query.query_id, [c.doc_id for c in query.candidates])
        if reranked:
            self._put(RERANKED, query.query_id, [c.doc_id for c in result.candidates])

    def _put(self, name: str, query_id: str, doc_ids: list[str]) -> None:
        self.runs.setdefault(name, {})[query_id] = document_ranking(doc_ids)


def rerank_run(
    stats: Iterable[RerankStats],
    info: ModelInfo | None,
    queries: int,
    latency: LatencySummary,
) -> CrossEncoderRerankRun:
    """Sum the rerank tasks' statistics into the manifest's ``rerank_run``."""
    asked = scored = oom = timeouts = budget = 0
    sizes: Counter[int] = Counter()
    fallbacks: Counter[str] = Counter()
    for part in stats:
        asked += part.pairs_asked
        scored += part.pairs_scored
        oom += part.oom_count
        timeouts += part.timeout_count
        sizes.update(part.batch_sizes)
        fallbacks.update(part.fallbacks)
        budget = max(budget, part.max_batch_tokens)
    return CrossEncoderRerankRun(
        model=info,
        device=info.device if info else "",
        dtype=info.dtype if info else "",
        queries=queries,
        pairs_asked=asked,
        pairs_scored=scored,
        coverage=round(scored / asked, 4) if asked else 1.0,
        batch_sizes=dict(sorted(sizes.items())),
        oom_count=oom,
        timeout_count=timeouts,
        fallbacks=dict(fallbacks),
        max_batch_tokens=budget,
        latency=latency,
    )
