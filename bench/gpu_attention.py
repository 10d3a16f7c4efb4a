"""The bf16 slowdown on Hopper, isolated: the first pass over new batch shapes, per
attention backend, each configuration in a fresh process (a fresh cuDNN plan cache).

``gpu_fleet.py`` found that a bf16 CrossEncoder's first pass over a run's pairs was far
slower than its second over the same pairs, while fp32 was not, and that bf16 attention
ran in cuDNN's SDPA kernels. cuDNN builds an execution plan for every new input shape,
and a token-budget run has a new padded length in nearly every batch. This measures,
for the executor (rerank) and for ``SentenceTransformer.encode`` (dense):

- fp32 (CUTLASS memory-efficient attention);
- bf16 with PyTorch's default backends (cuDNN first on Hopper);
- bf16 with cuDNN's SDPA disabled (``torch.backends.cuda.enable_cudnn_sdp(False)``),
  which leaves flash / memory-efficient attention, with no per-shape plan;

each as first pass / second pass, and the tokenizer's share (the CPU side alone).

    python bench/gpu_attention.py --minilm-files .gpu/minilm --out result.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, sync
from gpu_fleet import CRANFIELD, build_models, cast
from rerank_throughput import candidate_pairs

CONFIGS = (("fp32", True), ("bf16", True), ("bf16", False))


def child(args: argparse.Namespace) -> None:
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from workers.inference.engine import Inference
    from workers.inference.rerank import CrossEncoderBatchExecutor, pairs_feed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(args.cudnn == "on")
    work = json.loads(Path(args.work).read_text())
    pairs = [tuple(p) for p in work["pairs"]]
    texts = work["texts"]
    result: dict[str, Any] = {"dtype": args.dtype, "cudnn_sdp": args.cudnn}
    model = cast(CrossEncoder(work["rerank"], device=device), args.dtype)
    tokenizer = model.tokenizer
    started = time.perf_counter()
    for start in range(0, len(pairs), 111):
        batch = pairs[start : start + 111]
        tokenizer(
            [q for q, _ in batch],
            [p for _, p in batch],
            padding=True,
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
    result["rerank_tokenize_pairs_per_s"] = round(len(pairs) / (time.perf_counter() - started), 1)
    executor = CrossEncoderBatchExecutor(model, device, 32768)
    # The executor's input as a rerank task lays it out (each query tokenized once).
    feed = pairs_feed(Inference(), model, work["rerank"], pairs)
    warm = pairs_feed(Inference(), model, work["rerank"], pairs[:8])
    executor.score(warm)  # CUDA context, cuBLAS handles: not shapes
    for label in ("first", "second"):
        sync(device)
        started = time.perf_counter()
        executor.score(feed)
        sync(device)
        result[f"rerank_{label}_pairs_per_s"] = round(
            len(pairs) / (time.perf_counter() - started), 1
        )
    del model, executor
    dense = cast(SentenceTransformer(work["dense"], device=device), args.dtype)
    dense.encode(texts[:4])
    for label in ("first", "second"):
        started = time.perf_counter()
        dense.encode(texts, batch_size=32)
        result[f"dense_bs32_{label}_chunks_per_s"] = round(
            len(texts) / (time.perf_counter() - started), 1
        )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-files", type=Path)
    parser.add_argument("--out", type=Path, help="the JSON result")
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--texts", type=int, default=2800)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--cudnn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.out is None:
        parser.error("--out is required")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embed-fleet-attn-") as name:
        tmp = Path(name)
        dense, rerank = build_models(tmp, args.minilm_files)
        data = candidate_pairs(args.queries, 50)
        pairs = [(text, doc) for _, text, docs in data for _, doc in docs]
        rows = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").open()]
        texts = [f"{r['title']}\n\n{r['text']}" for r in rows]
        texts = (texts * (args.texts // len(texts) + 1))[: args.texts]
        work = tmp / "work.json"
        work.write_text(
            json.dumps(
                {
                    "pairs": pairs,
                    "texts": texts,
                    "dense": dense,
                    "rerank": rerank,
                }
            )
        )
        for dtype, cudnn in CONFIGS:
            command = [sys.executable, __file__, "--child", "--work", str(work), "--dtype", dtype]
            done = subprocess.run(
                [*command, "--cudnn", "on" if cudnn else "off"],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"error": done.stderr[-1500:]}
            row.setdefault("dtype", dtype)
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"pairs": len(pairs), "texts": len(texts), "runs": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
