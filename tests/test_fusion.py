"""Result fusion: hand-computed convex and RRF cases, tie-breaking, truncation, and the
parsing and defaults of the fusion weights.

Every expected number is worked out by hand in a comment; none comes from the code under
test.
"""

from __future__ import annotations

import pytest

from shared.control.fusion_weights import default_weights, parse_weights
from shared.records.errors import EmbedFleetError
from shared.records.schemas import DENSE_RANKING, Hits
from workers.ranking.fusion import FusedHit, fuse


def ids(hits: list[FusedHit]) -> list[str]:
    return [hit.chunk_id for hit in hits]


def scores(hits: list[FusedHit]) -> list[float]:
    return [hit.fused_score for hit in hits]


# dense: a=0.9, b=0.7, c=0.5 -> min 0.5, max 0.9, span 0.4 -> a=1, b=0.5, c=0
# bm25:  b=10, d=4, e=2      -> min 2, max 10, span 8     -> b=1, d=0.25, e=0
TWO_LISTS = {
    DENSE_RANKING: Hits(chunk_ids=["a", "b", "c"], scores=[0.9, 0.7, 0.5]),
    "bm25": Hits(chunk_ids=["b", "d", "e"], scores=[10.0, 4.0, 2.0]),
}
TWO_WEIGHTS = {DENSE_RANKING: 0.6, "bm25": 0.4}


def test_convex_two_lists_with_candidates_in_one_list_only() -> None:
    fused = fuse(TWO_LISTS, TWO_WEIGHTS, method="convex")
    # a: 0.6*1   + 0.4*0 (missing from bm25 -> its minimum -> 0) = 0.6
    # b: 0.6*0.5 + 0.4*1                                          = 0.7
    # c: 0.6*0   + 0.4*0 (missing)                                = 0.0
    # d: 0.6*0 (missing from dense) + 0.4*0.25                    = 0.1
    # e: 0.6*0 (missing)            + 0.4*0                       = 0.0
    # order: b 0.7, a 0.6, d 0.1, then c and e tied at 0 -> c before e
    assert ids(fused) == ["b", "a", "d", "c", "e"]
    assert scores(fused) == pytest.approx([0.7, 0.6, 0.1, 0.0, 0.0])


def test_convex_keeps_raw_scores_and_none_where_missing() -> None:
    by_id = {hit.chunk_id: hit for hit in fuse(TWO_LISTS, TWO_WEIGHTS)}
    assert by_id["a"].scores == {DENSE_RANKING: 0.9, "bm25": None}
    assert by_id["b"].scores == {DENSE_RANKING: 0.7, "bm25": 10.0}
    assert by_id["d"].scores == {DENSE_RANKING: None, "bm25": 4.0}


def test_convex_degenerate_list_gives_everyone_zero() -> None:
    lists = {
        # every score equal: no ordering information -> 0 for a, b and the missing c
        DENSE_RANKING: Hits(chunk_ids=["a", "b"], scores=[0.5, 0.5]),
        # b=3, c=1 -> span 2 -> b=1, c=0
        "bm25": Hits(chunk_ids=["b", "c"], scores=[3.0, 1.0]),
    }
    fused = fuse(lists, {DENSE_RANKING: 0.5, "bm25": 0.5})
    # a: 0.5*0 + 0.5*0 (missing) = 0
    # b: 0.5*0 + 0.5*1           = 0.5
    # c: 0.5*0 (missing) + 0.5*0 = 0
    # a and c tie at 0 -> a before c
    assert ids(fused) == ["b", "a", "c"]
    assert scores(fused) == pytest.approx([0.5, 0.0, 0.0])


def test_convex_single_hit_list_is_degenerate() -> None:
    lists = {
        DENSE_RANKING: Hits(chunk_ids=["x"], scores=[0.8]),  # single hit -> 0 for all
        "bm25": Hits(chunk_ids=["y", "z"], scores=[2.0, 1.0]),  # y=1, z=0
    }
    fused = fuse(lists, {DENSE_RANKING: 0.7, "bm25": 0.3})
    # x: 0.7*0 + 0.3*0 (missing) = 0
    # y: 0.7*0 (missing) + 0.3*1 = 0.3
    # z: 0.7*0 (missing) + 0.3*0 = 0
    # x and z tie at 0 -> x before z
    assert ids(fused) == ["y", "x", "z"]
    assert scores(fused) == pytest.approx([0.3, 0.0, 0.0])


def test_ties_in_fused_score_are_broken_by_chunk_id_as_plain_strings() -> None:
    lists = {
        # "doc-9" = 1, "doc-10" = 0 after normalisation
        DENSE_RANKING: Hits(chunk_ids=["doc-9", "doc-10"], scores=[2.0, 1.0]),
        # "doc-10" = 1, "doc-9" = 0 after normalisation
        "bm25": Hits(chunk_ids=["doc-10", "doc-9"], scores=[7.0, 3.0]),
    }
    fused = fuse(lists, {DENSE_RANKING: 0.5, "bm25": 0.5})
    # both: 0.5*1 + 0.5*0 = 0.5 -> tie; "doc-10" < "doc-9" as strings ("1" < "9")
    assert ids(fused) == ["doc-10", "doc-9"]
    assert scores(fused) == pytest.approx([0.5, 0.5])


def test_rrf_hand_computed_with_missing_candidates() -> None:
    lists = {
        DENSE_RANKING: Hits(chunk_ids=["a", "b", "c"], scores=[0.9, 0.8, 0.7]),
        "splade": Hits(chunk_ids=["b", "d"], scores=[30.0, 20.0]),
    }
    fused = fuse(lists, {DENSE_RANKING: 0.75, "splade": 0.25}, method="rrf", rrf_k=60)
    # dense ranks: a 1, b 2, c 3; missing -> last rank 3
    # splade ranks: b 1, d 2;     missing -> last rank 2
    # a: 0.75/61 + 0.25/62 (missing)  = 0.0122951 + 0.0040323 = 0.0163274
    # b: 0.75/62 + 0.25/61            = 0.0120968 + 0.0040984 = 0.0161952
    # c: 0.75/63 + 0.25/62 (missing)  = 0.0119048 + 0.0040323 = 0.0159370
    # d: 0.75/63 (missing) + 0.25/62  = 0.0119048 + 0.0040323 = 0.0159370 (tie with c)
    assert ids(fused) == ["a", "b", "c", "d"]
    assert scores(fused) == pytest.approx([0.0163274, 0.0161952, 0.0159370, 0.0159370], abs=1e-7)
    assert fused[3].scores == {DENSE_RANKING: None, "splade": 20.0}


def test_rrf_empty_list_contributes_nothing() -> None:
    lists = {
        DENSE_RANKING: Hits(chunk_ids=["a", "b"], scores=[0.9, 0.1]),
        "bm25": Hits(chunk_ids=[], scores=[]),
    }
    fused = fuse(lists, {DENSE_RANKING: 0.5, "bm25": 0.5}, method="rrf", rrf_k=0)
    # rrf_k = 0: a: 0.5/(0+1) + 0 = 0.5;  b: 0.5/(0+2) + 0 = 0.25
    assert ids(fused) == ["a", "b"]
    assert scores(fused) == pytest.approx([0.5, 0.25])
    assert fused[0].scores == {DENSE_RANKING: 0.9, "bm25": None}


def test_top_k_truncates_after_sorting() -> None:
    # same as the two-list convex case: b 0.7, a 0.6, d 0.1, c 0, e 0
    assert ids(fuse(TWO_LISTS, TWO_WEIGHTS, top_k=2)) == ["b", "a"]
    assert ids(fuse(TWO_LISTS, TWO_WEIGHTS, top_k=10)) == ["b", "a", "d", "c", "e"]


def test_no_lists_or_only_empty_lists_give_nothing() -> None:
    assert fuse({}, {}) == []
    empty = {DENSE_RANKING: Hits(chunk_ids=[], scores=[]), "bm25": Hits(chunk_ids=[], scores=[])}
    assert fuse(empty, {DENSE_RANKING: 0.5, "bm25": 0.5}) == []
    assert fuse(empty, {DENSE_RANKING: 0.5, "bm25": 0.5}, method="rrf") == []


def test_weights_must_cover_every_ranking() -> None:
    with pytest.raises(ValueError, match="bm25"):
        fuse(TWO_LISTS, {DENSE_RANKING: 1.0})
    # extra weights (a ranking with no list for this query) are fine
    assert fuse(TWO_LISTS, {**TWO_WEIGHTS, "splade": 0.0})


def test_default_weights() -> None:
    # (1 - 0.5) / 2 = 0.25 each
    assert default_weights(["splade-tiny", "bm25"], 0.5) == pytest.approx(
        {DENSE_RANKING: 0.5, "splade-tiny": 0.25, "bm25": 0.25}
    )
    # (1 - 0.7) / 1 = 0.3
    assert default_weights(["bm25"], 0.7) == pytest.approx({DENSE_RANKING: 0.7, "bm25": 0.3})
    assert default_weights([], 0.3) == {DENSE_RANKING: 1.0}
    with pytest.raises(EmbedFleetError, match="alpha"):
        default_weights(["bm25"], 1.5)


def test_parse_weights_good() -> None:
    rankings = [DENSE_RANKING, "splade-tiny", "bm25"]
    assert parse_weights("dense=0.5,splade-tiny=0.25,bm25=0.25", rankings) == pytest.approx(
        {DENSE_RANKING: 0.5, "splade-tiny": 0.25, "bm25": 0.25}
    )
    # any order, whitespace ignored, normalised: 2+1+1 = 4 -> 2/4, 1/4, 1/4; zero allowed
    parsed = parse_weights(" bm25 = 1 , dense=2,splade-tiny=1 ", rankings)
    assert parsed == pytest.approx({DENSE_RANKING: 0.5, "splade-tiny": 0.25, "bm25": 0.25})
    assert list(parsed) == rankings
    # 3 + 0 -> 3/3, 0/3
    assert parse_weights("dense=3,bm25=0", [DENSE_RANKING, "bm25"]) == pytest.approx(
        {DENSE_RANKING: 1.0, "bm25": 0.0}
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dense=0.5,splade=0.25,bm25=0.25", "'splade'"),  # unknown ranking
        ("dense=0.5,bm25=0.5", "splade-tiny"),  # ranking left out
        ("dense=0.5,bm25=0.25,bm25=0.25,splade-tiny=0", "'bm25'"),  # named twice
        ("dense=-0.5,splade-tiny=1,bm25=1", "'-0.5'"),  # negative
        ("dense=half,splade-tiny=1,bm25=1", "'half'"),  # not a number
        ("dense=nan,splade-tiny=1,bm25=1", "'nan'"),  # not finite
        ("dense=0,splade-tiny=0,bm25=0", "weight 0"),  # sums to 0
        ("dense,splade-tiny=1,bm25=1", "'dense'"),  # no '='
        ("dense=1,,splade-tiny=1,bm25=1", "empty entry"),  # empty entry
    ],
)
def test_parse_weights_bad(text: str, named: str) -> None:
    with pytest.raises(EmbedFleetError) as caught:
        parse_weights(text, [DENSE_RANKING, "splade-tiny", "bm25"])
    assert named in caught.value.cause
    assert caught.value.fix
