"""The fuse phase: each query's rankings merged and fused, a run of query groups per unit.

``plan_fuse`` (after retrieval) enqueues one fuse unit per run of
``rerank_groups_per_fuse_task`` query groups (of ``queries_per_rerank_task`` queries
each), on the aggregate queue, so any number of aggregate workers fuse at once. Each
retrieve unit wrote its top-k lists split by fuse unit, so a fuse unit reads only its own
queries' lists (one small object per retrieve unit), merges them into each query's
global top-k per ranking, fuses the rankings (:mod:`workers.ranking.fusion`) and writes
one :class:`FusedGroup` per query group. When the job reranks, it attaches the texts of
the candidates the reranker will score, read from only the staged batches those
candidates are in (every hit names its batch). ``plan_rerank`` then enqueues one rerank
unit per fused query group (none when the job does not rerank: the rerank phase opens
empty and the export follows at once). Idempotent: a redelivered unit or step rewrites
the same objects and enqueues units the ledger counts once.
"""

from __future__ import annotations

from collections.abc import Iterator

from celery import Celery

from shared.control.celery_app import fan_out
from shared.control.ledger import JobLedger
from shared.inputs import tokens
from shared.records import ids
from shared.records.job_store import JobStore, QueryText
from shared.records.schemas import (
    DENSE_RANKING,
    Candidate,
    FusedGroup,
    FuseGroup,
    Hits,
    JobSpec,
    QueryCandidates,
    RerankGroup,
    RetrievalSpec,
    TopKShard,
    UnitDone,
)
from workers.ranking.fusion import fuse
from workers.ranking.retrieval import merge_hits

QueryGroups = list[tuple[str, list[QueryText]]]


def query_groups(spec: JobSpec, queries: list[QueryText]) -> Iterator[tuple[str, list[QueryText]]]:
    """The job's queries in groups of ``queries_per_rerank_task``, with their ids."""
    assert spec.retrieval is not None, "only jobs with queries have query groups"
    size = spec.retrieval.queries_per_rerank_task
    for number, start in enumerate(range(0, len(queries), size)):
        yield ids.group_id("q", number), queries[start : start + size]


def fuse_units(spec: JobSpec, queries: list[QueryText]) -> list[tuple[str, QueryGroups]]:
    """The fuse units (``f-g00000``, ...), each with its run of query groups."""
    assert spec.retrieval is not None, "only jobs with queries are fused"
    groups = list(query_groups(spec, queries))
    per = spec.retrieval.rerank_groups_per_fuse_task
    return [
        (ids.group_id("f", number), groups[start : start + per])
        for number, start in enumerate(range(0, len(groups), per))
    ]


def lists_by_fuse_unit(
    spec: JobSpec,
    queries: list[QueryText],
    group_id: str,
    query_ids: list[str],
    hits: dict[str, list[Hits]],
) -> list[TopKShard]:
    """A retrieve unit's lists (``hits[ranking][i]`` for ``query_ids[i]``) split by
    fuse unit: one shard per fuse unit, in order, holding its queries' lists (none for
    a query whose batch failed this retriever)."""
    position = {query_id: i for i, query_id in enumerate(query_ids)}
    shards = []
    for unit, groups in fuse_units(spec, queries):
        mine = [position[q.id] for _, members in groups for q in members if q.id in position]
        shards.append(
            TopKShard(
                job_id=spec.job_id,
                group_id=group_id,
                query_ids=[query_ids[i] for i in mine],
                hits={ranking: [lists[i] for i in mine] for ranking, lists in hits.items()},
                fuse_unit=unit,
            )
        )
    return shards


def merged_rankings(
    ledger: JobLedger, store: JobStore, unit: str, k: int
) -> dict[str, dict[str, Hits]]:
    """Per ranking, the global top-k of each query of fuse unit ``unit``, merged from
    the retrieve units' lists one at a time (memory: its queries x rankings x k)."""
    merged: dict[str, dict[str, Hits]] = {}
    for report in ledger.reports("retrieve"):  # done units only; failed ones are missing
        part = store.top_k(report.batch_id, unit)
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
    # The batches are the fuse unit's to find texts with; results.jsonl has no use for them.
    kept = {name: Hits(hits.chunk_ids, hits.scores) for name, hits in lists.items()}
    return QueryCandidates(query_id=query.id, text=query.text, candidates=candidates, rankings=kept)


def _rounded(score: float | None) -> float | None:
    """Scores in results.jsonl: 6 decimals, as the sparse weights are exported."""
    return None if score is None else round(score, 6)


def reranks(spec: JobSpec) -> bool:
    retrieval = spec.retrieval
    return retrieval is not None and retrieval.rerank_model is not None and retrieval.rerank_top > 0


def fuse_unit(ledger: JobLedger, store: JobStore, unit: str) -> int:
    """One fuse unit's work: its query groups fused and written (with the texts the
    reranker will need); returns how many queries it fused."""
    spec = ledger.spec()
    retrieval = spec.retrieval
    assert retrieval is not None, "only jobs with queries are fused"
    queries = store.queries(ledger.staged_query_batches())
    groups = dict(fuse_units(spec, queries))[unit]
    rankings = merged_rankings(ledger, store, unit, retrieval.top_k)
    fused = [
        FusedGroup(
            job_id=spec.job_id,
            group_id=group_id,
            queries=[fused_candidates(q, rankings, retrieval) for q in members],
        )
        for group_id, members in groups
    ]
    if reranks(spec):
        _attach_texts(ledger, store, fused, rankings, retrieval.rerank_top)
    for group in fused:
        store.put_fused(group)
    done = sum(len(members) for _, members in groups)
    store.put_fuse_done(unit, UnitDone(outputs=[g for g, _ in groups], items=done))
    return done


def _attach_texts(
    ledger: JobLedger,
    store: JobStore,
    groups: list[FusedGroup],
    rankings: dict[str, dict[str, Hits]],
    top: int,
) -> None:
    """Give each group the texts of the chunks its rerank unit scores, read from only
    the staged batches those chunks are in (a hit names its batch)."""
    batch_of: dict[str, str] = {}
    for by_query in rankings.values():
        for hits in by_query.values():
            batch_of.update(zip(hits.chunk_ids, hits.batch_ids, strict=False))
    wanted: dict[str, dict[str, list[FusedGroup]]] = {}  # batch -> chunk -> groups
    for group in groups:
        for query in group.queries:
            for candidate in query.candidates[:top]:
                batch = batch_of.get(candidate.chunk_id, "")
                wanted.setdefault(batch, {}).setdefault(candidate.chunk_id, []).append(group)
    if "" in wanted:
        # Lists written before hits named their batch (a job resumed across an upgrade):
        # look in every usable batch, as fusion did then.
        unplaced = wanted.pop("")
        for batch_id in ledger.usable_batches():
            wanted.setdefault(batch_id, {}).update(unplaced)
    for batch_id, chunks in sorted(wanted.items()):
        found = store.batch(batch_id)
        staged = found.tokens
        # The chunk stage's ids go with the texts, so the reranker lays its pairs out
        # without tokenizing the passages again.
        staged_ids = tokens.unpack(staged) if staged is not None else [None] * len(found.chunks)
        for chunk, chunk_ids in zip(found.chunks, staged_ids, strict=True):
            for group in chunks.get(chunk.chunk_id, ()):
                group.texts[chunk.chunk_id] = chunk.text
                if staged is None or chunk_ids is None:
                    continue
                if group.tokenizer in ("", staged.tokenizer):
                    group.tokenizer, group.id_dtype = staged.tokenizer, staged.dtype
                    group.ids[chunk.chunk_id] = tokens.to_bytes(chunk_ids, staged.dtype)


def fuse_messages(ledger: JobLedger, store: JobStore, spec: JobSpec) -> list[FuseGroup]:
    """One fuse unit's message per run of query groups (what ``plan_fuse`` sends and
    ``resume`` checks)."""
    queries = store.queries(ledger.staged_query_batches())
    return [
        FuseGroup(job_id=spec.job_id, stage="fuse", unit=unit)
        for unit, _ in fuse_units(spec, queries)
    ]


def plan_fuse(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """After retrieval: one fuse unit per run of query groups; returns how many."""
    spec = ledger.spec()
    return fan_out(app, ledger, spec, "fuse", fuse_messages(ledger, store, spec))


def fused_groups(ledger: JobLedger, spec: JobSpec, queries: list[QueryText]) -> list[str]:
    """The query groups that were fused, in order: a fuse unit that kept failing leaves
    its groups out (its failure, under the manifest's ``missing``, says why)."""
    failed = {f.batch_id for f in ledger.failures("fuse")}
    return [
        group_id
        for unit, groups in fuse_units(spec, queries)
        if unit not in failed
        for group_id, _ in groups
    ]


def rerank_units(ledger: JobLedger, store: JobStore, spec: JobSpec) -> list[RerankGroup]:
    """One rerank unit per query group that was fused (none when the job does not
    rerank)."""
    if not reranks(spec):
        return []
    queries = store.queries(ledger.staged_query_batches())
    return [
        RerankGroup(job_id=spec.job_id, stage="rerank", unit=group_id)
        for group_id in fused_groups(ledger, spec, queries)
    ]


def plan_rerank(ledger: JobLedger, store: JobStore, app: Celery) -> int:
    """After fusion: one rerank unit per fused query group; returns how many."""
    spec = ledger.spec()
    return fan_out(app, ledger, spec, "rerank", rerank_units(ledger, store, spec))
