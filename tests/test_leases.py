"""GPU leases against a real Redis, and real workers taking them at start."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import base_env, run_cli

from shared.control.leases import Gpu, GpuLease, LeaseInfo, fake_gpus, lease_key, list_leases
from shared.records.errors import EmbedFleetError


def gpus(*uuids: str) -> list[Gpu]:
    return [Gpu(index=index, uuid=uuid) for index, uuid in enumerate(uuids)]


def test_workers_take_the_next_free_gpu_then_fail_clearly(redis_client) -> None:
    first = GpuLease(redis_client, "dense-a@h", host="h")
    second = GpuLease(redis_client, "dense-b@h", host="h")
    third = GpuLease(redis_client, "dense-c@h", host="h")
    assert first.acquire(gpus("GPU-0", "GPU-1")).uuid == "GPU-0"
    assert second.acquire(gpus("GPU-0", "GPU-1")).uuid == "GPU-1"
    with pytest.raises(EmbedFleetError) as error:
        third.acquire(gpus("GPU-0", "GPU-1"))
    message = str(error.value)
    assert "all 2 GPU(s) this worker sees on h are leased" in message
    assert "GPU-0 (cuda:0 here) by dense-a@h on h" in message
    assert "GPU-1 (cuda:1 here) by dense-b@h on h" in message
    assert "EMBED_FLEET_GPU_WAIT=1" in message
    # other devices are free whatever the host
    assert GpuLease(redis_client, "dense@other", host="other").acquire(gpus("GPU-9")).index == 0
    first.release()
    assert third.acquire(gpus("GPU-0", "GPU-1")).uuid == "GPU-0"  # released: free again
    for lease in (second, third):
        lease.release()


def test_one_physical_gpu_seen_by_two_containers_is_leased_once(redis_client) -> None:
    """Two containers, each with its own hostname, each seeing the shared GPU as its
    cuda:0: the second must not take it because it is "cuda:0 of another host"."""
    a = GpuLease(redis_client, "dense@ctr-a", host="ctr-a")
    b = GpuLease(redis_client, "dense@ctr-b", host="ctr-b")
    assert a.acquire(gpus("GPU-shared", "GPU-a-only")).uuid == "GPU-shared"
    taken = b.acquire(gpus("GPU-shared", "GPU-b-only"))
    assert taken.uuid == "GPU-b-only" and taken.index == 1
    c = GpuLease(redis_client, "dense@ctr-c", host="ctr-c")
    with pytest.raises(
        EmbedFleetError, match=r"GPU-shared \(cuda:0 here\) by dense@ctr-a on ctr-a"
    ):
        c.acquire(gpus("GPU-shared"))
    rows = {lease.uuid: lease for lease in list_leases(redis_client)}
    assert set(rows) == {"GPU-shared", "GPU-b-only"}
    assert (rows["GPU-b-only"].host, rows["GPU-b-only"].device) == ("ctr-b", 1)
    a.release()
    b.release()


def test_stand_in_gpus_are_stable_and_key_safe() -> None:
    assert [g.uuid for g in fake_gpus(2, "node-7")] == ["fake-node-7-0", "fake-node-7-1"]
    assert fake_gpus(2, "node-7") == fake_gpus(2, "node-7")
    assert [g.index for g in fake_gpus(("GPU-x", "GPU-y"), "h")] == [0, 1]
    assert fake_gpus(0, "h") == []
    assert lease_key("GPU-1:2/*") == "embed-fleet:lease:GPU-1_2__"


def test_a_crashed_workers_lease_expires_and_a_live_one_does_not(redis_client) -> None:
    crashed = GpuLease(redis_client, "crashed@h", host="h", ttl_s=0.6)
    assert crashed.try_acquire(gpus("GPU-c")) is not None  # no heartbeat: as if killed
    alive = GpuLease(redis_client, "alive@h2", host="h2", ttl_s=0.6)
    assert alive.acquire(gpus("GPU-a")).uuid == "GPU-a"  # with its heartbeat
    time.sleep(1.5)
    assert redis_client.get(lease_key("GPU-c")) is None
    assert redis_client.get(lease_key("GPU-a")) is not None
    waiter = GpuLease(redis_client, "waiter@h", host="h")
    assert waiter.acquire(gpus("GPU-c"), wait=True, poll_s=0.05).uuid == "GPU-c"
    alive.release()
    waiter.release()


def test_a_lease_taken_over_is_neither_extended_nor_released(redis_client) -> None:
    old = GpuLease(redis_client, "old@h", host="h", ttl_s=0.3)
    assert old.try_acquire(gpus("GPU-0")) is not None
    time.sleep(0.5)  # expired
    new = GpuLease(redis_client, "new@h", host="h")
    assert new.try_acquire(gpus("GPU-0")) is not None
    assert not old.extend()
    old.release()
    assert [lease.worker for lease in list_leases(redis_client)] == ["new@h"]
    new.release()
    assert list_leases(redis_client) == []


def test_a_holder_learns_when_its_lease_was_lost(redis_client) -> None:
    """Redis lost the key (or it expired while the holder stalled): the heartbeat must
    say so, since another worker may take the device now."""
    lost = threading.Event()
    lease = GpuLease(redis_client, "w@h", host="h", ttl_s=0.3, on_lost=lost.set)
    lease.acquire(gpus("GPU-0"))
    time.sleep(0.5)
    assert not lost.is_set()  # renewed while held
    redis_client.delete(lease_key("GPU-0"))
    assert lost.wait(2)
    lease.release()


def test_leases_command_lists_holders(redis_server, redis_client) -> None:
    lease = GpuLease(redis_client, "dense-gpu0@host-a", host="host-a")
    lease.acquire(gpus("GPU-aa", "GPU-bb"))
    result = run_cli("leases", "--json", env=base_env(REDIS_URL=redis_server.url))
    table = run_cli("leases", env=base_env(REDIS_URL=redis_server.url, COLUMNS="200"))
    lease.release()
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1
    assert rows[0]["uuid"] == "GPU-aa" and rows[0]["host"] == "host-a" and rows[0]["device"] == 0
    assert rows[0]["worker"] == "dense-gpu0@host-a" and 0 < rows[0]["expires_in_s"] <= 30
    assert "GPU-aa" in table.stdout and "host-a" in table.stdout


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
    assert "all 1 GPU(s) this worker sees on" in log and "are leased" in log
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


@pytest.mark.e2e
def test_workers_in_two_containers_given_the_same_gpu_do_not_share_it(
    redis_server, start_worker
) -> None:
    """Real workers, each with its own hostname (UTS namespaces, as containers have),
    each given the shared device as its cuda:0 (``EMBED_FLEET_GPUS`` fakes the UUIDs a
    real GPU reports). The first leases it; a second that sees it beside another device
    takes the other one; a third that sees only the shared one exits 3 naming the holder.
    """
    assert os.geteuid() == 0, "UTS namespaces need root (CI runs as root)"
    redis_server.client().flushdb()
    client = redis_server.client()

    def env(gpus: str) -> dict[str, str]:
        return base_env(REDIS_URL=redis_server.url, EMBED_FLEET_GPUS=gpus)

    def leases_by_uuid(count: int) -> dict[str, LeaseInfo]:
        deadline = time.monotonic() + 60
        while len(list_leases(client)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return {lease.uuid: lease for lease in list_leases(client)}

    first = start_worker("dense,rerank", env("GPU-shared,GPU-a-only"), hostname="ctr-a")
    assert leases_by_uuid(1)["GPU-shared"].host == "ctr-a"
    second = start_worker("dense,rerank", env("GPU-shared,GPU-b-only"), hostname="ctr-b")
    held = leases_by_uuid(2)
    assert (held["GPU-b-only"].host, held["GPU-b-only"].device) == ("ctr-b", 1)
    assert "GPU-shared" in held and held["GPU-shared"].host == "ctr-a"
    third = start_worker("dense,rerank", env("GPU-shared"), hostname="ctr-c")
    assert third.proc.wait(timeout=60) == 3
    log = third.log_path.read_text()
    assert "all 1 GPU(s) this worker sees on ctr-c are leased" in log
    assert "GPU-shared (cuda:0 here) by dense+rerank-" in log and "@ctr-a on ctr-a" in log
    assert first.proc.poll() is None and second.proc.poll() is None
    first.stop()
    second.stop()
    assert list_leases(client) == []  # both gave theirs back on the way out
