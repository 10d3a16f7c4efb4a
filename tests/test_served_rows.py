"""Chunks served another chunk's vectors (``shared.records.served_rows``): the claims
in a real Redis (``JobLedger.claim_texts``) and the shards read with served rows filled,
from a real job store on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.control.ledger import JobLedger
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.schemas import DenseShard, Matrix, ServedRow, SparseRow, SparseShard
from shared.records.served_rows import ServedShards, place, served_rows
from shared.records.storage import LocalStore

FIRST, SECOND, LATER = "b00000-00003", "b00001-00000", "b00002-00000"
# Text keys as shared.records.content_keys makes them (32 hex digits).
K1, K2, K3, KA, KB, KC = (f"{i:032x}" for i in range(1, 7))


def test_the_first_claimant_of_a_text_serves_it_whoever_comes_after(redis_client: Any) -> None:
    ledger = JobLedger(redis_client, "claims")
    cap = 100
    # The second range claims first: a text twice in its batch is served within it.
    rows = [0, 1, 2]
    found = ledger.claim_texts([K1, K2, K1], [place(SECOND, r) for r in rows], cap)
    assert found == ["", "", place(SECOND, 0)]
    assert served_rows(SECOND, found, rows) == [ServedRow(2, SECOND, 0)]
    # A range earlier in reading order that comes later is served all the same.
    assert ledger.claim_texts([K2, K3], [place(FIRST, 5), place(FIRST, 6)], cap) == [
        place(SECOND, 1),
        "",
    ]
    assert ledger.claim_texts([K3, K1], [place(LATER, 0), place(LATER, 1)], cap) == [
        place(FIRST, 6),
        place(SECOND, 0),
    ]
    # A unit run again finds its own claims: the same chunks are its own.
    assert ledger.claim_texts([K1, K1], [place(SECOND, 0), place(SECOND, 2)], cap) == [
        "",
        place(SECOND, 0),
    ]
    ledger.forget_texts()
    assert not redis_client.exists(ledger.k_texts)


def test_claims_stop_growing_at_the_cap(redis_client: Any) -> None:
    ledger = JobLedger(redis_client, "capped")
    assert ledger.claim_texts([KA, KB, KC], [place(FIRST, r) for r in range(3)], 2) == [""] * 3
    assert redis_client.hlen(ledger.k_texts) == 2
    # C was not kept: a later repeat of it is encoded too; A still serves.
    later = ledger.claim_texts([KC, KA], [place(LATER, 0), place(LATER, 1)], 2)
    assert later == ["", place(FIRST, 0)]
    assert redis_client.hlen(ledger.k_texts) == 2


def _dense(batch_id: str, rows: list[list[float]], served: list[ServedRow]) -> DenseShard:
    matrix = Matrix.from_numpy(np.asarray(rows, dtype=np.float32))
    chunk_ids = [f"{batch_id}#{i}" for i in range(len(rows))]
    return DenseShard(
        job_id="j", batch_id=batch_id, chunk_ids=chunk_ids, vectors={"m": matrix}, served=served
    )


def _sparse(batch_id: str, words: list[str], served: list[ServedRow]) -> SparseShard:
    splade = [SparseRow([w], [1.0]) if w else SparseRow([], [], "missing") for w in words]
    bm25 = [SparseRow([f"own{i}"], [1.0]) for i in range(len(words))]
    return SparseShard(
        job_id="j",
        batch_id=batch_id,
        chunk_ids=[f"{batch_id}#{i}" for i in range(len(words))],
        rows={"splade": splade, "bm25": bm25},
        served=served,
    )


def test_served_rows_are_filled_from_the_rows_they_point_at(tmp_path: Path) -> None:
    store = JobStore(LocalStore(tmp_path), "docs", "j")
    # SECOND row 1 is served from FIRST row 0, and row 2 from its own row 0; FIRST row 1
    # from LATER row 1 (the later range claimed first). LATER row 0 points at SECOND
    # row 1, itself served (staged so by an earlier try): the reader follows it on.
    store.put_shard("dense", FIRST, _dense(FIRST, [[1, 0], [0, 0]], [ServedRow(1, LATER, 1)]))
    second = [ServedRow(1, FIRST, 0), ServedRow(2, SECOND, 0)]
    store.put_shard("dense", SECOND, _dense(SECOND, [[3, 3], [0, 0], [0, 0]], second))
    store.put_shard("dense", LATER, _dense(LATER, [[0, 0], [5, 5]], [ServedRow(0, SECOND, 1)]))
    shards = ServedShards(store)
    assert shards.dense(FIRST).vectors["m"].to_numpy().tolist() == [[1, 0], [5, 5]]
    filled = shards.dense(SECOND)
    assert filled.vectors["m"].to_numpy().tolist() == [[3, 3], [1, 0], [3, 3]]
    assert filled.served == [] and filled.chunk_ids == [f"{SECOND}#{i}" for i in range(3)]
    assert shards.dense(LATER).vectors["m"].to_numpy().tolist() == [[1, 0], [5, 5]]
    # The stored shard is as the worker wrote it.
    assert store.dense(SECOND).vectors["m"].to_numpy().tolist()[1] == [0, 0]

    store.put_shard("sparse", FIRST, _sparse(FIRST, ["alpha", "beta"], []))
    store.put_shard("sparse", SECOND, _sparse(SECOND, ["gamma", ""], [ServedRow(1, FIRST, 1)]))
    sparse = ServedShards(store).sparse(SECOND)
    assert [r.tokens for r in sparse.rows["splade"]] == [["gamma"], ["beta"]]
    # BM25's term counts are every row's own (they make the batch's document frequencies).
    assert [r.tokens for r in sparse.rows["bm25"]] == [["own0"], ["own1"]]


def test_pointers_that_lead_back_to_themselves_are_refused(tmp_path: Path) -> None:
    """No row on a cycle was encoded: the reader says so rather than serving zeros."""
    store = JobStore(LocalStore(tmp_path), "docs", "j")
    store.put_shard("dense", LATER, _dense(LATER, [[0, 0]], [ServedRow(0, SECOND, 0)]))
    store.put_shard("dense", SECOND, _dense(SECOND, [[0, 0]], [ServedRow(0, LATER, 0)]))
    with pytest.raises(EmbedFleetError, match="leads back to it"):
        ServedShards(store).dense(SECOND)
