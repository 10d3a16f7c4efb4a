"""The aggregator's fan-out and fan-in steps between encoding and export.

``plan_retrieve`` (after the encode phase): merge the collection's BM25 statistics once,
cut the document batches into groups and enqueue one retrieve task per retriever and
group. ``fuse`` (after the retrieve phase): merge each query's partial top-k lists,
fuse the rankings, write the fused candidates per group of queries, and enqueue one
rerank task per group (or go straight to export).

Both steps are idempotent: a redelivered step rewrites the same objects and enqueues
tasks whose units the ledger counts once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
from celery import Celery

from shared.celery_app import RETRIEVE_TASKS, TASK_RERANK, send
from shared.ledger import JobLedger
from shared.models import BM25
from shared.phases import advance
from shared.schemas import (
    DENSE_RANKING,
    Candidate,
    FusedGroup,
    Hits,
    JobSpec,
    QueryCandidates,
    RerankGroup,
    RetrievalSpec,
    RetrieveGroup,
    TopKShard,
)
from shared.storage import ObjectStore
from workers.fusion import fuse
from workers.retrieval import JobShards, merge_hits


def doc_id_of(chunk_id: str) -> str:
    """Chunk ids are ``{doc_id}#{n}``; a doc id may itself contain ``#``."""
    return chunk_id.rsplit("#", 1)[0]


def retrieve_units(ledger: JobLedger, spec: JobSpec) -> list[RetrieveGroup]:
    """One retrieve task per stage and group of that stage's encoded document batches
    (a batch whose stage failed has no shard to search)."""
    retrieval = _retrieval(spec)
    batches = ledger.staged_batches()
    units: list[RetrieveGroup] = []
    for stage in spec.stages:
        failed = {f.batch_id for f in ledger.failures(stage)}
        usable = [b for b in batches if b not in failed]
        size = retrieval.batches_per_retrieve_task
        for number, start in enumerate(range(0, len(usable), size)):
            units.append(
                RetrieveGroup(
                    job_id=spec.job_id,
                    group_id=f"{stage}-g{number:05d}",
                    store_url=spec.output,
                    collection=spec.collection,
                    batch_ids=usable[start : start + size],
                    top_k=retrieval.top_k,
                )
            )
    return units


def plan_retrieve(ledger: JobLedger, store: ObjectStore, app: Celery) -> int:
    """Fan the retrieve phase out; returns how many tasks it enqueued."""
    spec = ledger.spec()
    shards = JobShards(store, spec)
    if BM25 in spec.sparse_models:
        failed = {f.batch_id for f in ledger.failures("sparse")}
        stats = shards.merge_bm25([b for b in ledger.staged_batches() if b not in failed])
        store.put_bytes(shards.layout.bm25_statistics, msgspec.msgpack.encode(stats.collection()))
    units = retrieve_units(ledger, spec)
    if ledger.open_phase("retrieve", len(units)):
        advance(app, spec, "retrieve")
    for unit in units:
        send(app, RETRIEVE_TASKS[unit.group_id.split("-g")[0]], unit)
    return len(units)


def encoded_query_batches(ledger: JobLedger, stage: str) -> list[str]:
    failed = {f.batch_id for f in ledger.failures(stage)}
    return [b for b in ledger.staged_query_batches() if b not in failed]


@dataclass
class QueryText:
    id: str
    text: str


def read_queries(ledger: JobLedger, shards: JobShards) -> list[QueryText]:
    """The job's queries in file order, from the staged query batches."""
    out: list[QueryText] = []
    for batch_id in ledger.staged_query_batches():
        out += [QueryText(c.chunk_id, c.text) for c in shards.batch(batch_id).chunks]
    return out


def merged_rankings(ledger: JobLedger, shards: JobShards) -> dict[str, dict[str, Hits]]:
    """Per ranking, every query's global top-k, merged from the retrieve tasks' lists
    one shard at a time (memory: queries x rankings x k)."""
    spec = shards.spec
    k = _retrieval(spec).top_k
    merged: dict[str, dict[str, Hits]] = {}
    for report in ledger.reports("retrieve"):  # done units only; failed ones are missing
        data = shards.store.get_bytes(shards.layout.top_k(*_unit_parts(report.batch_id)))
        part = msgspec.msgpack.decode(data, type=TopKShard)
        for ranking, lists in part.hits.items():
            current = merged.setdefault(ranking, {})
            for query_id, hits in zip(part.query_ids, lists, strict=True):
                previous = current.get(query_id)
                current[query_id] = merge_hits([previous, hits], k) if previous else hits
    return merged


def _unit_parts(unit_id: str) -> tuple[str, str]:
    stage, _, _ = unit_id.partition("-g")
    return stage, unit_id


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
            doc_id=doc_id_of(hit.chunk_id),
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
    size = _retrieval(spec).queries_per_rerank_task
    for number, start in enumerate(range(0, len(queries), size)):
        yield f"q-g{number:05d}", queries[start : start + size]


def fuse_job(ledger: JobLedger, store: ObjectStore, app: Celery) -> int:
    """Fan the retrieve phase in: fuse, write per-group candidates, fan reranking out
    (or start the export). Returns the number of rerank tasks enqueued."""
    spec = ledger.spec()
    retrieval = _retrieval(spec)
    shards = JobShards(store, spec)
    queries = read_queries(ledger, shards)
    rankings = merged_rankings(ledger, shards)
    groups: list[FusedGroup] = []
    for group_id, members in query_groups(spec, queries):
        fused = [fused_candidates(q, rankings, retrieval) for q in members]
        groups.append(FusedGroup(job_id=spec.job_id, group_id=group_id, queries=fused))
    rerank = retrieval.rerank_model is not None and retrieval.rerank_top > 0
    if rerank:
        _attach_texts(ledger, shards, groups, retrieval.rerank_top)
    for group in groups:
        store.put_bytes(shards.layout.fused(group.group_id), msgspec.msgpack.encode(group))
    if not rerank:
        ledger.set_status("exporting")
        advance(app, spec, "rerank")
        return 0
    ledger.set_status("reranking")
    if ledger.open_phase("rerank", len(groups)):
        advance(app, spec, "rerank")
    for group in groups:
        message = RerankGroup(
            job_id=spec.job_id,
            group_id=group.group_id,
            store_url=spec.output,
            collection=spec.collection,
            model=retrieval.rerank_model or "",
            rerank_top=retrieval.rerank_top,
            dtype=spec.dtype,
        )
        send(app, TASK_RERANK, message)
    return len(groups)


def _attach_texts(ledger: JobLedger, shards: JobShards, groups: list[FusedGroup], top: int) -> None:
    """Give each group the texts of the chunks its rerank task scores, read in one pass
    over the staged batches (only the needed texts are kept)."""
    wanted: dict[str, list[FusedGroup]] = {}
    for group in groups:
        for query in group.queries:
            for candidate in query.candidates[:top]:
                wanted.setdefault(candidate.chunk_id, []).append(group)
    for batch_id in ledger.staged_batches():
        for chunk in shards.batch(batch_id).chunks:
            for group in wanted.get(chunk.chunk_id, ()):
                group.texts[chunk.chunk_id] = chunk.text


def _retrieval(spec: JobSpec) -> RetrievalSpec:
    assert spec.retrieval is not None, "only jobs with queries have a retrieve phase"
    return spec.retrieval
