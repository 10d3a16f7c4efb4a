"""Issue 5 end to end: a dense + rerank job on a shared fleet whose worker runs out of
(simulated) memory and has a model memory budget, traced to a file.

One job must give one trace (the producer's run span, every task's run span, a stage
span per unit and a span per model batch, with their figures), a metrics.json with the
out-of-memory retries and the learned budgets, and a manifest that records each model's
dtype and device.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import CRANFIELD, run_cli
from crossencoder import build_tiny_cross_encoder
from test_e2e import events

from shared.inputs.models import DEFAULT_DENSE_MODEL
from workers.runtime.measure import (
    ATTR_BATCH_SIZE,
    ATTR_DEVICE,
    ATTR_LATENCY,
    ATTR_MODEL,
    ATTR_OOM,
    ATTR_PEAK,
    ATTR_PEAK_KIND,
    ATTR_STAGE,
    ATTR_TOKENS,
)

pytestmark = pytest.mark.e2e
FIGURES = {
    ATTR_STAGE,
    ATTR_MODEL,
    ATTR_BATCH_SIZE,
    ATTR_TOKENS,
    ATTR_LATENCY,
    ATTR_DEVICE,
    ATTR_PEAK,
    ATTR_PEAK_KIND,
    ATTR_OOM,
}
OOM_ABOVE = 600  # padded tokens; the CPU's default dense budget is 4096


def mini_beir(folder: Path, documents: int = 80, queries: int = 6) -> Path:
    folder.mkdir()
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:documents]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    lines = (CRANFIELD / "queries.jsonl").read_text().splitlines()[:queries]
    (folder / "queries.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_one_trace_oom_recovery_and_model_swaps(
    fleet_env, bucket, s3, start_worker, tmp_path
) -> None:
    trace_file = tmp_path / "spans.jsonl"
    env = {
        **fleet_env,
        "EMBED_FLEET_VISIBILITY_TIMEOUT": "300",
        "EMBED_FLEET_TRACE_FILE": str(trace_file),
    }
    worker_env = {
        **env,
        "EMBED_FLEET_SIMULATE_OOM_TOKENS": str(OOM_ABOVE),
        "EMBED_FLEET_MODEL_MEMORY": "1MB",  # fits no model: every hydration swaps
    }
    start_worker("dense,rerank", worker_env)
    start_worker("aggregate,prepare", env)
    reranker = build_tiny_cross_encoder(tmp_path / "tiny-ce")
    result = run_cli(
        "run",
        str(mini_beir(tmp_path / "mini")),
        "--output",
        f"s3://{bucket}/runs",
        "--rerank-model",
        str(reranker),
        "--top-k",
        "20",
        "--rerank-top",
        "10",
        "--batch-chunks",
        "16",
        "--json",
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    manifest = events(result.stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete"

    # The live view's JSON lines carry per-stage figures while the job runs.
    progress = events(result.stdout, "progress")
    dense_live = [
        s["summary"]
        for p in progress
        for s in p["stages"]
        if s["stage"] == "dense" and s.get("summary") and s["summary"]["batches"]
    ]
    assert dense_live and dense_live[-1]["items_per_s"] > 0 and dense_live[-1]["p95_s"] > 0
    # `status --follow` shows the same figures from another process (here: at once, the
    # job being finished) and then the summary.
    followed = run_cli("status", manifest["job_id"], "--follow", "--json", env=env)
    assert followed.returncode == 0, followed.stderr
    (last,) = events(followed.stdout, "progress")[-1:]
    (rerank_live,) = [s["summary"] for s in last["stages"] if s["stage"] == "rerank"]
    assert rerank_live["coverage"] == 1.0 and rerank_live["batches"] > 0
    assert events(followed.stdout, "summary")[-1]["manifest"] == manifest

    # metrics.json: per-stage figures, OOM retries and the learned budget.
    client = s3.client()
    key = f"runs/mini/{manifest['job_id']}/metrics.json"
    metrics = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    dense_stage = metrics["stages"]["dense"]
    assert dense_stage["oom_count"] > 0
    assert dense_stage["budgets"][DEFAULT_DENSE_MODEL] < OOM_ABOVE
    assert dense_stage["batch_size_max"] * 2 <= OOM_ABOVE  # no batch above the limit ran
    assert dense_stage["peak_memory_bytes"] > 0 and dense_stage["peak_memory_kind"] == "rss"
    rerank_stage = metrics["stages"]["rerank"]
    assert rerank_stage["coverage"] == 1.0
    # A budget that fits no model: the reranker's hydration sent the dense model back.
    assert rerank_stage["hydrations"] >= 1 and rerank_stage["evictions"] >= 1
    # The dense model was loaded and hydrated by the first dense unit (a query batch,
    # whose model activity the live figures and the manifest count, though its
    # throughput is left out of the document stage's).
    assert dense_live[-1]["model_loads"] >= 1 and dense_live[-1]["hydrations"] >= 1
    assert dense_stage["model_loads"] >= 1 and dense_stage["hydrations"] >= 1
    assert manifest["stages"]["dense"] == dense_stage

    # The manifest records every model's dtype, device and size.
    models = {m["kind"]: m for m in manifest["models"]}
    assert set(models) == {"dense", "rerank"}
    for model in models.values():
        assert model["dtype"] in ("float32", "bfloat16") and model["device"] == "cpu"
        assert model["dtype_reason"] and model["parameters"] > 0

    # One trace: the producer's span, every task's run span, stage and batch spans.
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert len({s["context"]["trace_id"] for s in spans}) == 1
    by_id = {s["context"]["span_id"]: s for s in spans}
    (root,) = [s for s in spans if s["name"] == "embed_fleet.run"]
    assert root["parent_id"] is None
    runs = [s for s in spans if s["name"].startswith("run/")]
    tasks = Counter(s["name"].removeprefix("run/") for s in runs)
    assert set(tasks) >= {
        "embed_fleet.dense.embed_batch",
        "embed_fleet.dense.retrieve",
        "embed_fleet.aggregate.plan_retrieve",
        "embed_fleet.aggregate.plan_fuse",
        "embed_fleet.aggregate.fuse_group",
        "embed_fleet.aggregate.plan_rerank",
        "embed_fleet.rerank.rerank_group",
        "embed_fleet.aggregate.plan_export",
        "embed_fleet.aggregate.export_part",
        "embed_fleet.aggregate.finish_job",
    }
    # A message of documents and one of queries at least; each staged batch is recorded
    # on its own, however many a message held.
    assert tasks["embed_fleet.dense.embed_batch"] >= 2
    assert manifest["stages"]["dense"]["batches"] == manifest["counts"]["batches"]
    stages = [s for s in spans if s["name"].startswith("embed_fleet.stage.")]
    assert len(stages) == len(runs)  # one stage span per task run ...
    for stage in stages:
        assert by_id[stage["parent_id"]]["name"].startswith("run/")  # ... inside it
    for stage in stages:
        if stage["name"] in ("embed_fleet.stage.dense", "embed_fleet.stage.rerank"):
            assert set(stage["attributes"]) >= FIGURES, stage
    batches = [s for s in spans if s["name"] in ("dense.batch", "rerank.batch")]
    assert {s["name"] for s in batches} == {"dense.batch", "rerank.batch"}
    for batch in batches:
        assert set(batch["attributes"]) >= FIGURES
        assert by_id[batch["parent_id"]]["name"].startswith("embed_fleet.stage.")
    out_of_memory = [s for s in batches if s["attributes"]["embed_fleet.out_of_memory"]]
    assert len(out_of_memory) == dense_stage["oom_count"] + metrics["stages"]["rerank"]["oom_count"]
