"""GPU leases in Redis: one worker per GPU, across every host of the fleet.

A GPU worker takes a lease on one device (host + CUDA index) when it starts: a key
``embed-fleet:lease:<host>:<index>`` set with ``NX`` and a TTL, naming the holder. A
heartbeat thread extends it while the worker lives; a stopped worker deletes it; a
crashed one (kill -9, a lost container) stops extending it and the lease expires after
its TTL, so its GPU becomes free again without anyone cleaning up. Extending and
releasing check the holder first (one Lua script each), so a worker whose lease
expired and was taken by another never touches the new holder's lease.

Shared because the workers take leases and ``embed-collections leases`` lists them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgspec
import redis

from shared.errors import EmbedFleetError
from shared.schemas import Struct

PREFIX = "embed-fleet:lease"
DEFAULT_TTL_S = 30.0

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseHolder(Struct):
    """What a lease key holds: who has the device, since when."""

    worker: str
    pid: int
    since: float


class LeaseInfo(Struct):
    """A lease as ``embed-collections leases`` shows it."""

    host: str
    device: int
    worker: str
    pid: int
    held_s: float
    expires_in_s: float


def gpu_count(forced: int | None = None) -> int:
    """GPUs this host offers: ``forced`` if given (``EMBED_FLEET_GPUS``; 0 keeps a worker
    on the CPU), else what CUDA reports (honouring ``CUDA_VISIBLE_DEVICES``).

    CUDA is asked in a child process: a worker's main process that touched CUDA before
    Celery forks its pool leaves the pool unable to use it (seen on an H200: the forked
    child's first CUDA call failed after the parent called ``torch.cuda.device_count()``).
    """
    if forced is not None:
        return max(0, forced)
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        )
        return int(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 0


def lease_key(host: str, index: int) -> str:
    return f"{PREFIX}:{host}:{index}"


class GpuLease:
    """One worker's lease on one GPU of its host.

    Args:
        client: The fleet's Redis.
        worker: The worker's name (Celery's ``-n``), shown by ``leases``.
        host: The host the GPUs belong to (default: this host's name).
        ttl_s: Seconds a lease outlives its holder's last heartbeat.
    """

    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        host: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.client = client
        self.host = host or socket.gethostname()
        self.ttl_ms = int(ttl_s * 1000)
        self.holder = msgspec.json.encode(
            LeaseHolder(worker=worker, pid=os.getpid(), since=time.time())
        )
        self.device: int | None = None
        self._extend = client.register_script(_EXTEND)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self, devices: int) -> int | None:
        """Take the lowest free device of ``devices``; None if all are held."""
        for index in range(devices):
            if self.client.set(lease_key(self.host, index), self.holder, nx=True, px=self.ttl_ms):
                self.device = index
                return index
        return None

    def acquire(
        self,
        devices: int,
        *,
        wait: bool = False,
        poll_s: float = 1.0,
        on_wait: Callable[[], None] | None = None,
    ) -> int:
        """Take a free device and start the heartbeat.

        Raises:
            EmbedFleetError: when every device is held and ``wait`` is False, naming
                the holders.
        """
        while True:
            index = self.try_acquire(devices)
            if index is not None:
                self._start_heartbeat()
                return index
            if not wait:
                holders = ", ".join(
                    f"cuda:{lease.device} by {lease.worker}"
                    for lease in list_leases(self.client)
                    if lease.host == self.host
                )
                raise EmbedFleetError(
                    f"all {devices} GPU(s) of {self.host} are leased ({holders})",
                    "Run one GPU worker per GPU: stop one, or start this worker with "
                    "EMBED_FLEET_GPU_WAIT=1 to wait for a free GPU",
                )
            if on_wait:
                on_wait()
            time.sleep(poll_s)

    def extend(self) -> bool:
        """Push the lease's expiry out by its TTL; False if it is no longer ours."""
        if self.device is None:
            return False
        key = lease_key(self.host, self.device)
        return bool(self._extend(keys=[key], args=[self.holder, self.ttl_ms]))

    def release(self) -> None:
        """Stop the heartbeat and give the device back (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.device is not None:
            self._release(keys=[lease_key(self.host, self.device)], args=[self.holder])
            self.device = None

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="gpu-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                self.extend()
            except redis.RedisError:
                continue  # Redis away for a moment: the TTL leaves room for a retry


def list_leases(client: redis.Redis) -> list[LeaseInfo]:
    """Every live lease of the fleet, by host and device."""
    out: list[LeaseInfo] = []
    now = time.time()
    for key in client.scan_iter(match=f"{PREFIX}:*", count=500):
        name = key.decode() if isinstance(key, bytes) else str(key)
        host, _, index = name.removeprefix(PREFIX + ":").rpartition(":")
        pipe = client.pipeline()
        pipe.get(key)
        pipe.pttl(key)
        raw, ttl = pipe.execute()
        if raw is None:
            continue  # expired between the scan and the read
        holder = msgspec.json.decode(raw, type=LeaseHolder)
        out.append(
            LeaseInfo(
                host=host,
                device=int(index),
                worker=holder.worker,
                pid=holder.pid,
                held_s=round(now - holder.since, 1),
                expires_in_s=round(max(0, int(ttl)) / 1000, 1),
            )
        )
    return sorted(out, key=lambda lease: (lease.host, lease.device))
