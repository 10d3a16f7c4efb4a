"""`export --to delta`, from two real jobs of a corpus that changed a little (two documents
edited, one of them cut short, two removed, three added: ``tests/reuse_jobs.py``, the
changed one embedded from scratch): the deletes are exactly the chunks that went, and the
old job's chunks with the delta applied in DuckDB are the new job's, every column,
vectors bit for bit (BM25 left out: its weights are the collection's)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import base_env, run_cli
from deltas import applied, assert_same_rows
from reuse_jobs import ADDED, APPENDED, CUT_SHORT, MIRROR, REMOVED, ReuseJobs

from shared.records.ids import doc_id_of

pytestmark = pytest.mark.e2e

DROP = ("--drop-columns", "sparse_bm25")  # BM25's weights are the collection's own


class Jobs(NamedTuple):
    """OLD (the first corpus) and NEW (the changed one, from scratch), as the delta sees
    them: without their BM25 column."""

    out: Path
    old: dict[str, Any]  # the manifests
    new: dict[str, Any]
    shared: ReuseJobs

    def chunks(self, manifest: dict[str, Any]) -> pa.Table:
        table = pq.read_table([str(self.out / key) for key in manifest["chunks"]["parts"]])
        return table.drop_columns(["sparse_bm25"])

    def folder(self, manifest: dict[str, Any]) -> Path:
        return self.out / manifest["collection"] / manifest["job_id"]


@pytest.fixture(scope="module")
def jobs(reuse_jobs: ReuseJobs) -> Jobs:
    old, new = reuse_jobs.manifests["first"], reuse_jobs.manifests["clean"]
    assert len(old["chunks"]["parts"]) > 1 and len(new["chunks"]["parts"]) > 1
    return Jobs(reuse_jobs.out, old, new, reuse_jobs)


def export_delta(jobs: Jobs, out_dir: Path, *against: str) -> Any:
    return run_cli(
        "export", jobs.new["job_id"], "--to", "delta", str(out_dir), *against, *DROP,
        "--output", str(jobs.out), env=base_env(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def delta(jobs: Jobs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """NEW against OLD by its job id: the folder and what the command printed."""
    folder = tmp_path_factory.mktemp("delta-out") / "delta"
    exported = export_delta(jobs, folder, "--against", jobs.old["job_id"])
    assert exported.returncode == 0, exported.stderr
    return folder, exported.stderr


def ids(table: pa.Table) -> set[str]:
    return set(table.column("chunk_id").to_pylist())


def test_deletes_are_the_chunks_that_went(jobs: Jobs, delta: tuple[Path, str]) -> None:
    old_ids, new_ids = ids(jobs.chunks(jobs.old)), ids(jobs.chunks(jobs.new))
    deletes = pq.read_table(delta[0] / "deletes.parquet")
    assert deletes.schema.names == ["chunk_id"] and deletes.schema.field(0).type == pa.string()
    before = jobs.shared.before
    removed = {c for c in old_ids if doc_id_of(c) in {before[i]["_id"] for i in REMOVED}}
    edited = {before[APPENDED]["_id"], before[CUT_SHORT]["_id"]}
    vanished = {c for c in old_ids - new_ids if doc_id_of(c) in edited}
    assert removed and vanished
    assert sorted(deletes.column("chunk_id").to_pylist()) == sorted(removed | vanished)


def test_upserts_are_the_new_and_changed_rows_as_the_parts_are(
    jobs: Jobs, delta: tuple[Path, str]
) -> None:
    old, new = jobs.chunks(jobs.old), jobs.chunks(jobs.new)
    parts = sorted((delta[0] / "upserts").glob("part-*.parquet"))
    upserted = pq.read_table([str(p) for p in parts]).column("chunk_id").to_pylist()
    assert len(upserted) == len(set(upserted)) and set(upserted) <= ids(new)
    added_ids = {f"new-{i}" for i in ADDED} | {MIRROR}
    added = {c for c in ids(new) if doc_id_of(c) in added_ids}
    assert added and added <= set(upserted)
    old_texts = dict(zip(old["chunk_id"].to_pylist(), old["text"].to_pylist(), strict=True))
    new_texts = zip(new["chunk_id"].to_pylist(), new["text"].to_pylist(), strict=True)
    retexted = {c for c, text in new_texts if c in old_texts and old_texts[c] != text}
    assert retexted and retexted <= set(upserted)
    schema = pq.read_schema(jobs.out / jobs.new["chunks"]["parts"][0])
    schema = schema.remove(schema.get_field_index("sparse_bm25"))
    for part in parts:  # the same columns, types and schema metadata
        assert pq.read_schema(part).equals(schema, check_metadata=True)


def test_the_report_counts_and_lists_every_file(jobs: Jobs, delta: tuple[Path, str]) -> None:
    folder, printed = delta
    report = json.loads((folder / "delta.json").read_text())
    assert (report["job_id"], report["old_job_id"]) == (jobs.new["job_id"], jobs.old["job_id"])
    assert report["old_job"] == str(jobs.folder(jobs.old))
    counts = report["counts"]
    old, new = jobs.chunks(jobs.old), jobs.chunks(jobs.new)
    assert (counts["old_rows"], counts["new_rows"]) == (old.num_rows, new.num_rows)
    assert counts["added"] == len(ids(new) - ids(old))
    assert counts["deletes"] == len(ids(old) - ids(new))
    assert counts["upserts"] == counts["added"] + counts["changed"]
    assert counts["upserts"] + counts["unchanged"] == new.num_rows
    assert sorted(Path(f["path"]).name for f in report["files"]) == [
        "deletes.parquet",
        "part-00000.parquet",
    ]
    for file in report["files"]:
        data = Path(file["path"]).read_bytes()
        assert (file["bytes"], file["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert file["rows"] == pq.read_metadata(file["path"]).num_rows
    lines = printed.strip().splitlines()
    assert len(lines) == len(report["files"]) + 1
    assert lines[-1].startswith(
        f"{counts['upserts']} upserts ({counts['added']} added, {counts['changed']} changed), "
        f"{counts['deletes']} deletes, {counts['unchanged']} unchanged"
    )


def test_the_delta_applied_in_duckdb_gives_the_new_job(jobs: Jobs, delta: tuple[Path, str]) -> None:
    got = applied(jobs.chunks(jobs.old), delta[0])
    assert_same_rows(got, jobs.chunks(jobs.new).sort_by("chunk_id"))


def test_more_buckets_and_smaller_files_give_the_same_delta(
    jobs: Jobs, delta: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buckets of 40 rows, as a large corpus gets them (of a million): the same rows."""
    from producer import delta_export
    from shared.records.earlier_jobs import finished_job
    from shared.records.storage import LocalStore

    monkeypatch.setattr(delta_export, "ROWS_PER_BUCKET", 40)
    store = LocalStore(jobs.out)
    new, old = (finished_job(store, m["job_id"]) for m in (jobs.new, jobs.old))
    assert delta_export.bucket_count(new.manifest(), old.manifest()) > 5
    report = delta_export.export_delta(new, old, tmp_path / "buckets", ["sparse_bm25"])
    want = json.loads((delta[0] / "delta.json").read_text())
    assert msgspec.to_builtins(report.counts) == want["counts"]
    assert report.files[0].sha256 == want["files"][0]["sha256"]  # upserts: in NEW's order
    deletes = [pq.read_table(f / "deletes.parquet") for f in (delta[0], tmp_path / "buckets")]
    assert sorted(deletes[0]["chunk_id"].to_pylist()) == sorted(deletes[1]["chunk_id"].to_pylist())

    part = pq.read_table(jobs.out / jobs.new["chunks"]["parts"][0]).slice(0, 24)
    (tmp_path / "rolled").mkdir()
    part = part.drop_columns(["sparse_bm25"])
    files = delta_export.UpsertFiles(tmp_path / "rolled", part.schema, 20)
    for start in (0, 8, 16):
        files.write(part.slice(start, 8))
    assert [f.rows for f in files.close()] == [16, 8]
    rolled = pq.read_table(tmp_path / "rolled")
    assert rolled.equals(part) and rolled.schema.metadata == part.schema.metadata


def test_against_the_old_jobs_folder_is_the_same_delta(
    jobs: Jobs, delta: tuple[Path, str], tmp_path: Path
) -> None:
    exported = export_delta(jobs, tmp_path, "--against", str(jobs.folder(jobs.old)))
    assert exported.returncode == 0, exported.stderr
    by_id = json.loads((delta[0] / "delta.json").read_text())
    by_folder = json.loads((tmp_path / "delta.json").read_text())
    assert by_folder["old_job"] == by_id["old_job"] and by_folder["counts"] == by_id["counts"]
    assert [f["sha256"] for f in by_folder["files"]] == [f["sha256"] for f in by_id["files"]]


def test_no_old_job_is_one_clear_error(jobs: Jobs, tmp_path: Path) -> None:
    missing = export_delta(jobs, tmp_path / "delta")  # the job reused no earlier job
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "--against OLD_JOB" in missing.stderr
    elsewhere = run_cli(
        "export", jobs.new["job_id"], "--to", "faiss", str(tmp_path / "faiss"),
        "--against", jobs.old["job_id"], "--output", str(jobs.out), env=base_env(),
    )  # fmt: skip
    assert (
        elsewhere.returncode == 2
        and "--against and --drop-columns only apply to --to delta" in elsewhere.stderr
    )


def test_a_jsonl_job_is_refused(jobs: Jobs, tmp_path: Path) -> None:
    jsonl = jobs.shared.manifests["other_dtype"]  # a job written with --format jsonl
    refused = export_delta(jobs, tmp_path / "delta", "--against", jsonl["job_id"])
    assert refused.returncode == 2
    assert f"job {jsonl['job_id']} wrote its chunks as jsonl" in refused.stderr
    assert "--format parquet" in refused.stderr
