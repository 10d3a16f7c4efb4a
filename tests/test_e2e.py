"""End to end: the CLI, a real Redis, real SeaweedFS, real Celery worker processes and
the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import browser
import msgspec
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from artifacts import check_artifacts, chunk_records, in_reading_order
from conftest import CRANFIELD, REPO, base_env, run_cli, start_cli
from crossencoder import build_tiny_cross_encoder

from producer.backlog import PRIORITIES, PRIORITY_SEPARATOR, waiting_counts
from shared.control.ledger import JOBS_INDEX, JobLedger
from shared.records.schemas import ChunkBatch
from workers.inference.sparse import bm25_tokenize

pytestmark = pytest.mark.e2e


def events(stdout: str, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == kind]


def s3_getter(client: Any, bucket: str, prefix: str = "") -> Callable[[str], bytes]:
    """An artifact's bytes by its manifest key, from a bucket (under an output prefix)."""

    def get(key: str) -> bytes:
        full = f"{prefix}/{key}" if prefix else key
        return bytes(client.get_object(Bucket=bucket, Key=full)["Body"].read())

    return get


def corpus_ids(path: Path) -> list[str]:
    return [json.loads(line)["_id"] for line in path.read_text().splitlines() if line.strip()]


class ManifestWatch(threading.Thread):
    """Lists the bucket while a job runs and notes what existed when the manifest
    first appeared: the manifest must never point at an object not yet written."""

    def __init__(self, client: Any, bucket: str) -> None:
        super().__init__(daemon=True)
        self.client, self.bucket = client, bucket
        self.keys_at_manifest: set[str] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.keys_at_manifest is None:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            keys = {item["Key"] for page in pages for item in page.get("Contents", [])}
            if any(k.endswith("manifest.json") for k in keys):
                self.keys_at_manifest = keys
            time.sleep(0.05)


def test_cranfield_to_s3(fleet_env, bucket, s3, start_worker, tmp_path) -> None:
    """The whole product on Cranfield: dense + sparse vectors, its 225 queries retrieved,
    fused (4 fuse units, on two aggregate workers) and reranked, evaluated against its
    judgements, all on S3."""
    # Batches take ~10 s on a busy 2-core machine: with the fixture's 8 s visibility
    # timeout (there for the kill -9 tests) Redis would hand each one out again.
    fleet_env = {**fleet_env, "EMBED_FLEET_VISIBILITY_TIMEOUT": "300"}
    start_worker("dense,rerank", fleet_env)
    start_worker("sparse", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    start_worker("aggregate", fleet_env)
    reranker = build_tiny_cross_encoder(tmp_path / "tiny-cross-encoder")
    client = s3.client()
    watch = ManifestWatch(client, bucket)
    watch.start()
    result = run_cli(
        "run",
        str(CRANFIELD),
        "--output",
        f"s3://{bucket}/runs",
        "--enable-sparse",
        "--rerank-model",
        str(reranker),
        "--top-k",
        "100",
        "--rerank-top",
        "50",
        "--fuse-queries-per-task",
        "64",
        "--json",
        env=fleet_env,
        timeout=1800,  # ~6 min alone on 2 cores; slack for a loaded CI machine
    )
    watch.stop.set()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = events(result.stdout, "summary")[-1]
    manifest = summary["manifest"]
    job = f"runs/cranfield/{manifest['job_id']}"
    stored = json.loads(client.get_object(Bucket=bucket, Key=f"{job}/manifest.json")["Body"].read())
    assert stored == manifest
    assert manifest["status"] == "complete" and manifest["missing"] == []

    # Every artifact's bytes, sha256 and rows match the stored object; the chunks are
    # Parquet parts that read back into the records JSONL would hold.
    get = s3_getter(client, bucket, "runs")
    check_artifacts(manifest, get)
    layout = manifest["chunks"]
    assert layout["format"] == "parquet" and layout["parts"]
    assert layout["dense_columns"] == {
        "dense_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"
    }
    assert layout["sparse_columns"] == {"sparse_splade_tiny": "splade-tiny", "sparse_bm25": "bm25"}
    # A key per model whose vectors are its own; none for BM25 (the collection's weights).
    keys = {m["name"]: m["key"] for m in manifest["models"] if m["kind"] != "rerank"}
    assert set(layout["model_keys"]) == {"sentence-transformers/all-MiniLM-L6-v2", "splade-tiny"}
    assert all(layout["model_keys"][name] == keys[name] for name in layout["model_keys"])
    records = chunk_records(manifest, get)
    check_parquet_types(get(layout["parts"][0]))
    # report.html is listed (its bytes checked above), with every chart of a judged,
    # reranked job.
    (report,) = [a for a in manifest["artifacts"] if a["key"].endswith("/report.html")]
    page = get(report["key"]).decode()
    for chart in ("throughput", "latency", "batch-sizes", "memory", "rerank", "quality"):
        assert f'<figure class="chart" id="chart-{chart}">' in page

    # Every document's chunks appear exactly once, numbered 0..n-1; empty ones are listed.
    ids = Counter(r["chunk_id"] for r in records)
    assert max(ids.values()) == 1
    by_doc: dict[str, list[int]] = {}
    for r in records:
        by_doc.setdefault(r["doc_id"], []).append(r["chunk_index"])
    all_docs = corpus_ids(CRANFIELD / "corpus.jsonl")
    assert set(by_doc) | set(manifest["empty_documents"]) == set(all_docs)
    assert not set(by_doc) & set(manifest["empty_documents"])
    for indexes in by_doc.values():
        assert sorted(indexes) == list(range(len(indexes)))
    assert manifest["counts"]["chunks"] == len(records) == manifest["counts"]["chunks_exported"]
    assert manifest["counts"]["documents"] == len(all_docs)

    # Vectors: 384-d, unit norm, one per model of the ensemble.
    vectors = np.array([r["dense"]["sentence-transformers/all-MiniLM-L6-v2"] for r in records])
    assert vectors.shape == (len(records), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    models = {m["name"]: m for m in manifest["models"]}
    model = models["sentence-transformers/all-MiniLM-L6-v2"]
    assert model["dim"] == 384 and model["revision"]
    # auto: bf16 where the CPU has AVX512-BF16/AMX and the probe agrees, else fp32.
    assert model["dtype"] in ("float32", "bfloat16") and model["dtype_reason"].startswith("auto")

    # Sparse: every chunk has a live SPLADE vector and BM25 weights; SPLADE's top tokens
    # are words of the chunk; sparse_run's counts match chunks.jsonl.
    run = manifest["sparse_run"]
    by_model = {m["model"]["name"]: m for m in run["models"]}
    assert set(by_model) == {"splade-tiny", "bm25"}
    for stats in by_model.values():
        assert (stats["live"], stats["metadata"], stats["missing"]) == (len(records), 0, 0)
    assert run["chunks"] == len(records) and run["errors"] == {}
    assert models["splade-tiny"]["dim"] == 30522
    nnz = {name: [] for name in by_model}
    overlaps = []
    for r in records:
        for name in by_model:
            weights = r["sparse"][name]
            assert all(w > 0 for w in weights.values())
            # Empty only for BM25 on a chunk with no indexable term (all stopwords).
            assert weights or (name == "bm25" and not bm25_tokenize([r["text"]])[0])
            nnz[name].append(len(weights))
        top = sorted(r["sparse"]["splade-tiny"], key=r["sparse"]["splade-tiny"].get)[-5:]
        words = set(r["text"].lower().split())
        overlaps.append(any(t in words for t in top))
    assert sum(overlaps) / len(overlaps) > 0.95
    for name, stats in by_model.items():
        assert stats["nnz_mean"] == pytest.approx(np.mean(nnz[name]), abs=0.01)
    assert run["bm25_documents"] == len(records)

    check_results(client, bucket, job, manifest, records)

    # The manifest was the last object written, after every artifact; then work/ went.
    assert watch.keys_at_manifest is not None
    for artifact in manifest["artifacts"]:
        assert f"runs/{artifact['key']}" in watch.keys_at_manifest
    listing = client.list_objects_v2(Bucket=bucket, Prefix=job + "/")["Contents"]
    stamps = {item["Key"]: item["LastModified"] for item in listing}
    assert stamps[f"{job}/manifest.json"] == max(stamps.values())
    assert not [key for key in stamps if key.startswith(f"{job}/work/")]
    assert set(stamps) == {f"runs/{a['key']}" for a in manifest["artifacts"]} | {
        f"{job}/manifest.json"
    }


def check_parquet_types(body: bytes) -> None:
    """The column types vector stores and DuckDB read directly."""
    schema = pq.read_schema(io.BytesIO(body))
    assert schema.field("dense_all_minilm_l6_v2").type == pa.list_(pa.float32(), 384)
    sparse = pa.struct([("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])
    assert schema.field("sparse_splade_tiny").type == sparse
    assert schema.field("chunk_id").type == pa.string()
    assert schema.field("text_key").type == pa.string()


def check_results(
    client: Any, bucket: str, job: str, manifest: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    """results.jsonl: every query, --top-k fused candidates each, the first --rerank-top
    reranked; scores consistent with chunks.jsonl; metrics for every ranking."""
    body = client.get_object(Bucket=bucket, Key=f"{job}/results.jsonl")["Body"].read()
    results = [json.loads(line) for line in body.splitlines()]
    queries = [json.loads(line) for line in (CRANFIELD / "queries.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in results] == [q["_id"] for q in queries]  # file order
    chunk_ids = {r["chunk_id"] for r in records}
    vectors = {
        r["chunk_id"]: np.array(r["dense"]["sentence-transformers/all-MiniLM-L6-v2"])
        for r in records
    }
    for result in results:
        candidates = result["candidates"]
        assert len(candidates) == 100
        assert [c["rank"] for c in candidates] == list(range(1, 101))
        assert len({c["chunk_id"] for c in candidates}) == 100
        assert {c["chunk_id"] for c in candidates} <= chunk_ids
        head, tail = candidates[:50], candidates[50:]
        assert all(c["rerank_score"] is not None for c in head)
        assert all(c["rerank_score"] is None for c in tail)
        rerank = [c["rerank_score"] for c in head]
        assert rerank == sorted(rerank, reverse=True)
        fused_tail = [c["fused_score"] for c in tail]
        assert fused_tail == sorted(fused_tail, reverse=True)
        assert min(c["fused_score"] for c in head) >= max(fused_tail)
        for c in candidates:
            assert c["doc_id"] == c["chunk_id"].rsplit("#", 1)[0]
            assert set(c["sparse_score"]) == {"splade-tiny", "bm25"}
            assert any(s is not None for s in [c["dense_score"], *c["sparse_score"].values()])
        # A dense score is the cosine of the query and chunk vectors: the chunk with the
        # best dense score beats every other chunk the fleet exported.
        best = max(
            (c for c in candidates if c["dense_score"] is not None),
            key=lambda c: c["dense_score"],
        )
        assert best["dense_score"] <= 1.0 + 1e-5
        assert np.linalg.norm(vectors[best["chunk_id"]]) == pytest.approx(1.0, abs=1e-5)

    run = manifest["rerank_run"]
    assert run["coverage"] == 1.0
    assert run["pairs_asked"] == run["pairs_scored"] == 225 * 50
    assert run["queries"] == 225 and run["model"]["kind"] == "rerank"
    assert sum(size * n for size, n in ((int(k), v) for k, v in run["batch_sizes"].items())) == (
        225 * 50
    )
    metrics = json.loads(client.get_object(Bucket=bucket, Key=f"{job}/metrics.json")["Body"].read())
    rankings = metrics["rankings"]
    assert set(rankings) == {"dense", "sparse:splade-tiny", "sparse:bm25", "fused", "reranked"}
    assert metrics["queries_judged"] == 225
    for values in rankings.values():
        assert values["queries"] == 225
        assert 0.0 <= values["ndcg_at_10"] <= 1.0 and 0.0 <= values["recall_at_100"] <= 1.0
    # Real retrieval, not noise: BM25 and dense are far above a random ranking (~0.01).
    assert rankings["sparse:bm25"]["ndcg_at_10"] > 0.25
    assert rankings["dense"]["ndcg_at_10"] > 0.25
    assert manifest["metrics"] == rankings
    assert {"retrieve", "fuse", "rerank"} <= set(manifest["stages"])
    # 225 queries in groups of 16 (15 groups), 4 groups (64 queries) per fuse unit.
    assert manifest["stages"]["fuse"]["batches"] == 4
    assert manifest["stages"]["fuse"]["items"] == 225
    assert manifest["stages"]["rerank"]["batches"] == 15


@pytest.mark.parametrize("victim", ["dense", "sparse", "export"])
def test_kill9_worker_mid_job(
    victim, fleet_env, bucket, s3, redis_server, start_worker, tmp_path
) -> None:
    """A worker killed mid-stage (an encode stage; or an aggregate worker while two of
    them write the parts): the job completes with every chunk exactly once, and a
    chunk whose text another chunk has holds that chunk's vectors. The dense worker
    dies in a job that reuses an earlier job's vectors (``--reuse``): what the earlier
    job had is still its vectors, bit for bit."""
    # A smaller collection, in small batches, so the job is mid-way when we kill.
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:500]
    # Five documents again at the end under other ids, in other read ranges and units
    # than their first copies: served those copies' vectors, not encoded.
    lines += [
        json.dumps({**json.loads(x), "_id": f"mirror-{json.loads(x)['_id']}"}) for x in lines[:5]
    ]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    queue = {"dense": "dense", "sparse": "sparse", "export": "aggregate"}[victim]
    workers = {"dense": start_worker("dense", fleet_env)}
    if victim == "sparse":
        workers["sparse"] = start_worker("sparse", fleet_env)
    workers["export"] = start_worker("aggregate,prepare", fleet_env)
    if victim == "export":
        start_worker("aggregate,prepare", fleet_env)  # the one that goes on
    reuse: list[str] = []
    earlier: dict[str, Any] = {}
    if victim == "dense":
        # 200 of the documents (not the mirrored ones) embedded by an earlier job first.
        (tmp_path / "earlier").mkdir()
        (tmp_path / "earlier" / "corpus.jsonl").write_text("\n".join(lines[5:205]) + "\n")
        done = run_cli(
            "run", str(tmp_path / "earlier"), "--output", f"s3://{bucket}", "--json",
            env=fleet_env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        earlier = events(done.stdout, "summary")[-1]["manifest"]
        reuse = ["--reuse", earlier["job_id"]]
    sparse_args = ["--sparse-models", "splade-tiny,bm25"] if victim == "sparse" else []
    # Export: a part per batch of 4 chunks, ~160 parts, so the kill lands mid-phase.
    sparse_args += ["--part-rows", "4", "--format", "jsonl"] if victim == "export" else []
    batch_chunks = "4" if victim == "export" else "16"
    # Dense messages of about 3 batches (~2,600 tokens each), so the kill lands mid-stage
    # on a unit of several batches, all of which go again.
    units = ("--unit-tokens", "6000")
    cli = start_cli(
        *("run", str(tmp_path / "corpus"), "--output", f"s3://{bucket}"),
        *("--batch-chunks", batch_chunks, *units, "--keep-work", "--json", *sparse_args),
        *reuse,
        env=fleet_env,
    )
    client = redis_server.client()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        jobs = client.zrange(JOBS_INDEX, 0, -1)
        if jobs and jobs[-1].decode() != earlier.get("job_id"):
            ledger = JobLedger(client, jobs[-1].decode())
            if len(ledger.reports(victim)) >= 3:
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"{victim} worker made no progress")
    workers[victim].kill9()
    done_at_kill = len(ledger.reports(victim))
    start_worker(queue, fleet_env)
    stdout, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 0, stderr
    units = {s.stage: s.total for s in ledger.progress().stages}[victim]
    assert units is not None and done_at_kill < units  # the kill was mid-stage
    manifest = events(stdout, "summary")[-1]["manifest"]
    s3c = s3.client()
    job = f"corpus/{manifest['job_id']}"
    records = chunk_records(manifest, s3_getter(s3c, bucket))
    exported = [r["chunk_id"] for r in records]
    by_id = {r["chunk_id"]: r for r in records}
    mirrored = [r for r in records if r["chunk_id"].startswith("mirror-")]
    assert len(mirrored) >= 5
    for record in mirrored:
        first = by_id[record["chunk_id"].removeprefix("mirror-")]
        assert record["dense"] == first["dense"]
        assert record.get("sparse") == first.get("sparse")
    encoded = manifest["counts"]["encoded"]
    assert all(n <= len(set(exported)) - len(mirrored) for n in encoded.values()), encoded
    if earlier:
        before = chunk_records(earlier, s3_getter(s3c, bucket))
        assert manifest["changes"]["chunks_found"] == len(before) > 200
        for record in before:
            assert by_id[record["chunk_id"]]["dense"] == record["dense"], record["chunk_id"]
    staged: list[str] = []
    for batch_id in ledger.staged_batches():
        raw = s3c.get_object(Bucket=bucket, Key=f"{job}/work/batches/{batch_id}.msgpack")[
            "Body"
        ].read()
        staged += [c.chunk_id for c in msgspec.msgpack.decode(raw, type=ChunkBatch).chunks]
    assert len(exported) == len(set(exported))  # nothing duplicated
    assert sorted(exported) == sorted(staged)  # nothing lost
    assert exported == in_reading_order(staged, lines)  # parts in collection order
    assert manifest["status"] == "complete"
    assert manifest["stages"][victim]["batches"] == units
    if victim == "sparse":
        for stats in manifest["sparse_run"]["models"]:
            assert stats["live"] == len(staged)  # each chunk counted once


class Descendants(threading.Thread):
    """Collects every process a command starts, to check none outlives it."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}

    def run(self) -> None:
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            try:
                for child in self.root.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            time.sleep(0.1)

    def alive(self) -> list[str]:
        return [" ".join(p.cmdline()[:6]) for p in self.seen.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_watched(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], Descendants]:
    cli = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        env=base_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = Descendants(cli.pid)
    watch.start()
    return cli, watch


def test_embedded_default_runs_everything_locally(tmp_path) -> None:
    lines = [
        json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:60]
    ]
    source = tmp_path / "mini.jsonl"
    source.write_text("\n".join(json.dumps({"id": d["_id"], "text": d["text"]}) for d in lines))
    cli, watch = run_watched(["run", str(source)], cwd=tmp_path)
    _, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 0, stderr
    (manifest_path,) = (tmp_path / "embed-out" / "mini").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["documents"] == 60
    out = tmp_path / "embed-out"
    for artifact in manifest["artifacts"]:
        assert manifest_path.stat().st_mtime_ns >= (out / artifact["key"]).stat().st_mtime_ns
    assert not (manifest_path.parent / "work").exists()  # deleted once complete
    records = chunk_records(manifest, lambda key: (out / key).read_bytes())
    assert len(records) == manifest["counts"]["chunks"]
    # Every row carries its text's key, every dense column its model's (the one the
    # worker that loaded it recorded): what a later job may reuse a vector by.
    for record in records:
        assert record["text_key"] == hashlib.sha256(record["text"].encode()).hexdigest()[:32]
    (model,) = [m for m in manifest["models"] if m["kind"] == "dense"]
    assert model["key"].startswith("ck1:") and model["tokenizer"].startswith("tok1:")
    assert manifest["chunks"]["model_keys"] == {model["name"]: model["key"]}
    assert "complete" in stderr  # the summary table
    # report.html is listed, and a real browser shows its charts (no queries: no rerank
    # coverage, no quality bars) with no console message.
    (report,) = [a for a in manifest["artifacts"] if a["key"].endswith("/report.html")]
    charts = ["throughput", "latency", "batch-sizes", "memory"]
    browser.check_report(out / report["key"], tmp_path / "chromium", charts)
    # No terminal here: plain progress lines, and the summary at its natural width.
    assert re.search(r"^\[\d+:\d\d\] job \S+ \w+ · read \d+/", stderr, re.MULTILINE), stderr
    assert "…" not in stderr
    header = next(line for line in stderr.splitlines() if "stage" in line and "batches" in line)
    for column in ("items/s", "model batch sizes", "peak memory", "learned budget"):
        assert column in header
    assert len(watch.seen) >= 3  # redis-server and two workers ran ...
    assert watch.alive() == []  # ... and none outlived the command
    # `status` finds the finished job in the output folder without a broker.
    status = run_cli("status", manifest["job_id"], env=base_env(), cwd=tmp_path)
    assert status.returncode == 0, status.stderr


def test_embedded_ctrl_c_stops_everything_and_resume_takes_it_up(tmp_path) -> None:
    # 500 documents in fp32, the slowest dtype: about 650 chunks, some 20 s of encoding
    # on 2 cores, so the job is surely still running two seconds after staging begins.
    collection = _small_collection(tmp_path, documents=500)
    cli, watch = run_watched(["run", str(collection), "--dtype", "fp32"], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        any("celery" in " ".join(p.cmdline()) for p in list(watch.seen.values()) if _alive(p))
        and list((tmp_path / "embed-out").glob("*/*/work"))  # batches are being staged
    ):
        time.sleep(0.2)
    assert cli.poll() is None, "the job ended before it could be interrupted"
    time.sleep(2)  # mid-job
    cli.send_signal(signal.SIGINT)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert watch.seen and watch.alive() == []
    assert not list((tmp_path / "embed-out").glob("*/*/manifest.json"))
    # The job can be taken up later from the output folder alone: a new embedded fleet
    # (its Redis starts empty) rebuilds the ledger from the job's objects.
    match = re.search(r"resume (\S+) --output (\S+)`", stderr)
    assert match, stderr
    resumed = run_cli(
        "resume", match[1], "--output", match[2], "--json", env=base_env(), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    manifest = events(resumed.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["counts"]["documents"] == 500
    out = tmp_path / "embed-out"
    chunk_ids = [r["chunk_id"] for r in chunk_records(manifest, lambda k: (out / k).read_bytes())]
    assert len(chunk_ids) == len(set(chunk_ids)) == manifest["counts"]["chunks"]


def test_sigterm_stops_the_embedded_fleet_as_ctrl_c_does(tmp_path) -> None:
    """`kill` or `timeout` of an embedded run: exit 130 with the resume line, and neither
    its Redis nor a worker outlives the command (Python's default SIGTERM would end the
    producer before it stops them)."""
    cli, watch = run_watched(["run", str(_small_collection(tmp_path))], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        "celery" in " ".join(p.cmdline()) for p in list(watch.seen.values()) if _alive(p)
    ):
        time.sleep(0.2)
    assert cli.poll() is None, "the job ended before it could be stopped"
    cli.send_signal(signal.SIGTERM)
    _, stderr = cli.communicate(timeout=60)
    survivors = watch.alive()
    for proc in watch.seen.values():  # not left to outlive the test either
        if _alive(proc):
            proc.kill()
    assert cli.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert watch.seen and survivors == []


def test_a_queue_no_worker_consumes_is_named(
    fleet_env, bucket, start_worker, tmp_path, redis_client
) -> None:
    """A fleet with no `prepare` worker (the earlier README's `-Q aggregate`): `run` says
    so before it enqueues, its follower names the queue once the job has waited
    EMBED_FLEET_QUEUE_WAIT there, `status` says so too, and the job completes once such
    a worker starts. Nothing else is named: the other queues have consumers."""
    from producer.backlog import consumers
    from shared.control.celery_app import make_app
    from shared.control.settings import Settings

    env = {**fleet_env, "EMBED_FLEET_QUEUE_WAIT": "2"}
    start_worker("dense", env)
    start_worker("aggregate", env)
    app = make_app(Settings.from_env(env))
    deadline = time.monotonic() + 60
    while {"dense", "aggregate"} - set(consumers(app, 0.5) or {}):
        assert time.monotonic() < deadline, "the workers never answered"
    command = ["run", str(_small_collection(tmp_path)), "--output", f"s3://{bucket}"]
    cli = start_cli(*command, env=env)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(cli.stderr), daemon=True)
    reader.start()
    start = time.monotonic()
    named = "waits on queue `prepare`, which no worker consumes"
    while not any(named in line for line in said):
        assert cli.poll() is None and time.monotonic() - start < 60, "".join(said)
        time.sleep(0.2)
    named_after = time.monotonic() - start
    before = next(line for line in said if "will wait on" in line)
    assert "queue `prepare`, which no worker consumes" in before
    assert "celery -A workers.app worker -Q prepare -c 1" in before
    assert "`dense`" not in "".join(said) and "`aggregate`" not in "".join(said)
    (job_id,) = [j.decode() for j in redis_client.zrange(JOBS_INDEX, 0, -1)]
    status = run_cli("status", job_id, env=env)
    assert status.returncode == 3 and named in status.stderr, status.stderr
    start_worker("prepare", env)
    cli.wait(timeout=300)
    reader.join(timeout=10)
    assert cli.returncode == 0, "".join(said)
    assert named_after < 35


def test_a_batch_that_keeps_failing_makes_the_job_partial_then_resume_completes_it(
    fleet_env, bucket, s3, start_worker, tmp_path, redis_client
) -> None:
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:40]
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    # Detached: staged and enqueued, no worker yet.
    submitted = run_cli(
        "run",
        str(tmp_path / "small"),
        "--output",
        f"s3://{bucket}",
        "--batch-chunks",
        "8",
        "--prepare-on",
        "producer",  # staged before any worker starts, so one batch can be broken
        "--detach",
        env=fleet_env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert run_cli("status", job_id, env=fleet_env).returncode == 3  # still running
    # Break one batch for good: its staged object disappears.
    staged_key = f"small/{job_id}/work/batches/b000001.msgpack"
    staged = s3.client().get_object(Bucket=bucket, Key=staged_key)["Body"].read()
    s3.client().delete_object(Bucket=bucket, Key=staged_key)
    start_worker("dense", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    deadline = time.monotonic() + 300
    while (status := run_cli("status", job_id, "--json", env=fleet_env)).returncode == 3:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(1)
    assert status.returncode == 1, status.stderr  # partial
    manifest = events(status.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "partial"
    (missing,) = manifest["missing"]
    assert missing["batch_id"] == "b000001" and missing["stage"] == "dense"
    assert "NoSuchKey" in missing["reason"]
    # The lost batch still names its chunks, from the ledger's record of the staging.
    lost = msgspec.msgpack.decode(staged, type=ChunkBatch)
    assert missing["chunk_ids"] == [chunk.chunk_id for chunk in lost.chunks]
    assert manifest["counts"]["failed_batches"] == 1
    # Everything else was exported; only that batch's chunks are absent.
    records = chunk_records(manifest, s3_getter(s3.client(), bucket))
    assert len(records) == manifest["counts"]["chunks"] - 8
    # A partial job keeps work/, for the resume below.
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"small/{job_id}/work/")
    assert listed.get("KeyCount", 0) > 10

    # The batch comes back (an operator restores it); `resume` re-drives the job from
    # its first unfinished phase: exactly that unit is encoded again, then the export.
    s3.client().put_object(Bucket=bucket, Key=staged_key, Body=staged)
    resumed = run_cli("resume", job_id, "--json", env=fleet_env)
    assert resumed.returncode == 0, resumed.stderr
    manifest = events(resumed.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["missing"] == []
    assert manifest["counts"]["failed_batches"] == 0
    chunk_ids = [r["chunk_id"] for r in chunk_records(manifest, s3_getter(s3.client(), bucket))]
    assert len(chunk_ids) == len(set(chunk_ids)) == manifest["counts"]["chunks"]
    state = JobLedger(redis_client, job_id)
    assert state.client.hget(state.k_state, "last_resume") == b"encode: dense 1 unit"
    # A complete job is left as it is.
    again = run_cli("resume", job_id, env=fleet_env)
    assert again.returncode == 0 and "nothing to resume" in again.stderr


@pytest.mark.parametrize("rescuer", ["resume", "watchdog"])
def test_a_lost_step_message_stalls_the_job_until_it_is_redriven(
    rescuer, fleet_env, bucket, start_worker, tmp_path, redis_client
) -> None:
    """The message that would plan the retrieve phase is lost (as when the guard's
    winner dies before publishing it, or the broker drops it): the job stalls in
    `retrieving` with nothing planned. `resume` runs the lost step again, or the
    watchdog of a follower (`status --follow`) does it by itself once the job has made
    no progress for EMBED_FLEET_STALL_TIMEOUT with nothing queued or running; the job
    completes."""
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:40]
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    queries = (CRANFIELD / "queries.jsonl").read_text().splitlines()[:5]
    (tmp_path / "queries.jsonl").write_text("\n".join(queries) + "\n")
    submitted = run_cli(
        "run", str(tmp_path / "small"), "--output", f"s3://{bucket}", "--queries",
        str(tmp_path / "queries.jsonl"), "--batch-chunks", "8", "--prepare-on", "producer",
        "--detach", env=fleet_env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    ledger = JobLedger(redis_client, job_id)
    start_worker("dense", fleet_env)
    deadline = time.monotonic() + 240
    # Encoded, and the plan step queued: the phase's winner records the status first
    # and publishes the step right after, so both are waited for.
    while ledger.status() != "retrieving" or not waiting_counts(redis_client)["aggregate"]:
        assert time.monotonic() < deadline, (ledger.status(), waiting_counts(redis_client))
        time.sleep(0.2)
    assert waiting_counts(redis_client)["aggregate"] == 1
    # The step message is lost (whichever of the queue's priority lists holds it).
    redis_client.delete("aggregate", *(f"aggregate{PRIORITY_SEPARATOR}{p}" for p in PRIORITIES))
    start_worker("aggregate,prepare", fleet_env)
    time.sleep(5)
    assert ledger.status() == "retrieving" and not ledger.phase_opened("retrieve")
    if rescuer == "resume":
        resumed = run_cli("resume", job_id, "--json", env=fleet_env)
    else:
        env = {**fleet_env, "EMBED_FLEET_STALL_TIMEOUT": "3"}
        resumed = run_cli("status", job_id, "--follow", "--json", env=env)
        assert "made no progress" in resumed.stderr and "re-driving" in resumed.stderr
    assert resumed.returncode == 0, resumed.stderr
    manifest = events(resumed.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["stages"]["retrieve"]["batches"] >= 1
    assert any(a["key"].endswith("/results.jsonl") for a in manifest["artifacts"])
    assert redis_client.hget(ledger.k_state, "last_resume") == b"step plan_retrieve"


def _small_collection(tmp_path: Path, documents: int = 40) -> Path:
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:documents]
    folder = tmp_path / "small"
    folder.mkdir(exist_ok=True)
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_cancel_drops_the_jobs_units_and_resume_takes_it_up(
    fleet_env, bucket, s3, start_worker, tmp_path, redis_client
) -> None:
    submitted = run_cli(
        "run", str(_small_collection(tmp_path)), "--output", f"s3://{bucket}",
        "--batch-chunks", "8", "--detach", env=fleet_env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    cancelled = run_cli("cancel", job_id, env=fleet_env)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stderr, cancelled.stderr
    status = run_cli("status", job_id, env=fleet_env)
    assert status.returncode == 1 and "cancelled" in status.stderr
    # Workers reach the queued units and drop them: nothing is encoded.
    start_worker("dense", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    deadline = time.monotonic() + 120
    while waiting_counts(redis_client)["dense"] or redis_client.hlen("unacked"):
        assert time.monotonic() < deadline, "the cancelled units were not taken"
        time.sleep(0.5)
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"small/{job_id}/work/dense/")
    assert listed.get("KeyCount", 0) == 0
    again = run_cli("cancel", job_id, env=fleet_env)
    assert again.returncode == 0 and "already failed" in again.stderr
    # `resume` takes it up again, and it completes.
    resumed = run_cli("resume", job_id, "--json", env=fleet_env)
    assert resumed.returncode == 0, resumed.stderr
    assert events(resumed.stdout, "summary")[-1]["manifest"]["status"] == "complete"


def test_ctrl_c_on_a_shared_fleet_detaches_once_the_job_is_staged(
    fleet_env, bucket, start_worker, tmp_path, redis_client
) -> None:
    """The job goes on without its submitter: Ctrl-C of `run` (no worker yet) says how
    to follow, cancel or resume it, and the job completes when workers come."""
    command = [
        sys.executable, "-m", "producer.cli", "run", str(_small_collection(tmp_path)),
        "--output", f"s3://{bucket}", "--batch-chunks", "8", "--prepare-on", "producer",
    ]  # fmt: skip
    cli = subprocess.Popen(
        command, cwd=REPO, env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (jobs := redis_client.zrange(JOBS_INDEX, 0, -1)) or not JobLedger(
        redis_client, jobs[-1].decode()
    ).phase_opened("encode"):
        assert cli.poll() is None and time.monotonic() < deadline, "not staged"
        time.sleep(0.2)
    job_id = jobs[-1].decode()
    cli.send_signal(signal.SIGINT)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 130, stderr
    assert "detached" in stderr and f"status {job_id} --follow" in stderr
    assert f"cancel {job_id}" in stderr and "Traceback" not in stderr
    start_worker("dense", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    followed = run_cli("status", job_id, "--follow", "--json", env=fleet_env)
    assert followed.returncode == 0, followed.stderr
    assert events(followed.stdout, "summary")[-1]["manifest"]["status"] == "complete"


def _chunks(s3: Any, bucket: str, manifest: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """chunk id -> its dense vectors, concatenated; fails on a chunk exported twice."""
    vectors: dict[str, np.ndarray] = {}
    for record in chunk_records(manifest, s3_getter(s3.client(), bucket, prefix)):
        assert record["chunk_id"] not in vectors, f"{record['chunk_id']} exported twice"
        vectors[record["chunk_id"]] = np.concatenate(
            [np.asarray(v) for _, v in sorted(record["dense"].items())]
        )
    return vectors


def test_redis_lost_mid_job_then_resume_rebuilds_it_from_the_store(
    fleet_env, bucket, s3, start_worker, tmp_path, redis_client
) -> None:
    """Redis loses everything mid-encode (no persistence: ledger and queued messages
    gone). `resume --output` rebuilds the ledger from the job's objects, counts the
    units whose shards are there as done, enqueues the others, and the job ends with
    the artifacts a clean run gives: every chunk once, the same vectors."""
    collection = _small_collection(tmp_path, 120)
    queries = (CRANFIELD / "queries.jsonl").read_text().splitlines()[:5]
    (tmp_path / "queries.jsonl").write_text("\n".join(queries) + "\n")
    options = ["--queries", str(tmp_path / "queries.jsonl"), "--batch-chunks", "4"]
    # Dense messages of about 3 batches: the fault comes with some done, most not.
    options += ["--unit-tokens", "1500", "--dtype", "fp32", "--prepare-on", "producer"]
    submitted = run_cli(
        "run",
        str(collection),
        "--output",
        f"s3://{bucket}/lost",
        *options,
        "--detach",
        env=fleet_env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    ledger = JobLedger(redis_client, job_id)
    start_worker("dense", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    deadline = time.monotonic() + 240
    while (done := ledger.progress().stages[0].batches_done) < 3:
        assert time.monotonic() < deadline, "no progress before the fault"
        time.sleep(0.2)
    total = ledger.progress().total_batches or 0
    assert done < total // 2, "too late for the fault"
    redis_client.flushall()  # Redis lost, as a restart without persistence leaves it
    time.sleep(3)
    status = run_cli("status", job_id, env=fleet_env)
    assert status.returncode == 2 and "rebuilds the job" in status.stderr, status.stderr

    resumed = run_cli("resume", job_id, "--output", f"s3://{bucket}/lost", "--json", env=fleet_env)
    assert resumed.returncode == 0, resumed.stderr
    manifest = events(resumed.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["missing"] == []
    assert {m["name"] for m in manifest["models"]} >= set(manifest["spec"]["dense_models"])
    # Complete now: its work/ (the record the resume rebuilt it from) is deleted.
    kept = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"lost/small/{job_id}/work/")
    assert kept.get("KeyCount", 0) == 0
    assert any(a["key"].endswith("/results.jsonl") for a in manifest["artifacts"])
    last = redis_client.hget(ledger.k_state, "last_resume").decode()
    assert last.startswith("encode: dense") and "found done in the store" in last, last
    resumed_vectors = _chunks(s3, bucket, manifest, "lost")

    # A clean run of the same collection gives the same chunks and vectors.
    clean = run_cli(
        "run", str(collection), "--output", f"s3://{bucket}/clean", *options, "--json",
        env=fleet_env,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    clean_vectors = _chunks(s3, bucket, events(clean.stdout, "summary")[-1]["manifest"], "clean")
    assert resumed_vectors.keys() == clean_vectors.keys()
    for chunk_id, vector in clean_vectors.items():
        np.testing.assert_allclose(resumed_vectors[chunk_id], vector, atol=1e-4)


def test_producer_killed_mid_submit_then_resume_stages_the_rest(
    fleet_env, bucket, s3, start_worker, tmp_path, redis_client
) -> None:
    """kill -9 of `run` while it stages: the job cannot complete (its last batches were
    never staged). `run SOURCE --resume JOB` stages the rest from the same source
    (deterministic batch ids: nothing staged twice), the resume step enqueues every
    unit whose output is missing, and the job completes with every chunk once."""
    collection = _small_collection(tmp_path, 600)
    command = [
        sys.executable, "-m", "producer.cli", "run", str(collection), "--output",
        f"s3://{bucket}", "--batch-chunks", "2", "--prepare-on", "producer", "--detach",
    ]  # fmt: skip
    cli = subprocess.Popen(command, cwd=REPO, env=fleet_env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (
        not (jobs := redis_client.zrange(JOBS_INDEX, 0, -1))
        or int(
            redis_client.hget(JobLedger(redis_client, jobs[-1].decode()).k_state, "staged_batches")
            or 0
        )
        < 10
    ):
        assert cli.poll() is None and time.monotonic() < deadline, "not staging"
        time.sleep(0.02)
    cli.kill()
    cli.wait(timeout=30)
    job_id = jobs[-1].decode()
    ledger = JobLedger(redis_client, job_id)
    assert not ledger.phase_opened("encode"), "staged to the end before the kill"
    staged_before = len(ledger.staged_batches())
    start_worker("dense", fleet_env)
    start_worker("aggregate,prepare", fleet_env)
    wrong = run_cli("run", str(tmp_path), "--resume", job_id, env=fleet_env)
    assert wrong.returncode == 2 and "is of" in wrong.stderr, wrong.stderr
    resumed = run_cli("run", str(collection), "--resume", job_id, "--json", env=fleet_env)
    assert resumed.returncode == 0, resumed.stderr
    manifest = events(resumed.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete" and manifest["counts"]["documents"] == 600
    assert manifest["counts"]["batches"] > staged_before
    vectors = _chunks(s3, bucket, manifest)
    assert len(vectors) == manifest["counts"]["chunks"] == ledger.progress().staged_chunks


def test_sparse_model_failure_falls_back_to_metadata(tmp_path) -> None:
    """A SPLADE model whose weights are broken: the job completes, chunks with
    metadata.sparse use those weights, the rest are marked missing, errors recorded."""
    import shutil

    from shared.inputs.models import resolve_model

    broken = tmp_path / "broken-splade"
    shutil.copytree(resolve_model("splade-tiny").path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    docs = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:30]]
    with_weights = {d["_id"] for d in docs[:12]}
    lines = []
    for d in docs:
        metadata = {"sparse": {"wing": 1.5, "flow": 0.25}} if d["_id"] in with_weights else {}
        lines.append(json.dumps({"id": d["_id"], "text": d["text"], "metadata": metadata}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(
        "run",
        str(tmp_path / "docs.jsonl"),
        "--sparse-models",
        str(broken),
        # JSONL: a model that never loaded has no vocabulary for a Parquet column to
        # index the chunks' own terms with (the manifest says so, see below).
        "--format",
        "jsonl",
        "--json",
        env=base_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = events(result.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete"
    (stats,) = manifest["sparse_run"]["models"]
    out = tmp_path / "embed-out"
    assert manifest["chunks"]["format"] == "jsonl"
    records = chunk_records(manifest, lambda key: (out / key).read_bytes())
    fallback = [r for r in records if r["doc_id"] in with_weights]
    assert stats["live"] == 0
    assert stats["metadata"] == len(fallback)
    assert stats["missing"] == len(records) - len(fallback)
    assert manifest["sparse_run"]["errors"]  # the load failure, with its cause
    for r in records:
        name = str(broken.resolve())
        if r["doc_id"] in with_weights:
            assert r["sparse"][name] == {"wing": 1.5, "flow": 0.25}
        else:
            assert name not in (r["sparse"] or {})


def test_parquet_parts_load_in_duckdb_and_match_the_jsonl_parts_and_the_shards(
    tmp_path,
) -> None:
    """The same collection exported both ways (embedded fleet, fp32 so both runs compute
    the same numbers): the Parquet parts hold exactly the JSONL parts' records, their
    dense vectors are bit for bit the workers' shards, and DuckDB reads them as is."""
    import duckdb

    from shared.records.schemas import DenseShard

    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:40]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "embed-out"

    def run(*options: str) -> dict[str, Any]:
        result = run_cli(
            "run", str(tmp_path / "docs.jsonl"), "--enable-sparse", "--dtype", "fp32",
            "--batch-chunks", "8", "--part-rows", "20", "--json", *options,
            env=base_env(), cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        manifest: dict[str, Any] = events(result.stdout, "summary")[-1]["manifest"]
        assert manifest["status"] == "complete"
        check_artifacts(manifest, lambda key: (out / key).read_bytes())
        return manifest

    parquet = run("--keep-work")
    jsonl = run("--format", "jsonl")
    assert len(parquet["chunks"]["parts"]) == len(jsonl["chunks"]["parts"]) > 1
    from_parquet = chunk_records(parquet, lambda key: (out / key).read_bytes())
    from_jsonl = chunk_records(jsonl, lambda key: (out / key).read_bytes())
    assert [r["chunk_id"] for r in from_parquet] == [r["chunk_id"] for r in from_jsonl]
    assert len(from_parquet) == parquet["counts"]["chunks"]
    for a, b in zip(from_parquet, from_jsonl, strict=True):
        for field in ("doc_id", "chunk_index", "text", "span", "metadata"):
            assert a[field] == b[field]
        for model, vector in a["dense"].items():
            np.testing.assert_allclose(vector, b["dense"][model], atol=1e-6)
        assert a["sparse"].keys() == b["sparse"].keys()
        for model, weights in a["sparse"].items():
            assert weights.keys() == b["sparse"][model].keys()  # every term, indexed
            for term, weight in weights.items():
                assert weight == pytest.approx(b["sparse"][model][term], rel=1e-6)

    # The Parquet dense columns are exactly the vectors the workers wrote.
    job = out / "docs" / parquet["job_id"]
    shards = {}
    for path in sorted((job / "work" / "dense").glob("*.msgpack")):
        shard = msgspec.msgpack.decode(path.read_bytes(), type=DenseShard)
        for row, chunk_id in enumerate(shard.chunk_ids):
            shards[chunk_id] = shard.vectors["sentence-transformers/all-MiniLM-L6-v2"].to_numpy()[
                row
            ]
    for record in from_parquet:
        vector = np.asarray(record["dense"]["sentence-transformers/all-MiniLM-L6-v2"], np.float32)
        assert np.array_equal(vector, shards[record["chunk_id"]])

    # DuckDB reads the parts as a user would, with the manifest's column names.
    files = [str(out / key) for key in parquet["chunks"]["parts"]]
    con = duckdb.connect()
    count, distinct, dims, nnz = con.execute(
        "SELECT count(*), count(DISTINCT chunk_id), min(len(dense_all_minilm_l6_v2)), "
        "sum(len(sparse_bm25.indices)) FROM read_parquet(?)",
        [files],
    ).fetchone()
    assert count == distinct == len(from_jsonl) and dims == 384
    assert nnz == sum(len(r["sparse"].get("bm25", {})) for r in from_jsonl)
    best = con.execute(
        "SELECT chunk_id FROM read_parquet(?) ORDER BY array_cosine_similarity("
        "dense_all_minilm_l6_v2::FLOAT[384], (SELECT dense_all_minilm_l6_v2::FLOAT[384] "
        "FROM read_parquet(?) WHERE chunk_id = ?)) DESC LIMIT 1",
        [files, files, from_jsonl[5]["chunk_id"]],
    ).fetchone()
    assert best == (from_jsonl[5]["chunk_id"],)
