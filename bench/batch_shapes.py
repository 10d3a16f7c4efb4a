"""Batch shapes, a CPU worker's memory and its speed: what rounding batch widths buys.

On a CPU, oneDNN builds and keeps a kernel, with its scratch memory, for every input
shape a matmul meets. A dense worker's batches are cut by the token budget, so their
shapes are (rows, width): at exact widths (a batch's longest item) a long run meets new
ones all along. This bench runs a model's forward over units of 1,536 chunks with
Cranfield's token lengths (drawn at random, the same draw for every variant), cut as the
worker cuts them, each variant in a fresh process, and records the shapes it met, its
resident memory and its speed:

- ``exact``: widths as the longest item (the code before ``pad_multiple``);
- ``rounded``: widths rounded up to the CPU's multiple (what a worker does for a bf16
  model, ``pad_multiple``);
- ``full-rows``: also a unit's last batch padded to the rows of a full one (one shape
  per width; not built, as it costs a real model more than it saves).

Writes ``bench/results/batch_shapes.json`` and prints a table.

    python bench/batch_shapes.py [--units-tiny 30] [--units-minilm 5] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO

VARIANTS = {"exact": (1, False), "rounded": (0, False), "full-rows": (0, True)}
UNIT = 1536
BUDGET = 4096


def one_run(model: str, variant: str, units: int, dtype: str) -> dict[str, Any]:
    """One variant in this process (the bench runs each in a fresh one)."""
    import psutil
    import torch
    from scale import tiny_dense_model
    from sentence_transformers import SentenceTransformer

    from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model
    from workers.inference.batch_runner import (
        CPU_PAD_MULTIPLE,
        padded_width,
        token_budget_batches,
    )

    multiple, full_rows = VARIANTS[variant]
    multiple = multiple or CPU_PAD_MULTIPLE
    path = tiny_dense_model() if model == "tiny" else resolve_model(DEFAULT_DENSE_MODEL).path
    st = SentenceTransformer(str(path), device="cpu").eval()
    if dtype == "bf16":
        st.to(torch.bfloat16)
    corpus = REPO / "examples" / "cranfield" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    lengths = [min(256, len(ids)) for ids in st.tokenizer(texts)["input_ids"]]
    draw = random.Random(0)
    process = psutil.Process()
    shapes: set[tuple[int, int]] = set()
    start_rss = process.memory_info().rss
    started = time.perf_counter()
    for _ in range(units):
        unit = [draw.choice(lengths) for _ in range(UNIT)]
        for group in token_budget_batches(unit, BUDGET, multiple):
            width = padded_width(max(unit[i] for i in group), multiple)
            rows = max(len(group), BUDGET // width) if full_rows else len(group)
            shapes.add((rows, width))
            item_lengths = torch.tensor([unit[i] for i in group] + [1] * (rows - len(group)))
            mask = (torch.arange(width)[None, :] < item_lengths[:, None]).long()
            ids = torch.full((rows, width), 1000, dtype=torch.long)
            with torch.inference_mode():
                st({"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})
    seconds = time.perf_counter() - started
    return {
        "model": model,
        "variant": variant,
        "multiple": multiple,
        "units": units,
        "shapes": len(shapes),
        "rss_growth_mib": round((process.memory_info().rss - start_rss) / 2**20),
        "chunks_per_s": round(units * UNIT / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units-tiny", type=int, default=30)
    parser.add_argument("--units-minilm", type=int, default=5)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "batch_shapes.json"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, variant = args.one
        units = args.units_tiny if model == "tiny" else args.units_minilm
        print(json.dumps(one_run(model, variant, units, args.dtype)))
        return
    from workers.inference.precision import cpu_flags

    runs = []
    for model in ("tiny", "minilm"):
        for variant in VARIANTS:
            done = subprocess.run(
                [sys.executable, __file__, "--one", model, variant, "--dtype", args.dtype,
                 "--units-tiny", str(args.units_tiny), "--units-minilm", str(args.units_minilm)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    result = {
        "benchmark": "batch_shapes",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        },
        "dtype": args.dtype,
        "unit_chunks": UNIT,
        "budget_tokens": BUDGET,
        "models": {
            "tiny": "BERT-tiny + mean pooling (bench/scale.py)",
            "minilm": "all-MiniLM-L6-v2",
        },
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| model | widths | units | shapes | RSS growth MiB | chunks/s |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run['model']} | {run['variant']} | {run['units']} | {run['shapes']} | "
            f"{run['rss_growth_mib']} | {run['chunks_per_s']} |"
        )


if __name__ == "__main__":
    main()
