"""The aggregator's step after retrieval: fuse, then fan the rerank phase out.

Each query's partial top-k lists (one per retrieve unit) are merged into its global
top-k per ranking, the rankings are fused (:mod:`workers.ranking.fusion`), the fused
candidates are written per group of queries, and one rerank unit is enqueued per group
(none when the job does not rerank: the rerank phase then opens empty and the export
follows at once). Idempotent: a redelivered step rewrites the same objects and enqueues
units the ledger counts once.
"""

from __future__ import annotations

from collections.abc import Iterator

from celery import Celery

from shared import ids
from shared.celery_app import advance, send_unit
from shared.job_store import JobStore, QueryText
from shared.ledger import JobLedger
from shared.schemas import (
    DENSE_RANKING,
    Candidate,
    FusedGroup,
    Hits,
    JobSpec,
    QueryCandidates,
    RerankGroup,
    RetrievalSpec,
)
from workers.ranking.fusion import fuse
from workers.ranking.retrieval import merge_hits


def merged_rankings(ledger: JobLedger, store: JobStore, k: int) -> dict[str, dict[str, Hits]]:
    """Per ranking, every query's global top-k, merged from the retrieve units' lists
    one at a time (memory: queries x rankings x k)."""
    merged: dict[str, dict[str, Hits]] = {}
    for report in ledger.reports("retrieve"):  # done units only; failed ones are missing
        part = store.top_k(report.batch_id)
        for ranking, lists in part.hits.items():
            current = merged.setdefault(ranking, {})
            for query_id, hits in zip(part.query_ids, lists, strict=True):
                previous = current.get(query_id)
                current[query_id] = merge_hits([previous, hits], k) if previous else hits
    return merged


def fused_candidates(
    query: QueryText, rankings: dict[str, dict[str, Hits]], retrieval: RetrievalSpec
) -> QueryCandidates:
    """One query's fused candidates, with every ranking's raw score kept, and the
    per-ranking lists (for the evaluation at export)."""
    lists = {name: by_query.get(query.id, Hits([], [])) for name, by_query in rankings.items()}
    fused = fuse(
        lists, retrieval.weights, retrieval.fusion, top_k=retrieval.top_k, rrf_k=retrieval.rrf_k
    )
    candidates = [
        Candidate(
            chunk_id=hit.chunk_id,
            doc_id=ids.doc_id_of(hit.chunk_id),
            dense_score=_rounded(hit.scores.get(DENSE_RANKING)),
            sparse_score={
                name: _rounded(hit.scores.get(name)) for name in lists if name != DENSE_RANKING
            },
            fused_score=round(hit.fused_score, 6),
            rank=rank,
        )
        for rank, hit in enumerate(fused, start=1)
    ]
    return QueryCandidates(
        query_id=query.id, text=query.text, candidates=candidates, rankings=lists
    )


def _rounded(score: float | None) -> float | None:
    """Scores in results.jsonl: 6 decimals, as the sparse weights are exported."""
    return None if score is None else round(score, 6)


def query_groups(spec: JobSpec, queries: list[QueryText]) -> Iterator[tuple[str, list[QueryText]]]:
    """The job's queries in groups of ``queries_per_rerank_task``, with their ids."""
    assert spec.retrieval is not None, "only jobs with queries have query groups"
    size = spec.retrieval.queries_per_rerank_task
    for number, start in enumerate(range(0, len(queries), size)):
        yield ids.group_id("q", number), queries[start : start + size]


def fuse_job(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """Fan the retrieve phase in: fuse, write per-group candidates, fan reranking out
    (or start the export). Returns the number of rerank units enqueued."""
    spec = ledger.spec()
    retrieval = spec.retrieval
    assert retrieval is not None, "only jobs with queries are fused"
    queries = store.queries(ledger.staged_query_batches())
    rankings = merged_rankings(ledger, store, retrieval.top_k)
    groups: list[FusedGroup] = []
    for group_id, members in query_groups(spec, queries):
        fused = [fused_candidates(q, rankings, retrieval) for q in members]
        groups.append(FusedGroup(job_id=spec.job_id, group_id=group_id, queries=fused))
    rerank = retrieval.rerank_model is not None and retrieval.rerank_top > 0
    if rerank:
        _attach_texts(ledger, store, groups, retrieval.rerank_top)
    for group in groups:
        store.put_fused(group)
    units = [
        RerankGroup(job_id=spec.job_id, stage="rerank", unit=group.group_id)
        for group in (groups if rerank else [])
    ]
    if ledger.open_phase("rerank", len(units)):
        advance(app, spec, "rerank")
    for unit in units:
        send_unit(app, unit)
    return len(units)


def _attach_texts(ledger: JobLedger, store: JobStore, groups: list[FusedGroup], top: int) -> None:
    """Give each group the texts of the chunks its rerank unit scores, read in one pass
    over the staged batches (only the needed texts are kept)."""
    wanted: dict[str, list[FusedGroup]] = {}
    for group in groups:
        for query in group.queries:
            for candidate in query.candidates[:top]:
                wanted.setdefault(candidate.chunk_id, []).append(group)
    # A batch that failed an encode stage is left out of the job (no candidate comes
    # from it) and may be unreadable: it was poison, or its object was lost.
    failed = ledger.failed_batches()
    for batch_id in ledger.staged_batches():
        if batch_id in failed:
            continue
        for chunk in store.batch(batch_id).chunks:
            for group in wanted.get(chunk.chunk_id, ()):
                group.texts[chunk.chunk_id] = chunk.text
