"""The host-wide thread budget of torch workers.

Every torch worker process on a host registers itself (a sorted set in Redis, scored by
its last unit) and takes ``cores // workers`` threads, so three sparse workers on a
16-core host use 5 threads each instead of 16 each.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import redis

HOST_WORKERS_KEY = "embed-fleet:host:{host}:torch-workers"
# A worker that ran no task for this long no longer counts against the host's cores.
WORKER_IDLE_S = 120


def balance_torch_threads(client: redis.Redis, forced: int | None = None) -> int:
    """Give this process its share of the host's cores (``forced``:
    ``EMBED_FLEET_TORCH_THREADS``, which overrides the share); returns the threads."""
    import torch

    if forced:
        threads = max(1, forced)
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
