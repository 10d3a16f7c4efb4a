"""What the benchmarks share: the producer's own chunks of a collection, and a job run
through the embedded fleet, measured from the ledger's per-batch reports."""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The benches copy Cranfield several times (new ids, the same texts) and measure
# encoding every copy, as bare sentence-transformers does. A fleet encodes a text a job
# holds twice once (shared.records.served_rows), so their fleets, which inherit this
# environment, claim no texts; bench/reuse.py, which measures that, turns it back on.
TEXT_CLAIMS_OFF = {"EMBED_FLEET_TEXT_CLAIMS": "0"}
os.environ.update(TEXT_CLAIMS_OFF)

from producer.jobs import JobOptions, Stager, prepare  # noqa: E402
from producer.local_fleet import LocalFleet  # noqa: E402
from shared.control.celery_app import make_app  # noqa: E402
from shared.control.ledger import JobLedger, connect  # noqa: E402
from shared.control.settings import Settings  # noqa: E402
from shared.inputs.sources import documents  # noqa: E402
from shared.records.schemas import SkippedRecord  # noqa: E402

CRANFIELD = REPO / "examples" / "cranfield"


def copied_documents(copies: int, docs: int | None = None) -> list[dict[str, Any]]:
    """Cranfield's documents (its first ``docs``) ``copies`` times over, copy k > 0 under
    ids ``<id>-c<k>`` and with every ``copies``-th word of its text, from the k-th, in
    upper case.

    Why the texts differ: a unit encodes a text it holds twice only once
    (``workers.inference.feed.Distinct``), and the copies of a document are chunks of
    the same length, staged in the same like-length window, so mostly in the same
    unit. Identical copies measured that, not encoding: a dense message of the null
    model ran faster than the forward pass's own ceiling. Why upper case: MiniLM's
    tokenizer is uncased, so every copy is cut into the same chunks, of the same ids,
    as the original."""
    import json

    rows = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines()]
    out = list(rows[:docs])
    for copy in range(1, copies):
        for row in rows[:docs]:
            words = row["text"].split(" ")
            text = " ".join(w.upper() if i % copies == copy else w for i, w in enumerate(words))
            out.append({**row, "_id": f"{row['_id']}-c{copy}", "text": text})
    return out


def sync(device: str) -> None:
    """Wait for the device's queue to drain (a CUDA call returns before its kernels end)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def best_of(call: Callable[[], Any], device: str = "cpu", repeat: int = 3) -> float:
    """The best wall time of ``repeat`` calls, the device's queue drained around each."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def chunk_texts(options: JobOptions) -> list[str]:
    """The texts of the chunks the fleet will encode for these options."""
    job = prepare(options)
    texts: list[str] = []
    for record in documents(job.source, "fail"):
        if not isinstance(record, SkippedRecord):
            texts += [c.text for c in job.chunker.chunk(record) or []]
    return texts


def bare_encode(
    model_class: Any, model_dir: str, texts: list[str], device: str = "cpu"
) -> dict[str, Any]:
    """``model_class(model_dir, device=device).encode(texts)`` with its defaults
    (batch_size 32), timed after loading and one warm-up batch (on a GPU, until the
    vectors are back on the host, as ``encode`` returns them)."""
    import torch

    started = time.perf_counter()
    model = model_class(model_dir, device=device)
    model.encode(texts[:32])
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    model.encode(texts)
    elapsed = time.perf_counter() - started
    return {
        "chunks": len(texts),
        "load_s": load_s,
        "encode_s": elapsed,
        "chunks_per_s": len(texts) / elapsed,
        "torch_threads": torch.get_num_threads(),
    }


def fleet_stage(
    options: JobOptions, stage: str, queues: tuple[str, ...], stage_first: bool = False
) -> dict[str, Any]:
    """Run a job on the embedded fleet with these worker queues until ``stage`` has
    every batch, and measure it.

    Steady state: see :func:`steady_state`.
    Only ``stage``'s workers need to be started: other stages' messages wait unread.
    ``stage_first``: stage every batch before the workers start, so that a worker
    faster than the (serial) producer is measured, not the producer.
    """
    started = time.perf_counter()
    with LocalFleet(() if stage_first else queues) as local:
        settings = dataclasses.replace(Settings.from_env(), broker_url=local.redis_url)
        # The producer stages (stage_first: before any worker starts), so the bench
        # times the encode stage alone.
        job = prepare(dataclasses.replace(options, prepare_on="producer"))
        ledger = JobLedger(connect(local.redis_url), job.spec.job_id)
        ledger.open(job.spec, job.validation.documents, job.validation.bytes_total)
        stager = Stager(job, ledger, make_app(settings))
        if stage_first:
            stager.run()
            local.add_workers(queues)
        else:
            threading.Thread(target=stager.run, daemon=True).start()
        while True:
            local.check()
            progress = ledger.progress()
            done = next(s.batches_done for s in progress.stages if s.stage == stage)
            if progress.total_batches is not None and done == progress.total_batches:
                break
            time.sleep(0.25)
        result = steady_state(ledger.reports(stage))
    return {
        "chunks": result["items"],
        "batches": result["units"],
        "messages": result["messages"],
        "workers": result["workers"],
        "wall_s": time.perf_counter() - started,
        "load_s": result["load_s"],
        "encode_s": result["steady_s"],
        "chunks_per_s": result["items_per_s"],
        "message_chunks_p50": result["message_items_p50"],
        "message_latency_p50_ms": result["message_latency_p50_ms"],
        "message_gap_p50_ms": result["message_gap_p50_ms"],
    }


def cli_job(
    source: Path, extra: list[str], env: dict[str, str] | None = None, output: Path | None = None
) -> dict[str, Any]:
    """``embed-collections run SOURCE --json EXTRA`` as a user runs it (embedded fleet,
    with ``env`` added to the environment); the job's manifest, with its ``wall_s``. The
    output goes to a folder deleted afterwards, unless ``output`` is given."""
    import json
    import os
    import subprocess
    import tempfile

    inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL")}
    env = {"HF_HUB_OFFLINE": "1", **inherited, **(env or {})}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embed-fleet-bench-") as tmp:
        command = [sys.executable, "-m", "producer.cli", "run", str(source)]
        command += ["--output", str(output or tmp)]
        done = subprocess.run(
            [*command, "--json", *extra], cwd=REPO, env=env, capture_output=True, text=True
        )
    if done.returncode != 0:
        sys.exit(f"job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if '"summary"' in line]
    manifest: dict[str, Any] = lines[-1]["manifest"]
    manifest["wall_s"] = round(time.perf_counter() - started, 1)
    return manifest


def steady_state(reports: list[Any]) -> dict[str, Any]:
    """Throughput of a stage from its ledger reports, leaving out each worker's first
    message (it pays for loading the model): items of the rest over the time from the
    start of the first of them to the end of the last. From its start, not from the end
    of a first message: after a unit that loaded a model, the worker collects and
    freezes the objects the load left (``workers.runtime.collector``, about 0.3 s), part
    of the load, not of the steady state.

    A message of a GPU stage holds several staged batches, each with its own report and
    the message's times (``shared.control.pipeline.GPU_UNIT_TOKENS``), so reports are grouped
    into messages by worker and start time first. Also: each message's median chunks,
    latency, and the gap between a worker's messages (the broker's share of the fixed
    cost of a message)."""
    grouped: dict[tuple[str, float], list[Any]] = {}
    for report in reports:
        grouped.setdefault((report.worker, report.started_at), []).append(report)
    messages = sorted(
        (
            (worker, started, max(r.finished_at for r in group), sum(r.chunks for r in group))
            for (worker, started), group in grouped.items()
        ),
        key=lambda m: m[2],
    )
    first_of_worker: dict[str, Any] = {}
    for message in messages:
        first_of_worker.setdefault(message[0], message)
    firsts = set(first_of_worker.values())
    rest = [m for m in messages if m not in firsts]
    span = rest[-1][2] - min(m[1] for m in rest)
    latencies = [finished - started for _, started, finished, _ in rest]
    gaps = [later[1] - earlier[2] for earlier, later in pairwise(rest) if earlier[0] == later[0]]
    median_latency = statistics.median(latencies)
    first_latency = max(m[2] - m[1] for m in first_of_worker.values())
    return {
        "items": sum(m[3] for m in messages),
        "units": len(reports),
        "messages": len(messages),
        "workers": len(first_of_worker),
        "load_s": round(max(0.0, first_latency - median_latency), 2),
        "steady_s": round(span, 2),
        "items_per_s": round(sum(m[3] for m in rest) / span, 2),
        "message_items_p50": statistics.median(m[3] for m in rest),
        "message_latency_p50_ms": round(1000 * median_latency, 1),
        "message_gap_p50_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
    }


def run_rerank_groups(
    groups: list[Any], model_dir: str, top: int, tmp: Path, dtype: str = "auto"
) -> dict[str, Any]:
    """Rerank fused candidate groups through one worker on queue ``rerank``, with the
    job's ``--dtype``."""
    from shared.control.celery_app import fan_out
    from shared.records.job_store import JobStore
    from shared.records.schemas import JobSpec, RerankGroup, RetrievalSpec
    from shared.records.storage import open_store

    store = open_store(str(tmp / "out"))
    spec = JobSpec(
        job_id="rerank-bench",
        collection="cranfield",
        source="",
        output=store.url,
        created_at=time.time(),
        dense_models=[],
        chunk_tokens=256,
        chunk_overlap=0,
        batch_chunks=128,
        max_batch_tokens=None,
        on_bad_record="fail",
        retrieval=RetrievalSpec(
            queries_source="",
            queries=sum(len(g.queries) for g in groups),
            query_batches=0,
            qrels_source=None,
            rerank_model=model_dir,
            rerank_top=top,
        ),
        dtype=dtype,
    )
    job_store = JobStore.of(spec, store)
    started = time.perf_counter()
    with LocalFleet(("rerank",)) as local:
        ledger = JobLedger(connect(local.redis_url), spec.job_id)
        ledger.open(spec, 0, 0)
        app = make_app(dataclasses.replace(Settings.from_env(), broker_url=local.redis_url))
        for group in groups:
            group.job_id = spec.job_id
            job_store.put_fused(group)
        # As the rerank plan sends them: several groups a message.
        units = [RerankGroup(job_id=spec.job_id, stage="rerank", unit=g.group_id) for g in groups]
        fan_out(app, ledger, spec, "rerank", units)
        while len(ledger.reports("rerank")) < len(groups):
            local.check()
            time.sleep(0.25)
        reports = ledger.reports("rerank")
    result = steady_state(reports)
    result["pairs_per_s"] = result.pop("items_per_s")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result
