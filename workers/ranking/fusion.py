"""Fusion of per-retriever rankings into one ranking, for one query.

Each retriever (the dense ensemble, ranked as :data:`~shared.records.schemas.DENSE_RANKING`,
and every sparse model, ranked under its own name) returns its own top-k for a query.
Their scores live on unrelated scales (cosine similarities, SPLADE dot products, BM25
sums), so they cannot be added as they are. :func:`fuse` merges the lists into one
ranking by one of two methods, each a weighted sum over the rankings with the same
weights, so ``--alpha`` (or ``--fusion-weights``) means the same whichever method is chosen.

The candidates are the union of every list's chunk ids.

``convex`` -- a convex combination of normalised scores (Bruch et al. 2023, "An Analysis
of Fusion Functions for Hybrid Retrieval"). Each list's scores are min-max normalised
over that list to ``[0, 1]``. A candidate missing from a list gets that list's minimum,
so it normalises to 0: it ranked below everything the retriever returned, and the
minimum is the best bound on its score we have without scoring it. A degenerate list
(every score equal, a single hit included) normalises to 0 for every candidate,
present or missing: it carries no ordering information, so it must not favour anyone.
``fused = sum_i weights[i] * norm_i``.

``rrf`` -- weighted reciprocal rank fusion (Cormack et al. 2009). A list contributes
``weights[i] / (rrf_k + rank)`` with 1-based ranks. A candidate missing from a list gets
that list's minimum contribution, i.e. ``rank = len(list)`` (the last rank), for the same
reason as above. An empty list contributes 0 to everyone.

The output is sorted by fused score, best first, ties broken by chunk id ascending (plain
string comparison) so that runs are reproducible, and is truncated to ``top_k``. Each
:class:`FusedHit` keeps the raw score of every ranking (``None`` where the chunk was not
in that list) so that results can show why a chunk ranked where it did.

A chunk id repeated within one list counts at its first (best) position only.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.records.schemas import Fusion, Hits


@dataclass(frozen=True)
class FusedHit:
    """A fused candidate of one query.

    Attributes:
        chunk_id: The candidate chunk.
        fused_score: Its score under the fusion method; only comparable within one
            query and one fusion call.
        scores: The raw score each ranking gave it (by ranking name), ``None`` where the
            chunk was not in that ranking's list; kept for audit in the results.
    """

    chunk_id: str
    fused_score: float
    scores: dict[str, float | None]


def _first_positions(name: str, hits: Hits) -> dict[str, int]:
    """Map each chunk id of a list to its first (0-based) position.

    Why: a retriever should not return a chunk twice, but if one does, the chunk must
    count once, at its best rank, not be rewarded twice.
    """
    if len(hits.chunk_ids) != len(hits.scores):
        raise ValueError(
            f"ranking {name!r} has {len(hits.chunk_ids)} chunk ids but {len(hits.scores)} scores"
        )
    positions: dict[str, int] = {}
    for position, chunk_id in enumerate(hits.chunk_ids):
        positions.setdefault(chunk_id, position)
    return positions


def _raw_score(hits: Hits, positions: dict[str, int], chunk_id: str) -> float | None:
    """A chunk's raw score in one list (at its first position), ``None`` if absent."""
    position = positions.get(chunk_id)
    return None if position is None else hits.scores[position]


def _convex_contributions(hits: Hits, positions: dict[str, int]) -> tuple[dict[str, float], float]:
    """Min-max normalised scores of one list, and the value a missing candidate gets.

    Returns:
        The normalised score per chunk id present in the list, and the normalised score
        of a candidate missing from it (the list's minimum, i.e. 0).
    """
    if not hits.scores:
        return {}, 0.0
    low, high = min(hits.scores), max(hits.scores)
    if high == low:
        # No ordering information: everyone, present or missing, gets the same 0.
        return dict.fromkeys(positions, 0.0), 0.0
    span = high - low
    return {chunk_id: (hits.scores[p] - low) / span for chunk_id, p in positions.items()}, 0.0


def _rrf_contributions(
    hits: Hits, positions: dict[str, int], rrf_k: int
) -> tuple[dict[str, float], float]:
    """Reciprocal-rank contributions of one list (unweighted), and a missing candidate's.

    Returns:
        ``1 / (rrf_k + rank)`` per chunk id present (1-based rank of its first position),
        and the contribution of a missing candidate: the list's minimum, i.e. that of
        the last rank ``len(list)``; 0 for an empty list.
    """
    if not hits.chunk_ids:
        return {}, 0.0
    present = {chunk_id: 1.0 / (rrf_k + p + 1) for chunk_id, p in positions.items()}
    return present, 1.0 / (rrf_k + len(hits.chunk_ids))


def fuse(
    lists: dict[str, Hits],
    weights: dict[str, float],
    method: Fusion = "convex",
    top_k: int = 100,
    rrf_k: int = 60,
) -> list[FusedHit]:
    """Fuse one query's per-retriever rankings into one ranking.

    See the module docstring for the exact semantics of each method.

    Args:
        lists: Ranking name -> that retriever's ranked list for the query (best first;
            may be empty).
        weights: Ranking name -> weight; must name every ranking of ``lists`` (extra
            names are ignored, so one weights dict serves queries where a retriever
            returned nothing).
        method: ``"convex"`` (min-max normalised scores) or ``"rrf"`` (reciprocal rank).
        top_k: How many fused candidates to keep.
        rrf_k: The RRF smoothing constant (60 in Cormack et al.); unused by ``convex``.

    Returns:
        At most ``top_k`` candidates, best first, ties broken by chunk id ascending;
        empty when there are no lists or every list is empty.

    Raises:
        ValueError: A ranking of ``lists`` has no weight, a list's ids and scores differ
            in length, or ``method``, ``top_k`` or ``rrf_k`` is invalid. These are
            programming errors, not user errors: weights are validated when parsed.
    """
    missing = [name for name in lists if name not in weights]
    if missing:
        raise ValueError(f"no fusion weight for ranking(s) {', '.join(map(repr, missing))}")
    if method not in ("convex", "rrf"):
        raise ValueError(f"unknown fusion method {method!r}; expected 'convex' or 'rrf'")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if rrf_k < 0:
        raise ValueError(f"rrf_k must not be negative, got {rrf_k}")

    positions = {name: _first_positions(name, hits) for name, hits in lists.items()}
    candidates: set[str] = set()
    for per_list in positions.values():
        candidates.update(per_list)
    if not candidates:
        return []

    fused = dict.fromkeys(candidates, 0.0)
    for name, hits in lists.items():
        if method == "convex":
            present, absent = _convex_contributions(hits, positions[name])
        else:
            present, absent = _rrf_contributions(hits, positions[name], rrf_k)
        weight = weights[name]
        for chunk_id in candidates:
            fused[chunk_id] += weight * present.get(chunk_id, absent)

    order = sorted(candidates, key=lambda chunk_id: (-fused[chunk_id], chunk_id))[:top_k]
    return [
        FusedHit(
            chunk_id=chunk_id,
            fused_score=fused[chunk_id],
            scores={
                name: _raw_score(hits, positions[name], chunk_id) for name, hits in lists.items()
            },
        )
        for chunk_id in order
    ]
