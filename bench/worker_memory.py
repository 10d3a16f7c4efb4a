"""Worker memory: does a dense worker's RSS grow with the batches it has encoded, and why?

Each mode runs in a fresh process over the same staged batches (N copies of Cranfield,
128 chunks a batch, the bench's BERT-tiny sentence-transformer unless ``--model``),
and records the process's RSS after every batch:

- ``bare``: ``SentenceTransformer.encode`` of each batch's texts (batch_size 32), the
  library alone;
- ``worker: no trim``: the dense worker's encode path
  (``workers.inference.dense.encode_batch``) as it was before the heap keeper;
- ``worker: trim every batch``: the same with glibc's ``malloc_trim(0)`` after every
  batch: if RSS stays flat then, the growth was memory the allocator kept after frees,
  not objects anyone holds;
- ``worker: HeapKeeper``: what a worker does now (``workers.runtime.heap``): a trim
  only when RSS passes the ceiling learned in warm-up.

Per mode, after a warm-up of 20 batches: the highest RSS in the first and in the second
half of the remaining batches and their ratio (growth: over 1, memory grows with work
done), chunks/s (encode time only) and the trims. ``--repeat N`` runs the modes N times,
interleaved, and the table gives each mode's median chunks/s: one run's throughput on a
shared 2-core machine moves by a tenth or more from one minute to the next.

    python bench/worker_memory.py [--copies 10] [--repeat 3] [--device cpu] [--model PATH]

Writes bench/results/worker_memory.json and worker_memory.png, and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO
from rich.console import Console
from rich.table import Table

MODES = ("bare", "worker: no trim", "worker: trim every batch", "worker: HeapKeeper")
WARMUP = 20
MIB = 2**20


def run_mode(mode: str, copies: int, device: str, model: str) -> dict[str, Any]:
    """One mode in this process (called in a fresh child by :func:`main`)."""
    from scale import collection

    from producer.jobs import JobOptions, prepare
    from shared.inputs.chunking import ChunkTally, chunk_batches
    from shared.inputs.sources import documents
    from shared.records.schemas import ChunkBatch, SkippedRecord
    from workers.runtime.heap import HeapKeeper, rss

    options = JobOptions(
        source=str(collection(copies)), output="unused", dense_models=[model], dtype="fp32"
    )
    job = prepare(options)
    records = (r for r in documents(job.source, "fail") if not isinstance(r, SkippedRecord))
    batches = list(chunk_batches(job.chunker, records, 128, ChunkTally()))
    del job
    keeper = HeapKeeper()
    trim = ctypes.CDLL(None).malloc_trim
    if mode == "bare":
        from sentence_transformers import SentenceTransformer

        bare = SentenceTransformer(model, device=device)
    else:
        from workers.inference.dense import encode_batch
        from workers.inference.engine import Inference

        inference = Inference(requested_device=device)
    samples: list[int] = []
    busy = 0.0
    chunks = 0
    for number, group in enumerate(batches):
        started = time.perf_counter()
        if mode == "bare":
            bare.encode([chunk.text for chunk in group.chunks], batch_size=32)
        else:
            batch = ChunkBatch(
                job_id="bench", batch_id=f"b{number}", chunks=group.chunks, tokens=group.tokens
            )
            encode_batch(inference, batch, [model], dtype="fp32")
        if mode == "worker: trim every batch":
            trim(0)
        elif mode == "worker: HeapKeeper":
            keeper.after_unit()
        if number >= WARMUP:
            busy += time.perf_counter() - started
            chunks += len(group.chunks)
        samples.append(rss())
    after = samples[WARMUP:] or samples
    half = len(after) // 2
    early, late = max(after[: half or 1]), max(after[half:])
    return {
        "mode": mode,
        "batches": len(batches),
        "rss_mib": [round(s / MIB, 1) for s in samples],
        "early_max_mib": round(early / MIB, 1),
        "late_max_mib": round(late / MIB, 1),
        "growth": round(late / early, 3),
        "chunks_per_s": round(chunks / busy, 1) if busy else None,
        "trims": keeper.trims if mode == "worker: HeapKeeper" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each mode")
    parser.add_argument("--model", default="", help="a sentence-transformer folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/worker_memory.json")
    parser.add_argument("--modes", default=",".join(MODES), help="which modes, comma-separated")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if not args.model:
        from scale import tiny_dense_model

        args.model = str(tiny_dense_model())
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.copies, args.device, args.model)))
        return
    from workers.inference.precision import cpu_flags

    console = Console()
    runs = []
    modes = args.modes.split(",")
    for mode in [m for _ in range(args.repeat) for m in modes]:
        console.print(f"[dim]{mode} ...[/dim]")
        child = [sys.executable, __file__, "--mode", mode, "--copies", str(args.copies),
                 "--device", args.device, "--model", args.model]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
            "avx512": "avx512f" in cpu_flags(),
            "device": args.device,
        },
        "copies": args.copies,
        "model": Path(args.model).name,
        "warmup_batches": WARMUP,
        "repeat": args.repeat,
        "runs": runs,
        "median_chunks_per_s": {
            mode: statistics.median(r["chunks_per_s"] for r in runs if r["mode"] == mode)
            for mode in modes
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = Table(title=f"RSS of one process encoding {runs[0]['batches']} batches ({args.device})")
    for column in ("mode", "max MiB, 1st half", "max MiB, 2nd half", "growth",
                   "chunks/s (median)", "trims"):  # fmt: skip
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        early = "/".join(str(r["early_max_mib"]) for r in mine)
        late = "/".join(str(r["late_max_mib"]) for r in mine)
        growth = "/".join(f"{r['growth']:.3f}" for r in mine)
        trims = "/".join(str(r["trims"]) for r in mine if r["trims"] is not None)
        speed = f"{result['median_chunks_per_s'][mode]:.1f}"
        table.add_row(mode, early, late, growth, speed, trims)
    console.print(table)
    plot(runs[: len(modes)], args.out.with_suffix(".png"))


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        axes.plot(range(1, len(run["rss_mib"]) + 1), run["rss_mib"], label=run["mode"])
    axes.axvline(WARMUP, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("batches encoded (128 chunks each)")
    axes.set_ylabel("RSS, MiB")
    axes.set_title("One process's RSS per batch encoded")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
