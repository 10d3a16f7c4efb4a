"""Sparse stage throughput per compute dtype: the fleet (one sparse worker) at ``--dtype
fp32`` and ``--dtype auto`` vs bare SparseEncoder at its default fp32, and optionally
with 2 sparse workers.

All encode the same chunks (the producer's own chunking of the collection) with the
bundled SPLADE model, in the same run on the same machine; steady-state chunks/s
excludes model load and process start (reported apart). Only sparse workers run, so the
dense stage does not compete for the cores. With 2 workers each takes half the cores
(``balance_torch_threads``). Quality per dtype: ``embed-collections run examples/cranfield
--sparse-models splade-tiny --dtype X`` and the nDCG@10 of its ``sparse:splade-tiny``
ranking (always the whole collection, with its judgements; skip with ``--no-quality``);
auto must stay within 0.005 of fp32.

Usage: python bench/sparse_throughput.py [--source examples/cranfield] [--docs N]
       [--two-workers] [--no-quality]
Writes bench/results/sparse_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from common import REPO, bare_encode, chunk_texts, cli_job, fleet_stage
from rich.console import Console
from rich.table import Table
from sentence_transformers import SparseEncoder

from producer.jobs import JobOptions
from shared.inputs.models import BUNDLED_SPLADE, DEFAULT_DENSE_MODEL, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO / "examples" / "cranfield"))
    parser.add_argument("--docs", type=int, default=0, help="only the first N documents")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sparse_throughput.json"))
    parser.add_argument("--two-workers", action="store_true", help="also 2 sparse workers")
    parser.add_argument("--no-quality", action="store_true", help="skip the nDCG@10 jobs")
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
        one = fleet_stage(dataclasses.replace(options, dtype="fp32"), "sparse", ("sparse",))
        auto = fleet_stage(dataclasses.replace(options, dtype="auto"), "sparse", ("sparse",))
        two = fleet_stage(options, "sparse", ("sparse", "sparse")) if args.two_workers else None
    quality: dict[str, float] = {}
    if not args.no_quality:
        for dtype in ("fp32", "auto"):
            extra = ["--sparse-models", BUNDLED_SPLADE, "--dtype", dtype]
            manifest = cli_job(Path(args.source), extra)  # the whole collection, judged
            quality[dtype] = manifest["metrics"][f"sparse:{BUNDLED_SPLADE}"]["ndcg_at_10"]
    drop = quality["fp32"] - quality["auto"] if quality else 0.0
    result = {
        "benchmark": "sparse_throughput",
        "model": BUNDLED_SPLADE,
        "source": os.path.relpath(args.source, REPO),
        "documents": args.docs or "all",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "bare": b,
        "fleet_1_worker": one,
        "fleet_1_worker_auto": auto,
        "fleet_2_workers": two,
        "ratio_fleet_fp32_over_bare_fp32": one["chunks_per_s"] / b["chunks_per_s"],
        "ratio_fleet_auto_over_bare_fp32": auto["chunks_per_s"] / b["chunks_per_s"],
        "ratio_2_workers": two["chunks_per_s"] / b["chunks_per_s"] if two else None,
        "target_ratio_1_worker": 0.9,
        "ndcg_at_10": quality,
        "ndcg_at_10_drop_auto": round(drop, 4),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"sparse throughput, {len(texts)} chunks, {BUNDLED_SPLADE}")
    columns = ("path", "chunks/s (steady)", "vs bare fp32", "load / start s", "encode s", "nDCG@10")
    for col in columns:
        table.add_column(col, justify="right" if col != "path" else "left")
    rows = [
        ("bare SparseEncoder.encode (fp32)", b, None),
        ("fleet, 1 worker, --dtype fp32", one, quality.get("fp32")),
        ("fleet, 1 worker, --dtype auto", auto, quality.get("auto")),
    ]
    if two:
        rows.append(("fleet, 2 workers, --dtype auto", two, None))
    for name, r, ndcg in rows:
        table.add_row(
            name,
            f"{r['chunks_per_s']:.1f}",
            f"{r['chunks_per_s'] / b['chunks_per_s']:.2f}",
            f"{r['load_s']:.1f}",
            f"{r['encode_s']:.1f}",
            f"{ndcg:.4f}" if ndcg is not None else "-",
        )
    table.caption = (
        f"target: 1 worker fp32 >= 0.9 of bare; nDCG@10 fp32 - auto = {drop:+.4f} "
        f"(max 0.005) -> {args.out}"
    )
    Console().print(table)
    if drop > 0.005:
        sys.exit(1)


if __name__ == "__main__":
    main()
