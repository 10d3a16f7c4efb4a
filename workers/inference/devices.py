"""Where models run, and how many padded tokens one model batch may hold there.

One module for both because they go together: a budget is a property of a device
kind. Measured on a 2-core CPU with all-MiniLM-L6-v2 (chunks/s): 4096 -> 37.7,
8192 -> 31.8, 16384 -> 27.0 (bare ``encode(batch_size=32)``: 33.5); large batches only
pay off on a GPU. A cross-encoder attends over query and passage together, so a pair
costs about what a chunk costs the dense models: the same budgets. SPLADE's MLM head
makes each token cost a full vocabulary row, so its batches stay small everywhere.
"""

from __future__ import annotations

DEFAULT_BATCH_TOKENS: dict[str, dict[str, int]] = {
    "dense": {"cpu": 4096, "cuda": 32768},
    "sparse": {"cpu": 4096, "cuda": 4096},
    "rerank": {"cpu": 4096, "cuda": 32768},
}


def default_batch_tokens(stage: str, device: str) -> int:
    """The padded-token budget of a stage's model batches on a device kind (``cuda:1``
    counts as ``cuda``; an unknown kind gets the CPU's)."""
    budgets = DEFAULT_BATCH_TOKENS[stage]
    return budgets.get(device.split(":")[0], budgets["cpu"])


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def worker_device(forced: str | None) -> str:
    """The device of a dense/rerank worker: the one its GPU lease (or
    ``EMBED_FLEET_DEVICE``) gave it, else CUDA when present, else the CPU."""
    if forced:
        return forced
    return "cuda" if cuda_available() else "cpu"


def sparse_device(requested: str | None) -> str:
    """The device of SPLADE (the job's ``--sparse-device``): ``cpu`` (the default),
    ``cuda``, or ``auto`` (CUDA when present)."""
    if requested in (None, "", "cpu"):
        return "cpu"
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    return requested


def prepare_cuda(device: str) -> None:
    """Process-wide settings for running models on ``device`` when it is a GPU.

    cuDNN's attention, PyTorch's first choice for bf16/fp16 SDPA on Hopper, builds an
    execution plan for every new input shape, and a token-budget run has a new padded
    length in nearly every batch. Measured on an H100 (``bench/gpu_attention.py``, each
    case in a fresh process): a bf16 MiniLM-shaped CrossEncoder's first pass over 4800
    pairs ran at 736 pairs/s with it and 2482 without (fp32: 2216), its second pass over
    the same shapes at 2288 and 2328; ``SentenceTransformer.encode`` in bf16, 627 against
    1953 chunks/s. Flash and memory-efficient attention need no plan, so cuDNN's is
    turned off; this was the whole of the "bf16 reranker at 0.35x fp32" seen on an H200.
    """
    if device.startswith("cuda"):
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
