"""Re-embedding a changed corpus (``run --reuse``), on the embedded fleet with real models
(the jobs of ``tests/reuse_jobs.py``: a 60-document Cranfield corpus, then a changed copy
embedded with ``--reuse`` and from scratch). The reusing job must encode exactly the
chunks the earlier job did not have (a text it holds twice, once), copy the others bit
for bit, and otherwise equal the clean job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import base_env, run_cli
from deltas import applied, assert_same_rows
from reuse_jobs import ADDED, APPENDED, CUT_SHORT, DOCUMENTS, MIRRORS, REMOVED, ReuseJobs

from producer.follow import repeat_lines
from shared.records.schemas import Manifest

pytestmark = pytest.mark.e2e

DENSE = "sentence-transformers/all-MiniLM-L6-v2"


def _rows(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {row["chunk_id"]: row for row in table.to_pylist()}


def test_changes_name_what_was_added_changed_removed_and_reused(reuse_jobs: ReuseJobs) -> None:
    jobs = reuse_jobs
    reused = jobs.manifests["reused"]
    changes = reused["changes"]
    assert changes["refused"] == ""
    assert changes["against_job"] == jobs.job_id("first")
    documents = changes["documents"]
    assert documents["added"] == len(ADDED) + len(MIRRORS)
    assert documents["removed"] == len(REMOVED)
    assert documents["changed"] == len((APPENDED, CUT_SHORT))
    assert documents["unchanged"] == DOCUMENTS - 2 - len(REMOVED)
    # What the earlier job had: the same document and the same text (key), row by row.
    earlier = {(r["doc_id"], r["text_key"]) for r in jobs.tables["first"].to_pylist()}
    now = jobs.tables["reused"].to_pylist()
    had = sum(1 for r in now if (r["doc_id"], r["text_key"]) in earlier)
    new = len(now) - had
    assert 0 < new < len(now)
    mirrored = sum(1 for r in now if r["doc_id"] in MIRRORS)
    assert mirrored > 0
    assert changes["chunks_found"] == had
    for model in (DENSE, "splade-tiny"):
        assert changes["reused"][model] == had, model
        # The mirrored pages' chunks are served their first copy's vectors, in the
        # same encode unit and in another.
        assert changes["encoded"][model] == new - mirrored, model
        assert changes["repeats"][model] == mirrored, model
        assert reused["counts"]["encoded"][model] == new - mirrored, model
    assert "bm25" not in changes["reused"]
    # The live view's figures (the ledger's, unit by unit) count them as reused.
    assert reused["stages"]["dense"]["items_reused"] == had
    report = (jobs.folder("reused") / "report.html").read_text()
    section = report[report.index('<section id="reuse">') :]
    section = section[: section.index("</section>")]
    assert f"{had:,} of {len(now):,}" in section and jobs.job_id("first") in section


def test_reused_vectors_are_the_earlier_ones_bit_for_bit_and_the_rest_match_a_clean_job(
    reuse_jobs: ReuseJobs,
) -> None:
    jobs = reuse_jobs
    first, reused, clean = (_rows(jobs.tables[name]) for name in ("first", "reused", "clean"))
    assert list(reused) == list(clean), "the same chunks, in the same order"
    dense = [c for c in jobs.tables["reused"].column_names if c.startswith("dense_")]
    splade = [c for c in jobs.tables["reused"].column_names if c.startswith("sparse_splade")]
    assert dense and splade
    copied = 0
    for chunk_id, row in reused.items():
        before = first.get(chunk_id)
        for column in dense:
            mine = np.asarray(row[column], np.float32)
            assert np.abs(mine - np.asarray(clean[chunk_id][column], np.float32)).max() <= 1e-5
        if before is not None and before["text_key"] == row["text_key"]:
            copied += 1
            for column in dense:
                assert np.array_equal(
                    np.asarray(row[column], np.float32).view(np.uint32),
                    np.asarray(before[column], np.float32).view(np.uint32),
                ), chunk_id
            for column in splade:
                assert row[column] == before[column], chunk_id
        # BM25 is the new collection's: as the clean job has it.
        assert row["sparse_bm25"] == clean[chunk_id]["sparse_bm25"], chunk_id
        assert row["text"] == clean[chunk_id]["text"]
    assert copied == jobs.manifests["reused"]["changes"]["chunks_found"]


def test_a_text_the_job_holds_twice_is_encoded_once_and_served_bit_for_bit(
    reuse_jobs: ReuseJobs,
) -> None:
    """The clean job (no reuse): each model encoded each distinct text once, across
    ranges and encode units, and a mirror's chunks hold their original's vectors."""
    jobs = reuse_jobs
    table = jobs.tables["clean"]
    rows = table.to_pylist()
    distinct = len({r["text_key"] for r in rows})
    assert distinct < len(rows)
    manifest = jobs.manifests["clean"]
    for model in (DENSE, "splade-tiny"):
        assert manifest["counts"]["encoded"][model] == distinct, model
    original = [r for r in rows if r["doc_id"] == f"new-{ADDED[0]}"]
    columns = [c for c in table.column_names if c.startswith(("dense_", "sparse_splade"))]
    for mirror in MIRRORS:
        copies = [r for r in rows if r["doc_id"] == mirror]
        assert len(copies) == len(original) > 1
        for theirs, mine in zip(original, copies, strict=True):
            assert mine["text_key"] == theirs["text_key"]
            for column in columns:
                assert mine[column] == theirs[column], (mirror, column)
    # `run` says so, per model.
    lines = repeat_lines(msgspec.convert(manifest, Manifest))
    served = f"{len(rows) - distinct:,} of {len(rows):,} chunks hold a text another chunk has"
    assert [line.split(": ")[1] for line in lines] == [DENSE, "splade-tiny"]
    assert all(served in line for line in lines), lines


def test_a_dtype_that_differs_reuses_nothing_and_says_so(reuse_jobs: ReuseJobs) -> None:
    """bf16 has another model key than the earlier job's fp32: every chunk is encoded,
    and `run` said so, before the job (what the earlier job has) and after it."""
    said = reuse_jobs.other_dtype_said
    assert "reuse: job " + reuse_jobs.job_id("first") in said
    manifest = reuse_jobs.manifests["other_dtype"]
    changes = manifest["changes"]
    assert changes["reused"][DENSE] == 0
    chunks = manifest["counts"]["chunks_exported"]
    assert changes["encoded"][DENSE] + changes["repeats"][DENSE] == chunks
    assert f"0 reused, {changes['encoded'][DENSE]} encoded" in said
    assert "(its model key differs" in said


def test_an_earlier_job_that_does_not_verify_or_goes_midway_is_never_copied(
    reuse_jobs: ReuseJobs, tmp_path: Path
) -> None:
    """The prepare side on its own, on a copy of the earlier job's folder: a part whose
    bytes no longer match the manifest refuses reuse at the index; a part deleted after
    the match makes the chunk stage encode those chunks (and say why), never copy."""
    import shutil

    import msgspec

    from shared.records import ids
    from shared.records.content_keys import text_key
    from shared.records.job_store import JobStore
    from shared.records.schemas import Chunk, JobSpec
    from shared.records.storage import LocalStore
    from workers.prepare.reuse import EarlierLookup, index_earlier_parts, match_partition

    jobs = reuse_jobs
    earlier = tmp_path / "earlier" / "cranfield" / jobs.job_id("first")
    shutil.copytree(jobs.folder("first"), earlier)
    out = tmp_path / "out"
    spec = msgspec.convert(jobs.manifests["reused"]["spec"], JobSpec)
    spec = msgspec.structs.replace(spec, job_id="probe", output=str(out), reuse=str(earlier))
    store = JobStore(LocalStore(out), spec.collection, spec.job_id)
    docs = {d["_id"]: i for i, d in enumerate(jobs.before)}
    first_seen = {doc_id: (0, line) for doc_id, line in docs.items()}

    def matched() -> Any:
        index_earlier_parts(spec, store, 0, 1, 2)
        return [match_partition(spec, store, ids.partition_id(p), 1, first_seen) for p in (0, 1)]

    part = earlier / "chunks" / "part-00000.parquet"
    intact = part.read_bytes()
    part.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    assert all("does not match its manifest's sha256" in m.refused for m in matched())
    part.write_bytes(intact)
    found = matched()
    assert not any(m.refused for m in found)
    assert sum(m.earlier_documents for m in found) == DOCUMENTS
    lookup = EarlierLookup(spec, store, ids.range_id(0), 2)
    row = _rows(jobs.tables["first"])[f"{jobs.before[0]['_id']}#0"]
    chunk = Chunk(chunk_id=row["chunk_id"], doc_id=row["doc_id"], index=0, text=row["text"],
                  n_tokens=1, span=(0, 1))  # fmt: skip
    assert lookup.stage("b-one", [chunk], [text_key(chunk.text)]) == [0]
    vectors = store.earlier_vectors("b-one")
    (dense,) = [c for c in vectors.dense]
    assert (
        vectors.dense[dense].to_numpy()[0].tobytes()
        == np.asarray(row[next(c for c in row if c.startswith("dense_"))], np.float32).tobytes()
    )
    part.unlink()
    lookup = EarlierLookup(spec, store, ids.range_id(0), 2)
    assert lookup.stage("b-two", [chunk], [text_key(chunk.text)]) == []
    assert lookup.found == lookup.chunks_lost == 1 and "part-00000" in lookup.lost


def test_the_delta_of_a_reusing_job_turns_the_earlier_parts_into_its_own(
    reuse_jobs: ReuseJobs, tmp_path: Path
) -> None:
    """`export --to delta` against the job it reused (its spec names it), BM25 left out
    (its weights are the collection's: nearly every row's moved): the earlier parts,
    with the deletes and upserts applied in DuckDB, are the new job's parts; the upserts
    are the chunks the earlier job did not have."""
    jobs = reuse_jobs
    out = jobs.out
    exported = run_cli(
        "export", jobs.job_id("reused"), "--to", "delta", str(tmp_path / "delta"),
        "--output", str(out), env=base_env(),
    )  # fmt: skip
    assert exported.returncode == 2 and "--drop-columns sparse_bm25" in exported.stderr
    exported = run_cli(
        "export", jobs.job_id("reused"), "--to", "delta", str(tmp_path / "delta"),
        "--output", str(out), "--drop-columns", "sparse_bm25", env=base_env(),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    report = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert report["old_job_id"] == jobs.job_id("first")
    first, reused = (jobs.tables[k].drop_columns(["sparse_bm25"]) for k in ("first", "reused"))
    gone = set(first["chunk_id"].to_pylist()) - set(reused["chunk_id"].to_pylist())
    deletes = pq.read_table(tmp_path / "delta" / "deletes.parquet")["chunk_id"].to_pylist()
    assert sorted(deletes) == sorted(gone) and gone
    earlier = {(r["doc_id"], r["text_key"]) for r in first.to_pylist()}
    upserted = pq.read_table(tmp_path / "delta" / "upserts").to_pylist()
    # Rows whose text the earlier job had are the same rows, vectors copied: only the
    # chunks it did not have are upserts.
    assert not {(r["doc_id"], r["text_key"]) for r in upserted} & earlier
    assert report["counts"]["unchanged"] == jobs.manifests["reused"]["changes"]["chunks_found"]
    assert_same_rows(applied(first, tmp_path / "delta"), reused.sort_by("chunk_id"))
