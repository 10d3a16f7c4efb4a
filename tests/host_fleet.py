"""A fleet spread over hosts, for the multi-host tests and ``bench/faults.py``: a
services host (Redis with AOF, SeaweedFS S3), two worker hosts with hostnames of their
own and a producer host, each a network namespace on a private bridge (``hosts``; root
only). Faults are one call each (a worker killed, a host lost or cut off, Redis
restarted or lost, S3 stopped), and :data:`CHECKER` checks a job's output the same way
after every one: every chunk once, unit-norm vectors, checksums that match the stored
objects, the manifest written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from conftest import CRANFIELD, REPO, base_env
from hosts import Host, Network
from servers import S3_KEY, S3_SECRET

from producer.local_fleet import redis_server_binary, worker_command

REDIS_PORT, S3_PORT = 6379, 8333
REPLICA_PORT, SENTINEL_PORTS = 6380, (26379, 26380, 26381)
SENTINEL_MASTER = "fleet"
BUCKET = "fleet"


class Fleet:
    """The hosts of one test and how to reach the services from them."""

    def __init__(self, net: Network, tmp: Path, sentinel: bool = False) -> None:
        """With ``sentinel``: Redis is a primary, a replica and three Sentinels on the
        services host, and the fleet's ``REDIS_URL`` names the Sentinels."""
        self.tmp = tmp
        self.sentinel = sentinel
        self.redis_ports = {REDIS_PORT: "primary", REPLICA_PORT: "replica"}
        self.worker_procs: dict[tuple[str, str], tuple[subprocess.Popen[bytes], str]] = {}
        self.worker_starts: list[tuple[str, str]] = []
        self.services = net.add_host("services")
        self.producer = net.add_host("producer")
        self.workers = [net.add_host("worker-a"), net.add_host("worker-b")]
        address = self.services.address
        url = f"redis://{address}:{REDIS_PORT}/0"
        if sentinel:
            parts = [f"sentinel://{address}:{port}" for port in SENTINEL_PORTS]
            url = ";".join(parts) + f"/0?master={SENTINEL_MASTER}"
        self.env = base_env(
            REDIS_URL=url,
            S3_ENDPOINT_URL=f"http://{address}:{S3_PORT}",
            AWS_ACCESS_KEY_ID=S3_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            EMBED_FLEET_VISIBILITY_TIMEOUT="8",
            EMBED_FLEET_UNACKED_RESTORE_INTERVAL="1",
        )

    def start_redis(self) -> None:
        """Redis with AOF (as a fleet runs it), off loopback on purpose: only the test's
        own namespaces can reach it. With Sentinel: the primary, its replica (without
        persistence: the replica is what survives) and the three Sentinels."""
        host = self.services
        self.redis = self._redis(REDIS_PORT, "--appendonly", "yes")
        if not self.sentinel or hasattr(self, "replica"):
            return  # the Sentinels and the replica start once
        self.replica = self._redis(REPLICA_PORT, "--replicaof", host.address, str(REDIS_PORT))
        for port in SENTINEL_PORTS:
            conf = self.tmp / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {host.address}\nprotected-mode no\ndir {self.tmp}\n"
                f"sentinel monitor {SENTINEL_MASTER} {host.address} {REDIS_PORT} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 4000\n"
            )
            host.start([redis_server_binary(), str(conf), "--sentinel"], self.env,
                       self.tmp / f"sentinel-{port}.log")  # fmt: skip

    def _redis(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        host = self.services
        folder = self.tmp / f"redis-{port}"
        folder.mkdir(exist_ok=True)
        return host.start(
            [redis_server_binary(), "--bind", host.address, "--port", str(port),
             "--save", "", "--dir", str(folder), "--protected-mode", "no", *args],
            self.env, self.tmp / f"redis-{port}.log",
        )  # fmt: skip

    def fail_over(self) -> None:
        """kill -9 of the Redis primary; once the Sentinels promoted its replica, the
        dead one starts again as the new primary's replica (as a deployment's Redis asks
        the Sentinels whom to follow), and is known to them (bounded: 60 s)."""
        ask = SENTINEL_ASK.replace("ADDRESS", self.services.address)
        primary = int(self.python(ask + "print(primary())").stdout.strip())
        dead = self.redis if primary == REDIS_PORT else self.replica
        os.killpg(dead.pid, signal.SIGKILL)
        dead.wait(timeout=30)
        other = REPLICA_PORT if primary == REDIS_PORT else REDIS_PORT
        promoted = self.python(ask + f"wait(lambda: primary() == {other})")
        assert promoted.returncode == 0, promoted.stderr
        back = self._redis(primary, "--replicaof", self.services.address, str(other))
        if primary == REDIS_PORT:
            self.redis = back
        else:
            self.replica = back
        known = self.python(ask + f"wait(lambda: known({primary}))")
        assert known.returncode == 0, known.stderr

    def shutdown_redis(self) -> None:
        """``SHUTDOWN`` (the AOF is written), as an operator's restart does."""
        cli = str(Path(redis_server_binary()).parent / "redis-cli")
        args = [cli, "-h", self.services.address, "-p", str(REDIS_PORT), "SHUTDOWN"]
        self.producer.run(args, self.env, REPO, timeout=30)
        self.redis.wait(timeout=30)

    def start_services(self) -> None:
        self.start_redis()
        (self.tmp / "weed").mkdir()
        self.start_s3()
        # Ready when the producer host reaches both (bounded: 60 s).
        ready = self.python(READY.replace("BUCKET", BUCKET), timeout=90)
        assert ready.returncode == 0, ready.stderr

    def start_s3(self) -> None:
        """SeaweedFS (S3) on the services host, its data in the test's folder, so that
        a restart finds every object again."""
        host, tmp = self.services, self.tmp
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        # Ports of its own namespace: nothing else binds them (grpc twins at +10000).
        self.s3 = host.start(
            [weed, "mini", f"-dir={tmp / 'weed'}", f"-ip={host.address}",
             f"-ip.bind={host.address}", f"-s3.port={S3_PORT}", "-master.port=9333",
             "-volume.port=8080", "-filer.port=8888", "-admin.port=23646", "-admin.ui=false",
             "-webdav=false", "-s3.port.iceberg=8181", "-s3.port.lance=9101"],
            {**self.env, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET},
            tmp / "weed.log",
        )  # fmt: skip

    def stop_s3(self) -> None:
        """Every SeaweedFS process down (SIGTERM to its process group), as an outage."""
        os.killpg(self.s3.pid, signal.SIGTERM)
        self.s3.wait(timeout=30)
        for sock in Path("/tmp").glob(f"seaweedfs-*-{S3_PORT}.sock"):
            sock.unlink(missing_ok=True)

    def lose_redis(self) -> None:
        """Redis killed and its data gone (no persistence, a new instance): it comes
        back empty."""
        os.killpg(self.redis.pid, signal.SIGKILL)
        self.redis.wait(timeout=30)
        shutil.rmtree(self.tmp / f"redis-{REDIS_PORT}", ignore_errors=True)
        self.start_redis()

    def start_worker(
        self, host: Host, queues: str = "dense,sparse,aggregate,prepare", kind: str = "all"
    ) -> subprocess.Popen[bytes]:
        """A worker of ``queues`` on ``host``, known as ``kind`` to the kill methods."""
        proc = host.start(
            worker_command(queues, f"{kind}-{host.name}@%h", "INFO"),
            self.env,
            self.tmp / f"{host.name}-{kind}.log"
            if kind != "all"
            else self.tmp / f"{host.name}.log",
            cwd=REPO,
        )
        self.worker_procs[(host.name, kind)] = (proc, queues)
        self.worker_starts.append((host.name, kind))
        return proc

    def start_workers(self) -> None:
        """A worker on every worker host."""
        for host in self.workers:
            self.start_worker(host)

    def kill_worker(self, host: Host, kind: str, restart_after_s: float | None = None) -> None:
        """kill -9 of a whole worker (main process and pool), as a crashed container;
        with ``restart_after_s``, started again that much later, as a supervisor does."""
        proc, queues = self.worker_procs[(host.name, kind)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if restart_after_s is not None:
            time.sleep(restart_after_s)
            self.start_worker(host, queues, kind)

    def kill_worker_child(self, host: Host, kind: str) -> int | None:
        """kill -9 of a worker's pool process (the one running tasks), as the kernel's
        OOM killer would; the worker's main process sees it. Returns its pid."""
        proc, _ = self.worker_procs[(host.name, kind)]
        children = psutil.Process(proc.pid).children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        return children[0].pid if children else None

    def python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.producer.run([sys.executable, "-c", code], self.env, REPO, timeout)

    def cli(self, *args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
        return self.producer.run(
            [sys.executable, "-m", "producer.cli", *args], self.env, REPO, timeout
        )

    def start_job(self, prefix: str) -> RunningJob:
        """A 300-document job (batches of 4 chunks) from the producer host, in the
        background, writing to ``s3://BUCKET/prefix``."""
        corpus = small_corpus(self.tmp, 300)
        progress = self.tmp / "producer.log"
        producer = self.producer.start(
            [sys.executable, "-m", "producer.cli", "run", str(corpus), "--output",
             # Dense messages of about 3 batches: mid-job is a while, not one message.
             f"s3://{BUCKET}/{prefix}", "--batch-chunks", "4", "--unit-tokens", "1500",
             "--json"],
            self.env, progress, cwd=REPO,
        )  # fmt: skip
        return RunningJob(self, prefix, producer, progress)

    def check_output(self, prefix: str) -> dict[str, object]:
        """What :data:`CHECKER` finds of the job under ``prefix``."""
        done = self.python(CHECKER.replace("PREFIX", prefix).replace("BUCKET", BUCKET))
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))


SENTINEL_ASK = f"""
import time
import redis
SENTINELS = [redis.Redis(host="ADDRESS", port=p, socket_timeout=1) for p in {SENTINEL_PORTS}]
def primary():
    for sentinel in SENTINELS:
        try:
            return int(sentinel.sentinel_get_master_addr_by_name("{SENTINEL_MASTER}")[1])
        except Exception:
            pass
def known(port):
    return all(
        any(int(r["port"]) == port and "s_down" not in str(r["flags"])
            for r in s.sentinel_slaves("{SENTINEL_MASTER}"))
        for s in SENTINELS
    )
def wait(check, timeout=60):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "Sentinels: no failover"
        time.sleep(0.1)
"""

READY = """
import os, time
import boto3, redis
deadline = time.monotonic() + 60
while True:
    try:
        from shared.control.redis_urls import redis_client
        redis_client(os.environ["REDIS_URL"]).ping()
        s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket="BUCKET")
        break
    except Exception:
        assert time.monotonic() < deadline, "services not ready"
        time.sleep(0.2)
"""

CHECKER = """
import hashlib, json, os
import boto3, numpy as np
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="BUCKET", Prefix="PREFIX/")
objects = {o["Key"]: o for page in pages for o in page.get("Contents", [])}
(manifest_key,) = [k for k in objects if k.endswith("/manifest.json")]
manifest = json.loads(s3.get_object(Bucket="BUCKET", Key=manifest_key)["Body"].read())
def read(key):  # artifact keys are relative to the output URL (s3://BUCKET/PREFIX)
    return s3.get_object(Bucket="BUCKET", Key="PREFIX/" + key)["Body"].read()
artifacts = [a["key"] for a in manifest["artifacts"]]
sha = lambda key: hashlib.sha256(read(key)).hexdigest()
changed = [a["key"] for a in manifest["artifacts"] if sha(a["key"]) != a["sha256"]]
written = objects[manifest_key]["LastModified"]
after = [
    [k, str(objects["PREFIX/" + k]["LastModified"])]
    for k in artifacts if objects["PREFIX/" + k]["LastModified"] > written
]
ids, norms = [], []
layout = manifest["chunks"]
for key in layout["parts"]:
    if layout["format"] == "parquet":
        import io, pyarrow.parquet as pq
        table = pq.read_table(io.BytesIO(read(key)))
        ids += table.column("chunk_id").to_pylist()
        for column in layout["dense_columns"]:
            vectors = np.stack(table.column(column).to_numpy(zero_copy_only=False))
            norms += np.linalg.norm(vectors, axis=1).tolist()
        continue
    for line in read(key).splitlines():
        record = json.loads(line)
        ids.append(record["chunk_id"])
        norms += [float(np.linalg.norm(v)) for v in record["dense"].values()]
results = [k for k in artifacts if k.endswith("results.jsonl")]
print(json.dumps({
    "status": manifest["status"], "chunks": manifest["counts"]["chunks"], "ids": len(ids),
    "distinct": len(set(ids)), "norm_min": min(norms), "norm_max": max(norms),
    "checksums_match": not changed, "manifest_last": not after,
    "changed_after_manifest": changed, "written_after_manifest": after,
    "manifest_written": str(written),
    "queries": len(read(results[0]).splitlines()) if results else 0,
    "chunk_ids": sorted(set(ids)),
    "missing_ids": sorted({c for m in manifest["missing"] for c in m["chunk_ids"]}),
    "job_id": manifest["job_id"],
}), flush=True)
# pyarrow's thread pools can abort the interpreter's teardown ("terminate called without
# an active exception", apache/arrow#34314) after everything above has run: the answer is
# printed, so leave without the teardown.
os._exit(0)
"""


def small_corpus(tmp: Path, documents: int) -> Path:
    folder = tmp / "corpus"
    folder.mkdir()
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:documents]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@dataclass
class RunningJob:
    """A job the producer host runs in the background, followed through its JSON lines."""

    fleet: Fleet
    prefix: str
    producer: subprocess.Popen[bytes]
    progress: Path

    def wait_mid_job(self) -> None:
        """Until the dense stage has started and is not half done (bounded: 240 s)."""
        deadline = time.monotonic() + 240
        while not mid_job(self.progress):
            assert self.producer.poll() is None, self.progress.read_text()[-2000:]
            assert time.monotonic() < deadline, "no progress before the fault"
            time.sleep(0.1)

    def finish(self) -> float:
        """The producer exits 0 and the output passes every check; returns when the
        producer exited (``time.monotonic``)."""
        assert self.producer.wait(timeout=300) == 0, self.progress.read_text()[-2000:]
        done_at = time.monotonic()
        assert_complete(self.fleet.check_output(self.prefix))
        return done_at


def mid_job(progress: Path) -> bool:
    """Whether the producer's JSON progress shows the dense stage started, not half done."""
    for line in reversed(progress.read_text().splitlines()):
        if line.startswith('{"event":"progress"'):
            event = json.loads(line)
            dense = next(s for s in event["stages"] if s["stage"] == "dense")
            total = event["total_batches"] or 10**9
            return bool(2 <= dense["batches_done"] <= total // 2)
    return False


def assert_complete(result: dict[str, object]) -> None:
    assert result["status"] == "complete", result
    assert result["ids"] == result["distinct"] == result["chunks"], result  # each chunk once
    assert abs(float(result["norm_min"]) - 1) < 1e-5 > abs(float(result["norm_max"]) - 1)
    # Named, so that a failure says which artifact and when (the manifest's time beside).
    assert result["checksums_match"] is True, result["changed_after_manifest"]
    assert result["manifest_last"] is True, (
        result["written_after_manifest"],
        result["manifest_written"],
    )
