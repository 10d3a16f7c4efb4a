"""Dense stage throughput and quality per compute dtype: the fleet at ``--dtype fp32``
and ``--dtype auto`` against bare SentenceTransformer at its default fp32.

All three encode the same Cranfield chunks (the producer's own chunking) in the same
run on the same machine:

- bare fp32: ``SentenceTransformer.encode(texts)`` with its defaults (batch_size 32),
  timed after the model is loaded and warmed up on one batch;
- bare bf16: the same model cast to bf16, for the hardware's own ceiling;
- fleet fp32 / fleet auto, throughput: the embedded fleet with one dense worker and
  ``--dtype X``; steady-state chunks/s from the ledger's per-batch reports (each
  worker's first batch, which pays for hydration and the dtype probe, left out; see
  ``common.fleet_stage``);
- fleet fp32 / fleet auto, end to end and quality: ``embed-collections run
  examples/cranfield --dtype X`` as a user runs it (dense only, with Cranfield's queries
  and judgements): the manifest's dense chunks/s over the stage's whole span, and the
  nDCG@10 of the dense ranking from ``metrics.json``.

``auto`` must keep quality: its nDCG@10 within 0.005 of fp32's (else the bench exits 1).
Target on a CPU with AVX512-BF16: fleet auto / bare fp32 >= 2.5.

Usage: python bench/dense_throughput.py [--source examples/cranfield]
Writes bench/results/dense_throughput.json and prints a table.
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
from typing import Any

from common import REPO, bare_encode, chunk_texts, cli_job, fleet_stage
from rich.console import Console
from rich.table import Table
from sentence_transformers import SentenceTransformer

from producer.jobs import JobOptions
from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model
from workers.inference.precision import cpu_flags

TARGET_AUTO = 2.5
MAX_NDCG_DROP = 0.005


def fleet(options: JobOptions, dtype: str) -> dict[str, Any]:
    steady = fleet_stage(dataclasses.replace(options, dtype=dtype), "dense", ("dense",))
    manifest = cli_job(Path(options.source), ["--dtype", dtype])
    stage = manifest["stages"]["dense"]
    (model,) = [m for m in manifest["models"] if m["kind"] == "dense"]
    return {
        "dtype_requested": dtype,
        "dtype": model["dtype"],
        "dtype_reason": model["dtype_reason"],
        "chunks": stage["items"],
        "chunks_per_s": steady["chunks_per_s"],
        "steady_state": steady,
        "end_to_end_chunks_per_s": stage["items_per_s"],
        "p50_s": stage["p50_s"],
        "p95_s": stage["p95_s"],
        "peak_memory_bytes": stage["peak_memory_bytes"],
        "ndcg_at_10": manifest["metrics"]["dense"]["ndcg_at_10"],
        "wall_s": manifest["wall_s"],
    }


def bf16_model(folder: str, device: str) -> SentenceTransformer:
    """Bare sentence-transformers in bf16: the most this hardware gives."""
    import torch

    model = SentenceTransformer(folder, device=device)
    model.to(torch.bfloat16)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO / "examples" / "cranfield"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = str(resolve_model(DEFAULT_DENSE_MODEL).path)
    with tempfile.TemporaryDirectory() as tmp:
        options = JobOptions(source=args.source, output=tmp, dense_models=[DEFAULT_DENSE_MODEL])
        texts = chunk_texts(options)
        bare = bare_encode(SentenceTransformer, folder, texts)
        bare_bf16 = bare_encode(bf16_model, folder, texts)
        runs = {dtype: fleet(options, dtype) for dtype in ("fp32", "auto")}
    ratios = {d: r["chunks_per_s"] / bare["chunks_per_s"] for d, r in runs.items()}
    drop = runs["fp32"]["ndcg_at_10"] - runs["auto"]["ndcg_at_10"]
    result = {
        "benchmark": "dense_throughput",
        "model": DEFAULT_DENSE_MODEL,
        "source": os.path.relpath(args.source, REPO),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
        },
        "bare_fp32": bare,
        "bare_bf16": bare_bf16,
        "ratio_bare_bf16_over_bare_fp32": round(
            bare_bf16["chunks_per_s"] / bare["chunks_per_s"], 3
        ),
        "fleet": runs,
        "ratio_fleet_fp32_over_bare_fp32": round(ratios["fp32"], 3),
        "ratio_fleet_auto_over_bare_fp32": round(ratios["auto"], 3),
        "target_auto_ratio": TARGET_AUTO,
        "ndcg_at_10_drop_auto": round(drop, 4),
        "max_ndcg_drop": MAX_NDCG_DROP,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"dense throughput, {len(texts)} chunks, {DEFAULT_DENSE_MODEL}")
    for col in ("path", "dtype", "chunks/s (steady)", "vs bare fp32", "end to end", "nDCG@10"):
        table.add_column(col, justify="right" if col not in ("path", "dtype") else "left")
    table.add_row("bare", "float32", f"{bare['chunks_per_s']:.1f}", "1.00", "-", "-")
    bf16_ratio = bare_bf16["chunks_per_s"] / bare["chunks_per_s"]
    table.add_row(
        "bare, cast to bf16",
        "bfloat16",
        f"{bare_bf16['chunks_per_s']:.1f}",
        f"{bf16_ratio:.2f}",
        "-",
        "-",
    )
    for dtype, run in runs.items():
        table.add_row(
            f"fleet --dtype {dtype}",
            run["dtype"],
            f"{run['chunks_per_s']:.1f}",
            f"{ratios[dtype]:.2f}",
            f"{run['end_to_end_chunks_per_s']:.1f}",
            f"{run['ndcg_at_10']:.4f}",
        )
    table.caption = (
        f"auto: {runs['auto']['dtype_reason']}\n"
        f"fleet auto / bare fp32 {ratios['auto']:.2f} (target >= {TARGET_AUTO}); "
        f"nDCG@10 fp32 - auto = {drop:+.4f} (max {MAX_NDCG_DROP}) -> {args.out}"
    )
    Console().print(table)
    if drop > MAX_NDCG_DROP:
        sys.exit(1)


if __name__ == "__main__":
    main()
