"""The host-wide thread budget of torch workers: the cores go to the workers that have
work.

Every torch worker process on a host keeps an entry in a sorted set in Redis, scored by
until when it counts as *active*: while it runs a unit, and for a moment after (so a
worker between two units of a busy queue keeps its share). Before each unit a worker
takes ``cores // active workers`` threads. Three sparse workers on a 16-core host use
5 threads each instead of 16 each; and once the dense worker of a 2-core host runs out
of batches, the sparse worker's next unit takes both cores instead of leaving one idle
while SPLADE runs on the other.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import redis

HOST_WORKERS_KEY = "embed-fleet:host:{host}:torch-workers"
# A unit in hand counts as active for at most this long (a worker killed mid-unit stops
# counting then).
BUSY_S = 600
# After its unit, a worker still counts this long: the gap before its next unit.
LINGER_S = 3.0


def _key() -> str:
    return HOST_WORKERS_KEY.format(host=socket.gethostname())


def balance_torch_threads(client: redis.Redis, forced: int | None = None) -> int:
    """Mark this process busy and give it its share of the host's cores among the active
    workers (``forced``: ``EMBED_FLEET_TORCH_THREADS``, which overrides the share);
    returns the threads."""
    import torch

    if forced:
        threads = max(1, forced)
    else:
        key, now = _key(), time.time()
        pipe = client.pipeline()
        pipe.zadd(key, {str(os.getpid()): now + BUSY_S})
        pipe.zremrangebyscore(key, 0, now)
        pipe.zcard(key)
        pipe.expire(key, BUSY_S * 2)
        results: list[Any] = pipe.execute()
        cores = len(os.sched_getaffinity(0))
        threads = max(1, cores // max(1, int(results[2])))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def unit_finished(client: redis.Redis) -> None:
    """This process's unit is done: it counts as active only a moment longer."""
    client.zadd(_key(), {str(os.getpid()): time.time() + LINGER_S}, xx=True)
