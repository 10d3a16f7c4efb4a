"""Several "hosts" on one machine: network namespaces on a bridge (needs root).

Each :class:`Host` is a network namespace with its own address on a private bridge, and
every process started on it gets a hostname of its own (``unshare --uts``), which is what
Celery's ``%h``, GPU leases and logs see. Faults a fleet meets are one call away: a host
partitioned from the others (its link down, then up) or lost (every process of it
killed). Traffic never leaves the namespaces the test made, and :meth:`Network.close`
removes them and the bridge, also when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Host:
    """One namespace of the network: a name, an address, the processes started on it."""

    name: str
    namespace: str
    address: str
    link: str  # the bridge end of its veth pair
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """``args`` in this host's namespace, as a process group, with its hostname."""
        wrapped = [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            wrapped,
            env=env,
            cwd=cwd,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def run(
        self, args: list[str], env: dict[str, str], cwd: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on this host to its end (a producer's CLI)."""
        wrapped = ["ip", "netns", "exec", self.namespace, *args]
        return subprocess.run(
            wrapped, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def partition(self) -> None:
        """Cut the host off the network (its processes keep running)."""
        _ip("link", "set", self.link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.link, "up")

    def lose(self) -> None:
        """Every process of the host dies at once, as with a lost machine."""
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s, every process of the host."""
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.lose()


class Network:
    """A bridge and the hosts on it, private to one test (root only)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.bridge = f"efbr{tag}"
        self.prefix = f"ef{tag}"
        self.subnet = f"10.{random.randint(64, 127)}.{random.randint(0, 255)}"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        namespace = f"{self.prefix}-{name}"
        link = f"{self.prefix}v{number}"
        address = f"{self.subnet}.{number + 1}"
        _ip("netns", "add", namespace)
        host = Host(name, namespace, address, link)
        self.hosts.append(host)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", link, "master", self.bridge)
        _ip("link", "set", link, "up")
        for args in (
            ["addr", "add", f"{address}/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "lo", "up"],
        ):
            _ip("-n", namespace, *args)
        return host

    def close(self) -> None:
        """Stop every process and remove the namespaces and the bridge."""
        for host in self.hosts:
            host.stop()
        for host in self.hosts:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("link", "del", host.link)
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "del", host.namespace)
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _ip("link", "del", self.bridge)


def namespaces_available() -> str | None:
    """Why this machine cannot build namespaces, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None
