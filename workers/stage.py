"""What every encode stage hands back to its task, and the host-wide thread budget."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.schemas import ModelInfo, Struct
from workers.measure import StageFigures

HOST_WORKERS_KEY = "embed-fleet:host:{host}:torch-workers"
# A worker that ran no task for this long no longer counts against the host's cores.
WORKER_IDLE_S = 120


@dataclass
class StageResult:
    """One batch's output of a stage.

    Attributes:
        shard: The Struct written to the stage's deterministic shard key.
        batch_sizes: Sizes of the model batches it ran.
        tokens: Tokens it processed.
        models: What it loaded, for the manifest.
        device: Where it ran.
        figures: Peak memory, out-of-memory retries and learned batch budgets.
    """

    shard: Struct
    batch_sizes: list[int]
    tokens: int
    models: list[ModelInfo]
    device: str
    figures: StageFigures = field(default_factory=StageFigures)


def balance_torch_threads(client: redis.Redis) -> int:
    """Give this process its share of the host's cores.

    Every torch worker process on a host registers itself (a sorted set in Redis, scored
    by its last task) and takes ``cores // workers`` threads, so three sparse workers on
    a 16-core host use 5 threads each instead of 16 each. ``EMBED_FLEET_TORCH_THREADS``
    overrides it.
    """
    import torch

    forced = os.environ.get("EMBED_FLEET_TORCH_THREADS")
    if forced:
        threads = max(1, int(forced))
    else:
        key = HOST_WORKERS_KEY.format(host=socket.gethostname())
        now = time.time()
        pipe = client.pipeline()
        pipe.zadd(key, {str(os.getpid()): now})
        pipe.zremrangebyscore(key, 0, now - WORKER_IDLE_S)
        pipe.zcard(key)
        pipe.expire(key, WORKER_IDLE_S * 2)
        results: list[Any] = pipe.execute()
        cores = len(os.sched_getaffinity(0))
        threads = max(1, cores // max(1, int(results[2])))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
