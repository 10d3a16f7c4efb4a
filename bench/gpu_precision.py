"""GPU checks for the dtype policy and GPU leasing, on a CUDA machine without the
fleet's services (torch, sentence-transformers, msgspec, redis-py only).

1. What ``--dtype auto`` picks on this GPU and why.
2. The reranker stand-in (ms-marco-MiniLM-L6-v2's shape, random weights) loaded through
   ``load_cross_encoder`` with ``auto``: the dtype kept and the probe's verdict; pairs/s
   of the executor in fp32 and in the dtype ``auto`` chose, and the score drift.
3. Fork safety of leasing: the worker's main process asks CUDA for its device count
   (``gpu_count``) before Celery forks the pool; the forked child must still use CUDA.

    python bench/gpu_precision.py --pairs .gpu/pairs.json --tokenizer .gpu/tok --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch
    from gpu_rerank import build_model

    from workers.inference import precision, rerank
    from workers.inference.engine import Inference

    result: dict[str, Any] = {}
    # 3 first: nothing may have initialised CUDA in this process before the fork.
    from shared.control.leases import gpu_count

    result["gpu_count_before_fork"] = gpu_count()  # what a GPU worker's main process does
    pid = os.fork()
    if pid == 0:
        try:
            value = float(torch.ones(4, device="cuda").sum().item())
            os._exit(0 if value == 4.0 else 1)
        except Exception:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    result["forked_child_used_cuda"] = os.waitstatus_to_exitcode(status) == 0

    result["gpu"] = torch.cuda.get_device_name()
    native, why = precision.native_bf16("cuda")
    result["auto"] = {"native_bf16": native, "why": why}
    pairs = [tuple(p) for p in json.loads(args.pairs.read_text())]
    folder = build_model(args.tokenizer, Path("/tmp/standin-cross-encoder"))
    timings = {}
    scores = {}
    inference = Inference(requested_device="cuda")
    for dtype in ("fp32", "auto"):
        loaded = rerank.load_cross_encoder(inference, str(folder), "cuda", dtype, pairs[:32])
        executor = rerank.CrossEncoderBatchExecutor(loaded.model, "cuda", 32768)
        # The executor's input as the rerank task lays it out (each query tokenized once).
        feed = rerank.pairs_feed(inference, loaded.model, str(folder), pairs)
        executor.score(rerank.pairs_feed(inference, loaded.model, str(folder), pairs[:256]))
        torch.cuda.synchronize()
        started = time.perf_counter()
        values, _ = executor.score(feed)
        torch.cuda.synchronize()
        timings[dtype] = round(len(pairs) / (time.perf_counter() - started), 1)
        scores[dtype] = np.array(values, dtype=np.float64)
        result[f"model_{dtype}"] = {
            "dtype": loaded.info.dtype,
            "reason": loaded.info.dtype_reason,
            "parameters": loaded.info.parameters,
        }
    result["pairs_per_s"] = timings
    result["auto_over_fp32"] = round(timings["auto"] / timings["fp32"], 2)
    result["score_drift_max"] = float(np.max(np.abs(scores["auto"] - scores["fp32"])))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
