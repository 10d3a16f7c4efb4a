"""A chunk whose text another chunk of the same job has is not encoded again: it is
*served* that chunk's vectors.

Corpora repeat passages (boilerplate, templated pages, mirrors), and the same text gives
the same vector (:mod:`shared.records.content_keys`). An encode unit already runs each
distinct text of its own batches once (``workers.inference.feed.Distinct``); this module
extends that to the whole job:

1. **chunk**: as a range's unit stages a batch, it claims its chunks' text keys in the
   job's ledger, one round trip a batch (``JobLedger.claim_texts``). A chunk whose text
   a chunk of another place claimed first is listed in the batch as served from that
   place (``ChunkBatch.served``, :class:`~shared.records.schemas.ServedRow`). Whichever
   range claims first, each text is encoded once.
2. **encode**: the workers leave served rows out, as they leave out an earlier job's
   rows, write them empty and copy the list into the shard.
3. **read**: the readers of document shards (retrieval, the export) read them through
   :class:`ServedShards`, which fills each served row from its owner's shard.

The first claimant of a text is the job's for as long as the job chunks: a unit run
again finds its own claims, so it stages the same batches. A claimant is always encoded,
so a served row points at a row with vectors, and a shard keeps the list its unit was
encoded by. Only a ledger rebuilt from the store (Redis lost), or a late copy of a unit
after ``seal`` dropped the claims, would let a range chunked again claim anew; so then
nothing is claimed (every chunk staged is its own, and the pointers of batches staged
before still point at encoded rows), and the reader refuses a pointer cycle instead of
serving zeros.

The claims cost Redis memory (about 100 bytes a distinct text) only while the job
chunks, and are bounded: a job claims at most ``EMBED_FLEET_TEXT_CLAIMS`` texts (2
million by default; 0 turns claims off); past that, a text first seen later is found
again only within its encode unit. BM25's term counts are cheap and make the batch's
document frequencies, so every row keeps its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from shared.inputs.models import BM25
from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobStore
from shared.records.schemas import DenseShard, Matrix, ServedRow, SparseShard

# The place of a chunk: its batch and row (five digits: a batch holds fewer rows).
ROW_DIGITS = 5


def place(batch_id: str, row: int) -> str:
    """A chunk's place, as the claims hold it: ``b00003-00012:00042``."""
    return f"{batch_id}:{row:0{ROW_DIGITS}d}"


def served_rows(batch_id: str, found: Sequence[str], rows: Sequence[int]) -> list[ServedRow]:
    """The served rows of a batch, from what its claims found (``found[i]``: the place
    of the chunk that claimed the text of row ``rows[i]``, or ``""``)."""
    out: list[ServedRow] = []
    for row, where in zip(rows, found, strict=True):
        if where:
            owner_batch, owner_row = where.rsplit(":", 1)
            out.append(ServedRow(row, owner_batch, int(owner_row)))
    return out


Shard = DenseShard | SparseShard
S = TypeVar("S", DenseShard, SparseShard)


class ServedShards:
    """Reads a job's document shards with their served rows filled from the rows they
    point at. The shards last read are kept (``keep``): a passage repeated all over a
    corpus points at one shard, read once."""

    def __init__(self, store: JobStore, keep: int = 16) -> None:
        self.store = store
        self.keep = keep
        self._kept: OrderedDict[tuple[str, str], Shard] = OrderedDict()

    def dense(self, batch_id: str) -> DenseShard:
        """The batch's dense shard, every row holding its vectors."""
        shard = self._read("dense", batch_id)
        assert isinstance(shard, DenseShard)
        if not shard.served:
            return shard
        matrices = {name: matrix.to_numpy().copy() for name, matrix in shard.vectors.items()}
        for served in shard.served:
            owner, row = self._owner("dense", batch_id, served)
            assert isinstance(owner, DenseShard)
            for name, matrix in matrices.items():
                if name in owner.vectors:
                    matrix[served.row] = owner.vectors[name].to_numpy()[row]
        vectors = {name: Matrix.from_numpy(m) for name, m in matrices.items()}
        return _filled(shard, vectors=vectors)

    def sparse(self, batch_id: str) -> SparseShard:
        """The batch's sparse shard, every row of every model holding its weights (BM25's
        term counts are each row's own)."""
        shard = self._read("sparse", batch_id)
        assert isinstance(shard, SparseShard)
        if not shard.served:
            return shard
        rows = {name: list(model_rows) for name, model_rows in shard.rows.items()}
        for served in shard.served:
            owner, row = self._owner("sparse", batch_id, served)
            assert isinstance(owner, SparseShard)
            for name, model_rows in rows.items():
                if name != BM25 and name in owner.rows:
                    model_rows[served.row] = owner.rows[name][row]
        return _filled(shard, rows=rows)

    def _owner(self, stage: str, batch_id: str, served: ServedRow) -> tuple[Shard, int]:
        """The shard and row that hold a served row's vectors: its owner, or the owner's
        own owner where that row was served too (see the module doc)."""
        seen = {(batch_id, served.row)}
        pointer = served
        while True:
            here = (pointer.batch_id, pointer.owner_row)
            if here in seen:
                raise EmbedFleetError(
                    f"{stage} shard {batch_id} row {served.row}: its text's owner, "
                    f"{pointer.batch_id} row {pointer.owner_row}, leads back to it: no row "
                    "on the way was encoded",
                    "The job's staged batches changed under it (its claims in Redis were "
                    "lost while it chunked); run the job again",
                )
            seen.add(here)
            owner = self._read(stage, pointer.batch_id)
            further = next((s for s in owner.served if s.row == pointer.owner_row), None)
            if further is None:
                return owner, pointer.owner_row
            pointer = further

    def _read(self, stage: str, batch_id: str) -> Shard:
        key = (stage, batch_id)
        shard = self._kept.get(key)
        if shard is not None:
            self._kept.move_to_end(key)
            return shard
        shard = self.store.dense(batch_id) if stage == "dense" else self.store.sparse(batch_id)
        self._kept[key] = shard
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)
        return shard


def _filled(shard: S, **changes: Any) -> S:
    """The shard with its served rows filled, and no longer listed as served."""
    return msgspec.structs.replace(shard, served=[], **changes)
