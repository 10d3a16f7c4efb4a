"""The host's cores go to the torch workers that have work (a real Redis)."""

from __future__ import annotations

import os
import time

import torch

from workers.runtime import threads


def test_a_worker_takes_the_cores_another_left_idle(monkeypatch, redis_client) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)))
    monkeypatch.setattr(threads, "LINGER_S", 0.2)
    before = torch.get_num_threads()
    pid = {"now": 101}
    monkeypatch.setattr(os, "getpid", lambda: pid["now"])

    def start(worker: int) -> int:
        pid["now"] = worker
        return threads.balance_torch_threads(redis_client)

    def finish(worker: int) -> None:
        pid["now"] = worker
        threads.unit_finished(redis_client)

    try:
        assert start(101) == 4  # alone on the host
        assert start(202) == 2  # the dense worker (101) is mid-unit: half each
        finish(101)
        assert start(202) == 2  # 101 is between two units: it keeps its share
        time.sleep(0.3)
        assert start(202) == 4  # 101 has had no work since: 202 takes every core
        assert start(101) == 2  # work again: shared again
        assert threads.balance_torch_threads(redis_client, forced=3) == 3  # the override
    finally:
        torch.set_num_threads(before)
