"""GPU leases in Redis: one worker per physical GPU, across every host and container.

A GPU worker takes a lease on one device when it starts: a key
``embed-fleet:lease:<device UUID>`` set with ``NX`` and a TTL, naming the holder (worker,
host, CUDA index). The key is the device's UUID, not ``<host>:<index>``, because neither
of those names a GPU: every container has its own hostname and numbers the GPUs it sees
from 0, so two replicas given the same GPU would both take "cuda:0 of their host". The
UUID is the same wherever the device is seen from. Host and index stay in the holder,
for display.

A heartbeat thread extends the lease while the worker lives; a stopped worker deletes
it; a crashed one (kill -9, a lost container) stops extending it and the lease expires
after its TTL, so its GPU becomes free again without anyone cleaning up. Extending and
releasing check the holder first (one Lua script each), so a worker whose lease
expired and was taken by another never touches the new holder's lease.

Shared because the workers take leases and ``embed-collections leases`` lists them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import msgspec
import redis

from shared.records.errors import EmbedFleetError
from shared.records.schemas import Struct

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


class Gpu(Struct):
    """One GPU as a worker sees it.

    Attributes:
        index: Its CUDA index in this process (what ``cuda:N`` names; depends on
            ``CUDA_VISIBLE_DEVICES`` and on what the container was given).
        uuid: The physical device's UUID (``GPU-...``, as ``nvidia-smi -L`` prints it),
            the same from every container and host that sees it.
        name: Its model name, for display.
    """

    index: int
    uuid: str
    name: str = ""


class LeaseHolder(Struct):
    """What a lease key holds: who has the device, where it is seen, since when."""

    worker: str
    pid: int
    since: float
    host: str
    index: int
    name: str = ""


class LeaseInfo(Struct):
    """A lease as ``embed-collections leases`` shows it."""

    uuid: str
    host: str
    device: int
    worker: str
    pid: int
    held_s: float
    expires_in_s: float
    name: str = ""


_ASK_CUDA = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", "") or "")
        gpus.append({"index": index, "uuid": uuid, "name": props.name})
print(json.dumps(gpus))
"""


def fake_gpus(spec: int | tuple[str, ...], host: str) -> list[Gpu]:
    """Stand-in devices (``EMBED_FLEET_GPUS``): ``N`` gives N devices with stable UUIDs
    of their own host (``fake-<host>-<i>``); a tuple of UUIDs gives exactly those, as
    containers that were given the same GPUs see them."""
    if isinstance(spec, int):
        uuids: Sequence[str] = [f"fake-{host}-{index}" for index in range(max(0, spec))]
    else:
        uuids = spec
    return [Gpu(index=index, uuid=safe_uuid(uuid), name="fake") for index, uuid in enumerate(uuids)]


def safe_uuid(text: str) -> str:
    """A device identity fit for a Redis key (anything else is replaced by ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip())[:128]
    return cleaned or "unknown"


def host_gpus(forced: int | tuple[str, ...] | None = None, host: str | None = None) -> list[Gpu]:
    """The GPUs this worker sees: stand-ins if ``forced`` (``EMBED_FLEET_GPUS``; 0 keeps
    a worker on the CPU), else what CUDA reports (honouring ``CUDA_VISIBLE_DEVICES``).

    CUDA is asked in a child process: a worker's main process that touched CUDA before
    Celery forks its pool leaves the pool unable to use it (seen on an H200: the forked
    child's first CUDA call failed after the parent called ``torch.cuda.device_count()``).
    A device whose UUID CUDA does not give is named ``<host>:<index>``, as leases were
    before UUIDs: right on a bare host, not across containers.
    """
    here = host or socket.gethostname()
    if forced is not None:
        return fake_gpus(forced, here)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _ASK_CUDA],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return []
    gpus = []
    for seen in found:
        uuid = str(seen.get("uuid") or "")
        if uuid and not uuid.startswith("GPU-"):
            uuid = f"GPU-{uuid}"  # torch prints the bare UUID; nvidia-smi prefixes it
        gpus.append(
            Gpu(
                index=int(seen["index"]),
                uuid=safe_uuid(uuid or f"{here}:{seen['index']}"),
                name=str(seen.get("name", "")),
            )
        )
    return gpus


def gpu_count(forced: int | None = None) -> int:
    """How many GPUs this worker sees (see :func:`host_gpus`)."""
    return len(host_gpus(forced))


def lease_key(uuid: str) -> str:
    return f"{PREFIX}:{safe_uuid(uuid)}"


class GpuLease:
    """One worker's lease on one physical GPU.

    Args:
        client: The fleet's Redis.
        worker: The worker's name (Celery's ``-n``), shown by ``leases``.
        host: The host (or container) the worker runs on, for display (default: this
            host's name).
        ttl_s: Seconds a lease outlives its holder's last heartbeat.
        on_lost: Called (from the heartbeat thread) when the lease turns out to be gone:
            it expired while the holder could not renew it (Redis away longer than the
            TTL, a stalled process) and may belong to another worker now. The holder
            must stop using the device.
    """

    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        host: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.worker = worker
        self.host = host or socket.gethostname()
        self.ttl_ms = int(ttl_s * 1000)
        self.since = time.time()
        self.gpu: Gpu | None = None
        self.on_lost = on_lost
        self._holder = b""
        self._extend = client.register_script(_EXTEND)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self, gpus: Sequence[Gpu]) -> Gpu | None:
        """Take the first free device of ``gpus`` (in CUDA order); None if all are held."""
        for gpu in gpus:
            holder = msgspec.json.encode(
                LeaseHolder(
                    worker=self.worker,
                    pid=os.getpid(),
                    since=self.since,
                    host=self.host,
                    index=gpu.index,
                    name=gpu.name,
                )
            )
            if self.client.set(lease_key(gpu.uuid), holder, nx=True, px=self.ttl_ms):
                self.gpu, self._holder = gpu, holder
                return gpu
        return None

    def acquire(
        self,
        gpus: Sequence[Gpu],
        *,
        wait: bool = False,
        poll_s: float = 1.0,
        on_wait: Callable[[], None] | None = None,
    ) -> Gpu:
        """Take a free device and start the heartbeat.

        Raises:
            EmbedFleetError: when every device is held and ``wait`` is False, naming
                each one's holder and where it runs.
        """
        while True:
            gpu = self.try_acquire(gpus)
            if gpu is not None:
                self._start_heartbeat()
                return gpu
            if not wait:
                raise EmbedFleetError(
                    f"all {len(gpus)} GPU(s) this worker sees on {self.host} are leased "
                    f"({holders_of(self.client, gpus)})",
                    "Run one GPU worker per GPU: stop one, give this worker another GPU, or "
                    "start it with EMBED_FLEET_GPU_WAIT=1 to wait for a free one",
                )
            if on_wait:
                on_wait()
            time.sleep(poll_s)

    def extend(self) -> bool:
        """Push the lease's expiry out by its TTL; False if it is no longer ours."""
        if self.gpu is None:
            return False
        key = lease_key(self.gpu.uuid)
        return bool(self._extend(keys=[key], args=[self._holder, self.ttl_ms]))

    def release(self) -> None:
        """Stop the heartbeat and give the device back (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.gpu is not None:
            self._release(keys=[lease_key(self.gpu.uuid)], args=[self._holder])
            self.gpu = None

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="gpu-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                held = self.extend()
            except redis.RedisError:
                continue  # Redis away for a moment: the TTL leaves room for a retry
            if not held and not self._stop.is_set():
                if self.on_lost is not None:
                    self.on_lost()
                return


def holders_of(client: redis.Redis, gpus: Sequence[Gpu]) -> str:
    """Who holds each of ``gpus``, for an error message."""
    held = {lease.uuid: lease for lease in list_leases(client)}
    parts = []
    for gpu in gpus:
        lease = held.get(gpu.uuid)
        if lease is not None:
            parts.append(
                f"{gpu.uuid} (cuda:{gpu.index} here) by {lease.worker} on {lease.host} "
                f"as cuda:{lease.device}"
            )
    return ", ".join(parts) or "their holders just let go: try again"


def list_leases(client: redis.Redis) -> list[LeaseInfo]:
    """Every live lease of the fleet, by host and device."""
    out: list[LeaseInfo] = []
    now = time.time()
    for key in client.scan_iter(match=f"{PREFIX}:*", count=500):
        name = key.decode() if isinstance(key, bytes) else str(key)
        pipe = client.pipeline()
        pipe.get(key)
        pipe.pttl(key)
        raw, ttl = pipe.execute()
        if raw is None:
            continue  # expired between the scan and the read
        try:
            holder = msgspec.json.decode(raw, type=LeaseHolder)
        except msgspec.DecodeError:
            continue  # a lease of an older release (keyed by host:index): it expires
        out.append(
            LeaseInfo(
                uuid=name.removeprefix(PREFIX + ":"),
                host=holder.host,
                device=holder.index,
                worker=holder.worker,
                pid=holder.pid,
                held_s=round(now - holder.since, 1),
                expires_in_s=round(max(0, int(ttl)) / 1000, 1),
                name=holder.name,
            )
        )
    return sorted(out, key=lambda lease: (lease.host, lease.device, lease.uuid))
