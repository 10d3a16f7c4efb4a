"""What the benchmarks share: the producer's own chunks of a collection, and a job run
through the embedded fleet, measured from the ledger's per-batch reports."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from producer.jobs import JobOptions, Stager, prepare  # noqa: E402
from producer.local_fleet import LocalFleet  # noqa: E402
from producer.sources import documents  # noqa: E402
from shared.celery_app import make_app  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.ledger import JobLedger, connect  # noqa: E402
from shared.schemas import SkippedRecord  # noqa: E402


def chunk_texts(options: JobOptions) -> list[str]:
    """The texts of the chunks the fleet will encode for these options."""
    job = prepare(options)
    texts: list[str] = []
    for record in documents(job.source, "fail"):
        if not isinstance(record, SkippedRecord):
            texts += [c.text for c in job.chunker.chunk(record)]
    return texts


def bare_encode(model_class: Any, model_dir: str, texts: list[str]) -> dict[str, Any]:
    """``model_class(model_dir).encode(texts)`` with its defaults (batch_size 32), timed
    after loading and one warm-up batch."""
    import torch

    started = time.perf_counter()
    model = model_class(model_dir, device="cpu")
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


def fleet_stage(options: JobOptions, stage: str, queues: tuple[str, ...]) -> dict[str, Any]:
    """Run a job on the embedded fleet with these worker queues until ``stage`` has
    every batch, and measure it.

    Steady state: the chunks of every batch but each worker's first (which pays for
    model load) over the time from the end of the first batch to the end of the last.
    Only ``stage``'s workers need to be started: other stages' messages wait unread.
    """
    started = time.perf_counter()
    with LocalFleet(queues) as local:
        settings = dataclasses.replace(Settings.from_env(), broker_url=local.redis_url)
        job = prepare(options)
        ledger = JobLedger(connect(local.redis_url), job.spec.job_id)
        ledger.open(job.spec, job.validation.documents, job.validation.bytes_total)
        stager = Stager(job, ledger, make_app(settings))
        threading.Thread(target=stager.run, daemon=True).start()
        while True:
            local.check()
            progress = ledger.progress()
            done = next(s.batches_done for s in progress.stages if s.stage == stage)
            if progress.total_batches is not None and done == progress.total_batches:
                break
            time.sleep(0.25)
        reports = sorted(ledger.reports(stage), key=lambda r: r.finished_at)
    first_of_worker: dict[str, Any] = {}
    for report in reports:
        first_of_worker.setdefault(report.worker, report)
    firsts = set(id(r) for r in first_of_worker.values())
    rest = [r for r in reports if id(r) not in firsts]
    span = rest[-1].finished_at - reports[0].finished_at
    median_latency = statistics.median(r.latency_s for r in rest)
    first_latency = max(r.latency_s for r in first_of_worker.values())
    return {
        "chunks": sum(r.chunks for r in reports),
        "batches": len(reports),
        "workers": len(first_of_worker),
        "wall_s": time.perf_counter() - started,
        "load_s": max(0.0, first_latency - median_latency),
        "encode_s": span,
        "chunks_per_s": sum(r.chunks for r in rest) / span,
    }
