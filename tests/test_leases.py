"""GPU leases against a real Redis, and real workers taking them at start."""

from __future__ import annotations

import json
import time

import pytest
from conftest import base_env, run_cli

from shared.errors import EmbedFleetError
from shared.leases import GpuLease, lease_key, list_leases


def test_workers_take_the_next_free_gpu_then_fail_clearly(redis_client) -> None:
    first = GpuLease(redis_client, "dense-a@h", host="h")
    second = GpuLease(redis_client, "dense-b@h", host="h")
    third = GpuLease(redis_client, "dense-c@h", host="h")
    assert first.acquire(2) == 0
    assert second.acquire(2) == 1
    with pytest.raises(EmbedFleetError) as error:
        third.acquire(2)
    message = str(error.value)
    assert "all 2 GPU(s) of h are leased" in message
    assert "cuda:0 by dense-a@h" in message and "cuda:1 by dense-b@h" in message
    assert "EMBED_FLEET_GPU_WAIT=1" in message
    # another host's GPUs are its own
    assert GpuLease(redis_client, "dense@other", host="other").acquire(2) == 0
    first.release()
    assert third.acquire(2) == 0  # the released GPU is free again
    for lease in (second, third):
        lease.release()


def test_a_crashed_workers_lease_expires_and_a_live_one_does_not(redis_client) -> None:
    crashed = GpuLease(redis_client, "crashed@h", host="h", ttl_s=0.6)
    assert crashed.try_acquire(1) == 0  # no heartbeat: as if killed after taking it
    alive = GpuLease(redis_client, "alive@h2", host="h2", ttl_s=0.6)
    assert alive.acquire(1) == 0  # with its heartbeat
    time.sleep(1.5)
    assert redis_client.get(lease_key("h", 0)) is None
    assert redis_client.get(lease_key("h2", 0)) is not None
    waiter = GpuLease(redis_client, "waiter@h", host="h")
    assert waiter.acquire(1, wait=True, poll_s=0.05) == 0
    alive.release()
    waiter.release()


def test_a_lease_taken_over_is_neither_extended_nor_released(redis_client) -> None:
    old = GpuLease(redis_client, "old@h", host="h", ttl_s=0.3)
    assert old.try_acquire(1) == 0
    time.sleep(0.5)  # expired
    new = GpuLease(redis_client, "new@h", host="h")
    assert new.try_acquire(1) == 0
    assert not old.extend()
    old.release()
    assert [lease.worker for lease in list_leases(redis_client)] == ["new@h"]
    new.release()
    assert list_leases(redis_client) == []


def test_leases_command_lists_holders(redis_server, redis_client) -> None:
    lease = GpuLease(redis_client, "dense-gpu0@host-a", host="host-a")
    lease.acquire(4)
    result = run_cli("leases", "--json", env=base_env(REDIS_URL=redis_server.url))
    lease.release()
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1
    assert rows[0]["host"] == "host-a" and rows[0]["device"] == 0
    assert rows[0]["worker"] == "dense-gpu0@host-a" and 0 < rows[0]["expires_in_s"] <= 30


@pytest.mark.e2e
def test_a_second_gpu_worker_on_a_one_gpu_host_exits(redis_server, start_worker) -> None:
    """Real workers: the first leases the host's one GPU; the second exits saying so.
    (EMBED_FLEET_GPUS=1 stands in for a one-GPU host; no task runs, so no CUDA is used.)"""
    redis_server.client().flushdb()
    env = base_env(REDIS_URL=redis_server.url, EMBED_FLEET_GPUS="1")
    first = start_worker("dense,rerank", env)
    deadline = time.monotonic() + 60
    while not list_leases(redis_server.client()) and time.monotonic() < deadline:
        time.sleep(0.2)
    held = list_leases(redis_server.client())
    assert len(held) == 1 and held[0].device == 0
    second = start_worker("dense,rerank", env)
    assert second.proc.wait(timeout=60) == 3
    log = second.log_path.read_text()
    assert "all 1 GPU(s) of" in log and "are leased" in log
    assert first.proc.poll() is None  # the first one keeps running and keeps its lease
    first.stop()
    assert list_leases(redis_server.client()) == []  # a stopped worker gives it back


@pytest.mark.e2e
def test_a_gpu_worker_on_a_cpu_host_says_so(redis_server, start_worker) -> None:
    redis_server.client().flushdb()
    worker = start_worker("dense", base_env(REDIS_URL=redis_server.url, EMBED_FLEET_GPUS="0"))
    deadline = time.monotonic() + 60
    while "ready." not in worker.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "no CUDA device on this host: this worker runs on the CPU" in worker.log_path.read_text()
    assert list_leases(redis_server.client()) == []
