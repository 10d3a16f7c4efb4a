"""Sparse stage throughput: the fleet with 1 and 2 sparse workers vs bare SparseEncoder.

All encode the same chunks (the producer's own chunking of the collection) with the
bundled SPLADE model, in the same run on the same machine; steady-state chunks/s
excludes model load and process start (reported apart). Only sparse workers run, so the
dense stage does not compete for the cores. With 2 workers each takes half the cores
(``balance_torch_threads``).

Usage: python bench/sparse_throughput.py [--source examples/cranfield] [--docs N]
Writes bench/results/sparse_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from common import REPO, bare_encode, chunk_texts, fleet_stage
from rich.console import Console
from rich.table import Table
from sentence_transformers import SparseEncoder

from producer.jobs import JobOptions
from shared.models import BUNDLED_SPLADE, DEFAULT_DENSE_MODEL, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO / "examples" / "cranfield"))
    parser.add_argument("--docs", type=int, default=0, help="only the first N documents")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sparse_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if args.docs:
            corpus = Path(source) / "corpus.jsonl" if Path(source).is_dir() else Path(source)
            lines = corpus.read_text().splitlines()[: args.docs]
            source = str(Path(tmp) / "subset.jsonl")
            Path(source).write_text("\n".join(lines) + "\n")
        options = JobOptions(
            source=source,
            output=tmp,
            dense_models=[DEFAULT_DENSE_MODEL],
            sparse_models=[BUNDLED_SPLADE],
        )
        texts = chunk_texts(options)
        b = bare_encode(SparseEncoder, str(resolve_model(BUNDLED_SPLADE).path), texts)
        one = fleet_stage(options, "sparse", ("sparse",))
        two = fleet_stage(options, "sparse", ("sparse", "sparse"))
    result = {
        "benchmark": "sparse_throughput",
        "model": BUNDLED_SPLADE,
        "source": os.path.relpath(args.source, REPO),
        "documents": args.docs or "all",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "bare": b,
        "fleet_1_worker": one,
        "fleet_2_workers": two,
        "ratio_1_worker": one["chunks_per_s"] / b["chunks_per_s"],
        "ratio_2_workers": two["chunks_per_s"] / b["chunks_per_s"],
        "target_ratio_1_worker": 0.9,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"sparse throughput, {len(texts)} chunks, {BUNDLED_SPLADE}")
    for col in ("path", "chunks/s (steady)", "ratio to bare", "load / start s", "encode s"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, r in (
        ("bare SparseEncoder.encode", b),
        ("fleet, 1 sparse worker", one),
        ("fleet, 2 sparse workers", two),
    ):
        table.add_row(
            name,
            f"{r['chunks_per_s']:.1f}",
            f"{r['chunks_per_s'] / b['chunks_per_s']:.2f}",
            f"{r['load_s']:.1f}",
            f"{r['encode_s']:.1f}",
        )
    table.caption = f"target: 1 worker >= 0.9 of bare -> {args.out}"
    Console().print(table)


if __name__ == "__main__":
    main()
