"""The jobs of a corpus that changed a little, shared by the tests of ``run --reuse``
(``test_reuse.py``) and of ``export --to delta`` (``test_delta_export.py``): real jobs on
the embedded fleet, built once per test session (each costs about half a minute).

The corpus: the first 60 Cranfield documents (v1). Then v2: one document edited (a
sentence added), one cut short, two removed, two added (later Cranfield documents under
new ids), and one of the added ones twice more under other ids: next to itself (in the
same read range and staged batch, so in the same encode unit), and at the end (in
another range, so in another unit). MiniLM + SPLADE-tiny + BM25 in
fp32, 64-token chunks (a document has several), read in ranges of 10 KB (so the match
runs over several id partitions) and written in parts of 100 rows (several per job).

- **first**: v1;
- **reused**: v2 with ``--reuse`` of *first* (by its id);
- **clean**: v2 from scratch;
- **other_dtype**: v2 with ``--reuse`` of *first* (by its folder) in bf16, written as
  JSONL: no vector is reused (another model key), and a delta refuses its parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import CRANFIELD, base_env, run_cli

DOCUMENTS = 60
APPENDED = 3  # a sentence added at its end
CUT_SHORT = 4  # its first 200 characters only
REMOVED = (5, 6)
ADDED = (DOCUMENTS, DOCUMENTS + 1)  # later Cranfield documents, under new ids
MIRROR = f"mirror-{ADDED[0]}"
FAR_MIRROR = f"far-mirror-{ADDED[0]}"
MIRRORS = (MIRROR, FAR_MIRROR)
OPTIONS = (
    "--sparse-models", "splade-tiny,bm25", "--dtype", "fp32", "--range-mb", "0.01",
    "--chunk-tokens", "64", "--part-rows", "100", "--no-queries",
)  # fmt: skip


@dataclass
class ReuseJobs:
    """The jobs' output folder, manifests and (Parquet) chunks, and the corpora."""

    out: Path
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]
    manifests: dict[str, dict[str, Any]]
    # What `run` printed for the other_dtype job (it runs without --json).
    other_dtype_said: str = ""
    tables: dict[str, pa.Table] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        manifest = self.manifests[name]
        return self.out / manifest["collection"] / manifest["job_id"]

    def job_id(self, name: str) -> str:
        job_id: str = self.manifests[name]["job_id"]
        return job_id


def corpora() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    lines = [json.loads(x) for x in (CRANFIELD / "corpus.jsonl").read_text().splitlines()]
    before = lines[:DOCUMENTS]
    after = [dict(doc) for doc in before]
    after[APPENDED]["text"] += " A sentence added in the second version of the corpus."
    after[CUT_SHORT]["text"] = after[CUT_SHORT]["text"][:200]
    after = [doc for i, doc in enumerate(after) if i not in REMOVED]
    after += [{**lines[i], "_id": f"new-{i}"} for i in ADDED]
    after.insert(20, after.pop(-2))
    after.insert(21, {**lines[ADDED[0]], "_id": MIRROR})
    after.append({**lines[ADDED[0]], "_id": FAR_MIRROR})
    return before, after


def run_job(source: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = run_cli(
        "run", str(source), "--output", str(out), *OPTIONS, "--json", *extra,
        env=base_env(), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")][-1]
    manifest: dict[str, Any] = summary["manifest"]
    return manifest


def build(root: Path) -> ReuseJobs:
    before, after = corpora()
    folders = {}
    for name, docs in (("v1", before), ("v2", after)):
        folder = root / name / "cranfield"
        folder.mkdir(parents=True)
        (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        folders[name] = folder
    out = root / "out"
    jobs = ReuseJobs(out, before, after, {})
    jobs.manifests["first"] = run_job(folders["v1"], out)
    jobs.manifests["reused"] = run_job(folders["v2"], out, "--reuse", jobs.job_id("first"))
    jobs.manifests["clean"] = run_job(folders["v2"], out)
    options = [o if o != "fp32" else "bf16" for o in OPTIONS]
    result = run_cli(
        "run", str(folders["v2"]), "--output", str(out), *options, "--format", "jsonl",
        "--reuse", str(jobs.folder("first")), env=base_env(), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs.other_dtype_said = " ".join((result.stdout + result.stderr).split())
    known = {m["job_id"] for m in jobs.manifests.values()}
    (other,) = [
        json.loads(path.read_text())
        for path in (out / "cranfield").glob("*/manifest.json")
        if path.parent.name not in known
    ]
    jobs.manifests["other_dtype"] = other
    for name in ("first", "reused", "clean"):
        keys = jobs.manifests[name]["chunks"]["parts"]
        jobs.tables[name] = pa.concat_tables([pq.read_table(out / key) for key in keys])
    return jobs
