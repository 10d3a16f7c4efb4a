"""The fleet prepares a collection (validate, dedupe, chunk on the prepare queue) and
the job comes out as the producer alone would make it: the same chunks, skipped records
at the same file lines, the same counts; a bad record or a duplicate across ranges fails
the job with file and line and leaves nothing behind; a prepare worker killed mid-range
costs a redelivery, nothing lost or doubled, also while it copies an earlier job's
vectors (``run --reuse``)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from artifacts import chunk_records, in_reading_order
from conftest import CRANFIELD, REPO, base_env, run_cli
from servers import SeaweedS3

from shared.control.ledger import JOBS_INDEX, JobLedger
from shared.records.schemas import ChunkBatch

pytestmark = pytest.mark.e2e


def events(stdout: str, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == kind]


def collection(tmp_path: Path, docs: int, extra: dict[int, bytes] | None = None) -> Path:
    """The first ``docs`` Cranfield documents as a JSONL file, with ``extra`` lines put
    in before the given positions."""
    lines = [line.encode() for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines()]
    out: list[bytes] = []
    for i, line in enumerate(lines[:docs]):
        out += [(extra or {}).get(i, b"")] if i in (extra or {}) else []
        out.append(line)
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def local_files(folder: Path) -> Any:
    def get(key: str) -> bytes:
        return (folder / key).read_bytes()

    return get


def run_json(
    source: Path | str,
    out: Path | str,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    result = run_cli(
        "run", str(source), "--output", str(out), "--format", "jsonl", "--json", *args,
        env=env or base_env(), cwd=cwd or Path(out).parent, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest: dict[str, Any] = events(result.stdout, "summary")[-1]["manifest"]
    return manifest


def test_the_fleet_prepares_a_collection_as_the_producer_does(tmp_path: Path) -> None:
    """Many small read ranges, a bad record, an empty document and a duplicate id two
    ranges after its first record, under --on-bad-record skip."""
    first = json.loads((CRANFIELD / "corpus.jsonl").read_text().splitlines()[3])
    duplicate = json.dumps({**first, "text": "a later copy"}).encode()
    source = collection(
        tmp_path, 160, {40: b"not json", 90: duplicate, 120: b'{"_id": "empty", "text": ""}'}
    )
    fleet = run_json(source, tmp_path / "fleet", "--on-bad-record", "skip", "--range-mb", "0.01")
    alone = run_json(
        source, tmp_path / "alone", "--on-bad-record", "skip", "--prepare-on", "producer"
    )
    assert fleet["spec"]["prepare_on"] == "fleet" and alone["spec"]["prepare_on"] == "producer"
    assert {"validate", "dedupe", "chunk"} <= set(fleet["stages"])
    assert fleet["stages"]["validate"]["batches"] > 10  # many ranges, a unit each
    assert fleet["stages"]["dedupe"]["batches"] > 1
    for key in ("documents", "chunks", "empty_documents", "skipped_records"):
        assert fleet["counts"][key] == alone["counts"][key], key
    assert fleet["empty_documents"] == alone["empty_documents"] == ["empty"]
    lines = [(r["line"], r["reason"]) for r in fleet["skipped_records"]]
    assert lines == [(r["line"], r["reason"]) for r in alone["skipped_records"]]
    assert [line for line, _ in lines] == [41, 92]  # file lines, across ranges
    assert lines[1][1] == f"duplicate id {first['_id']!r} (first seen at line 4)"
    got = chunk_records(fleet, local_files(tmp_path / "fleet"))
    want = chunk_records(alone, local_files(tmp_path / "alone"))
    assert [(r["chunk_id"], r["text"]) for r in got] == [(r["chunk_id"], r["text"]) for r in want]
    assert "a later copy" not in {r["text"] for r in got}


@pytest.mark.parametrize(
    ("extra", "line", "reason"),
    [
        ({70: b'{"_id": "x", "text": "caf\xe9"}'}, 71, "invalid UTF-8"),
        ({100: b'{"_id": "5", "text": "again"}'}, 101, "duplicate id '5' (first seen at line 5)"),
    ],
    ids=["bad-record", "duplicate-across-ranges"],
)
def test_a_bad_record_found_on_the_fleet_fails_the_job_and_leaves_nothing(
    tmp_path: Path, extra: dict[int, bytes], line: int, reason: str
) -> None:
    source = collection(tmp_path, 120, extra)
    out = tmp_path / "out"
    result = run_cli(
        "run", str(source), "--output", str(out), "--range-mb", "0.01",
        env=base_env(), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"{source}:{line}: {reason}" in errors[0] and "--on-bad-record skip" in errors[0]
    assert "Traceback" not in result.stderr
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert leftovers == [], leftovers  # no chunk, no staged batch, no manifest


def test_a_prepare_worker_killed_mid_range_costs_nothing(
    fleet_env, bucket, s3, redis_server, start_worker, tmp_path
) -> None:
    """Killed while it chunks a job that reuses an earlier job's vectors (on S3), so
    mid-copy too: the range is redelivered, nothing is lost or doubled, and every chunk
    the earlier job had still gets its vector bit for bit."""
    source = collection(tmp_path, 500)
    earlier_source = tmp_path / "earlier" / "corpus.jsonl"
    earlier_source.parent.mkdir()
    earlier_source.write_text("".join(source.read_text().splitlines(keepends=True)[:300]))
    start_worker("dense", fleet_env)
    start_worker("aggregate", fleet_env)
    victim = start_worker("prepare", fleet_env)
    earlier = run_cli(
        "run", str(earlier_source), "--output", f"s3://{bucket}", "--json", env=fleet_env
    )  # fmt: skip
    assert earlier.returncode == 0, earlier.stderr
    earlier_manifest = events(earlier.stdout, "summary")[-1]["manifest"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "run", str(source), "--output", f"s3://{bucket}",
         "--range-mb", "0.03", "--format", "jsonl", "--keep-work", "--json",
         "--reuse", earlier_manifest["job_id"]],
        env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    client = redis_server.client()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        jobs = client.zrange(JOBS_INDEX, 0, -1)
        if jobs and jobs[-1].decode() != earlier_manifest["job_id"]:
            ledger = JobLedger(client, jobs[-1].decode())
            if ledger.phase_opened("chunk") and len(ledger.reports("chunk")) >= 3:
                break
        time.sleep(0.05)
    else:
        pytest.fail("the prepare worker chunked nothing")
    victim.kill9()
    done_at_kill = len(ledger.reports("chunk"))
    start_worker("prepare", fleet_env)
    stdout, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 0, stderr
    ranges = {s.stage: s.total for s in ledger.progress().stages}["chunk"]
    assert ranges is not None and done_at_kill < ranges  # the kill was mid-phase
    manifest = events(stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["counts"]["documents"] == 500
    s3c = s3.client()

    def get(key: str) -> bytes:
        return bytes(s3c.get_object(Bucket=bucket, Key=key)["Body"].read())

    records = chunk_records(manifest, get)
    exported = [r["chunk_id"] for r in records]
    staged: list[str] = []
    job = f"corpus/{manifest['job_id']}"
    for batch_id in ledger.staged_batches():
        raw = get(f"{job}/work/batches/{batch_id}.msgpack")
        staged += [c.chunk_id for c in msgspec.msgpack.decode(raw, type=ChunkBatch).chunks]
    assert len(exported) == len(set(exported)) == manifest["counts"]["chunks"]
    assert sorted(exported) == sorted(staged)  # nothing lost or doubled
    # Staged longest first in like-length windows; exported back in reading order.
    assert exported == in_reading_order(staged, source.read_text().splitlines()) != staged
    assert manifest["stages"]["chunk"]["batches"] == ranges
    # The earlier job's 300 documents are the same: their chunks' vectors are its own.
    before = {r["chunk_id"]: r for r in chunk_records(earlier_manifest, get)}
    changes = manifest["changes"]
    assert changes["chunks_found"] == len(before) == next(iter(changes["reused"].values()))
    kept = {r["doc_id"] for r in before.values()}
    assert changes["documents"]["unchanged"] == len(kept) > 250
    assert changes["documents"]["added"] == len({r["doc_id"] for r in records} - kept) > 150
    (model,) = manifest["spec"]["dense_models"]
    for record in records:
        if record["chunk_id"] in before:
            mine = np.asarray(record["dense"][model], np.float32)
            theirs = np.asarray(before[record["chunk_id"]]["dense"][model], np.float32)
            assert mine.tobytes() == theirs.tobytes(), record["chunk_id"]


def test_redis_lost_while_the_fleet_prepares_then_resume_completes_the_job(
    fleet_env, bucket, s3, start_worker, tmp_path, redis_client
) -> None:
    """Redis loses everything while ranges of a job that reuses an earlier job's vectors
    are being chunked (and their first batches encoded): `resume --output` rebuilds the
    ledger from the store (the read plan, each chunked range's batches), re-drives the
    first phase not done, and the job completes with every document's chunks exactly
    once, and every chunk the earlier job had with its vector bit for bit."""
    source = collection(tmp_path, 300)
    earlier_source = tmp_path / "earlier" / "corpus.jsonl"
    earlier_source.parent.mkdir()
    earlier_source.write_text("".join(source.read_text().splitlines(keepends=True)[:200]))
    start_worker("dense", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    output = f"s3://{bucket}/lost"
    earlier = run_cli("run", str(earlier_source), "--output", output, "--json", env=fleet_env)
    assert earlier.returncode == 0, earlier.stderr
    earlier_manifest = events(earlier.stdout, "summary")[-1]["manifest"]
    submitted = run_cli(
        "run", str(source), "--output", output, "--range-mb", "0.02",
        "--batch-chunks", "8", "--reuse", earlier_manifest["job_id"], "--detach",
        env=fleet_env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    ledger = JobLedger(redis_client, job_id)
    deadline = time.monotonic() + 240
    while not (ledger.phase_opened("chunk") and len(ledger.reports("chunk")) >= 2):
        assert time.monotonic() < deadline, ledger.status()
        time.sleep(0.05)
    assert not ledger.phase_opened("encode"), "too late for the fault: already sealed"
    redis_client.flushall()  # Redis lost, as a restart without persistence leaves it
    resumed = run_cli("resume", job_id, "--output", output, "--json", env=fleet_env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert ledger.was_rebuilt()
    manifest = events(resumed.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["counts"]["documents"] == 300
    s3c = s3.client()

    def get(key: str) -> bytes:
        return bytes(s3c.get_object(Bucket=bucket, Key=f"lost/{key}")["Body"].read())

    records = chunk_records(manifest, get)
    chunk_ids = [r["chunk_id"] for r in records]
    assert len(chunk_ids) == len(set(chunk_ids)) == manifest["counts"]["chunks"]
    docs = {c.rsplit("#", 1)[0] for c in chunk_ids}
    assert len(docs) == 300 - len(manifest["empty_documents"])
    # Whatever the earlier job had is its own vector, whichever side of the loss it was
    # copied on; the rest was encoded, each chunk once.
    before = {r["chunk_id"]: r for r in chunk_records(earlier_manifest, get)}
    (model,) = manifest["spec"]["dense_models"]
    assert manifest["changes"]["reused"][model] == len(before) > 200
    changes = manifest["changes"]
    served = changes["encoded"][model] + changes["repeats"].get(model, 0)
    assert served == len(records) - len(before)
    for record in records:
        if record["chunk_id"] in before:
            mine = np.asarray(record["dense"][model], np.float32)
            theirs = np.asarray(before[record["chunk_id"]]["dense"][model], np.float32)
            assert mine.tobytes() == theirs.tobytes(), record["chunk_id"]


def test_compressed_collections_prepare_as_the_plain_one(tmp_path: Path) -> None:
    """A BEIR folder holding corpus.jsonl.gz, prepared by the fleet, and a .jsonl.zst
    file, prepared by the producer: the same documents, chunks and skipped line."""
    import gzip

    import zstandard

    plain = collection(tmp_path, 80, {30: b"not json"})
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    zst = tmp_path / "corpus.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    fleet = run_json(beir, tmp_path / "gz", "--on-bad-record", "skip")
    alone = run_json(zst, tmp_path / "zst", "--on-bad-record", "skip", "--prepare-on", "producer")
    assert fleet["spec"]["prepare_on"] == "fleet" and fleet["counts"]["documents"] == 80
    for key in ("documents", "chunks", "skipped_records"):
        assert fleet["counts"][key] == alone["counts"][key], key
    skips = [(r["path"], r["line"]) for r in fleet["skipped_records"] + alone["skipped_records"]]
    assert skips == [(str(beir / "corpus.jsonl.gz"), 31), (str(zst), 31)]
    got = chunk_records(fleet, local_files(tmp_path / "gz"))
    want = chunk_records(alone, local_files(tmp_path / "zst"))
    assert [(r["chunk_id"], r["text"]) for r in got] == [(r["chunk_id"], r["text"]) for r in want]


def test_a_parquet_dataset_and_a_csv_prepare_alike(tmp_path: Path) -> None:
    """The same 60 Cranfield documents (and one row with no id) as a Parquet dataset of
    two files in row groups of 8, prepared by the fleet a few row groups per range, and
    as a CSV file with other column names, prepared by the producer."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [json.loads(x) for x in (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:60]]
    rows = [
        {"doc": d["_id"], "body": d["text"], "head": d["title"], "n": i} for i, d in enumerate(docs)
    ]
    rows.insert(20, {"doc": "", "body": "no id", "head": "", "n": -1})
    dataset = tmp_path / "dataset"
    (dataset / "data").mkdir(parents=True)
    for number, part in enumerate((rows[:31], rows[31:])):
        table = pa.Table.from_pylist(part)
        pq.write_table(table, dataset / "data" / f"train-{number}.parquet", row_group_size=8)
    with (tmp_path / "same.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["doc", "body", "head", "n"])
        writer.writeheader()
        writer.writerows(rows)
    mapping = ("--id-field", "doc", "--text-field", "body", "--title-field", "head")
    mapping += ("--metadata-fields", "n", "--on-bad-record", "skip")
    fleet = run_json(dataset, tmp_path / "pq", *mapping, "--range-mb", "0.001")
    alone = run_json(tmp_path / "same.csv", tmp_path / "csv", *mapping, "--prepare-on", "producer")
    assert fleet["stages"]["validate"]["batches"] >= 4  # several row-group ranges
    assert fleet["counts"]["documents"] == alone["counts"]["documents"] == 60
    assert [(Path(r["path"]).name, r["line"]) for r in fleet["skipped_records"]] == [
        ("train-0.parquet", 21)
    ]
    assert [r["line"] for r in alone["skipped_records"]] == [22]  # the header is line 1
    got = chunk_records(fleet, local_files(tmp_path / "pq"))
    want = chunk_records(alone, local_files(tmp_path / "csv"))
    assert [(r["chunk_id"], r["text"]) for r in got] == [(r["chunk_id"], r["text"]) for r in want]
    assert got[0]["metadata"] == {"n": 0} and want[0]["metadata"] == {"n": "0"}


def test_a_collection_in_s3_is_prepared_by_the_fleet_as_the_same_files_on_disk(
    tmp_path: Path, s3: SeaweedS3, bucket: str
) -> None:
    """A BEIR folder in S3 (corpus, queries and qrels), read by the embedded fleet's
    prepare workers in many ranged reads and written back to S3 with the same endpoint
    and credentials, against the folder on disk prepared by the producer: the same
    chunks, the same skipped line (named by its s3:// URL) and the same retrieval
    quality."""
    client: Any = s3.client()
    queries = (CRANFIELD / "queries.jsonl").read_text().splitlines()[:20]
    kept = {json.loads(q)["_id"] for q in queries}
    qrels = (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    collection(folder, 120, {50: b"not json"})
    (folder / "queries.jsonl").write_text("\n".join(queries) + "\n")
    judged = [qrels[0], *(x for x in qrels[1:] if x.split("\t")[0] in kept)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(judged) + "\n")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"collections/beir/{path.relative_to(folder)}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    url = f"s3://{bucket}/collections/beir"
    skip = ("--on-bad-record", "skip")
    fleet = run_json(
        url, f"s3://{bucket}/out", *skip, "--range-mb", "0.01", env=base_env(**s3.env), cwd=tmp_path
    )
    alone = run_json(folder, tmp_path / "alone", *skip, "--prepare-on", "producer")
    assert fleet["spec"]["source"] == url and fleet["spec"]["prepare_on"] == "fleet"
    assert fleet["stages"]["validate"]["batches"] > 5  # many ranges, each read from S3
    for key in ("documents", "chunks", "skipped_records"):
        assert fleet["counts"][key] == alone["counts"][key], key
    assert [(r["path"], r["line"]) for r in fleet["skipped_records"]] == [
        (f"{url}/corpus.jsonl", 51)
    ]
    assert fleet["spec"]["retrieval"]["queries_source"] == f"{url}/queries.jsonl"
    # Batched differently (ranges against one stream), so equal up to float noise.
    assert fleet["metrics"].keys() == alone["metrics"].keys()
    for ranking, figures in fleet["metrics"].items():
        assert figures == pytest.approx(alone["metrics"][ranking], abs=0.02), ranking
    assert fleet["metrics"]["dense"]["queries"] > 0

    def from_s3(key: str) -> bytes:  # a manifest key is under the output's prefix
        return bytes(client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read())

    got = chunk_records(fleet, from_s3)
    want = chunk_records(alone, local_files(tmp_path / "alone"))
    assert [(r["chunk_id"], r["text"]) for r in got] == [(r["chunk_id"], r["text"]) for r in want]


def test_a_compressed_bomb_and_a_document_of_too_many_chunks_are_bad_records_on_the_fleet(
    fleet_env, bucket, redis_server, start_worker, tmp_path
) -> None:
    """Issue 29's bomb at a scale CI affords: one 160 MB record in a .jsonl.gz of about
    a megabyte, among Cranfield documents, and a document of more chunks than the job
    allows. Under skip the job completes without either, both listed by file line, and
    the prepare worker's resident memory never grows by 200 MB (the record is read past
    in blocks, twice: validated, then chunked)."""
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path / "corpus.jsonl.gz"
    book = " ".join(f"word{i}" for i in range(3_000))  # some 40 chunks of 128 tokens
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.writelines(line.encode() for line in lines[:20])
        out.write(b'{"_id": "bomb", "text": "')
        block = b"lorem ipsum " * 87_381  # 1 MiB
        for _ in range(160):
            out.write(block)
        out.write(b'"}\n')
        out.writelines(line.encode() for line in lines[20:40])
        out.write(json.dumps({"_id": "book", "text": book}).encode() + b"\n")
    assert path.stat().st_size < 2 * 2**20
    prepare = start_worker("prepare", fleet_env)
    start_worker("aggregate", fleet_env)
    start_worker("dense", fleet_env)
    prepare.wait_ready()
    baseline = max(rss for rss, _ in prepare.memory().values())
    started = time.monotonic()
    result = run_cli(
        "run", str(path), "--output", f"s3://{bucket}", "--format", "jsonl", "--json",
        "--on-bad-record", "skip", "--chunk-tokens", "128", "--max-document-chunks", "20",
        env=fleet_env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    manifest = events(result.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete"
    assert manifest["counts"]["documents"] == 40
    assert manifest["counts"]["skipped_records"] == 2
    skipped = [(r["line"], r["reason"]) for r in manifest["skipped_records"]]
    assert [line for line, _ in skipped] == [21, 42]
    size = len(b'{"_id": "bomb", "text": "') + 160 * len(block) + len(b'"}\n')
    assert skipped[0][1].startswith(f"record of {size:,} bytes, over the limit of 67,108,864")
    assert skipped[1][1].startswith("more than 20 chunks of 128 tokens (--max-document-chunks")
    peak = max(hwm for _, hwm in prepare.memory().values())
    print(
        f"bomb: job {took:.1f} s, prepare worker {baseline / 2**20:.0f} -> {peak / 2**20:.0f} MiB"
    )
    assert peak - baseline < 200 * 2**20, (baseline, peak)
