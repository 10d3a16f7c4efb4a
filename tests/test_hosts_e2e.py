"""A fleet spread over hosts: a services host (Redis, SeaweedFS S3), two worker hosts
with hostnames of their own and a producer host, each a network namespace on a private
bridge (root only; CI runs as root). Every run is checked the same way: every input
chunk exactly once, unit-norm vectors, the manifest's checksums equal to the stored
objects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CRANFIELD, REPO, base_env
from hosts import Host, Network, namespaces_available
from servers import S3_KEY, S3_SECRET

from producer.local_fleet import redis_server_binary, worker_command

pytestmark = pytest.mark.e2e

REDIS_PORT, S3_PORT = 6379, 8333
BUCKET = "fleet"


class Fleet:
    """The hosts of one test and how to reach the services from them."""

    def __init__(self, net: Network, tmp: Path) -> None:
        self.tmp = tmp
        self.services = net.add_host("services")
        self.producer = net.add_host("producer")
        self.workers = [net.add_host("worker-a"), net.add_host("worker-b")]
        address = self.services.address
        self.env = base_env(
            REDIS_URL=f"redis://{address}:{REDIS_PORT}/0",
            S3_ENDPOINT_URL=f"http://{address}:{S3_PORT}",
            AWS_ACCESS_KEY_ID=S3_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            EMBED_FLEET_VISIBILITY_TIMEOUT="8",
            EMBED_FLEET_UNACKED_RESTORE_INTERVAL="1",
        )

    def start_redis(self) -> None:
        """Redis with AOF (as a fleet runs it), off loopback on purpose: only the test's
        own namespaces can reach it."""
        host = self.services
        self.redis = host.start(
            [redis_server_binary(), "--bind", host.address, "--port", str(REDIS_PORT),
             "--save", "", "--appendonly", "yes", "--dir", str(self.tmp),
             "--protected-mode", "no"],
            self.env, self.tmp / "redis.log",
        )  # fmt: skip

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

    def start_worker(self, host: Host, queues: str = "dense,sparse,aggregate") -> None:
        host.start(
            worker_command(queues, f"{host.name}@%h", "INFO"),
            self.env,
            self.tmp / f"{host.name}.log",
            cwd=REPO,
        )

    def start_workers(self) -> None:
        """A worker on every worker host."""
        for host in self.workers:
            self.start_worker(host)

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
             f"s3://{BUCKET}/{prefix}", "--batch-chunks", "4", "--json"],
            self.env, progress, cwd=REPO,
        )  # fmt: skip
        return RunningJob(self, prefix, producer, progress)

    def check_output(self, prefix: str) -> dict[str, object]:
        """Every input chunk once, unit-norm vectors, checksums that match."""
        done = self.python(CHECKER.replace("PREFIX", prefix).replace("BUCKET", BUCKET))
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The hosts of one test; removed at the end, also when the test failed."""
    reason = namespaces_available()
    assert reason is None, reason
    net = Network()
    try:
        yield Fleet(net, tmp_path)
    finally:
        net.close()
        # weed leaves its unix sockets in /tmp (shared by every namespace), named by port.
        for sock in Path("/tmp").glob(f"seaweedfs-*-{S3_PORT}.sock"):
            sock.unlink(missing_ok=True)


READY = """
import os, time
import boto3, redis
deadline = time.monotonic() + 60
while True:
    try:
        redis.Redis.from_url(os.environ["REDIS_URL"]).ping()
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
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="BUCKET", Prefix="PREFIX/")["Contents"]]
(manifest_key,) = [k for k in keys if k.endswith("/manifest.json")]
manifest = json.loads(s3.get_object(Bucket="BUCKET", Key=manifest_key)["Body"].read())
def read(key):  # artifact keys are relative to the output URL (s3://BUCKET/PREFIX)
    return s3.get_object(Bucket="BUCKET", Key="PREFIX/" + key)["Body"].read()
checksums_match = all(
    hashlib.sha256(read(a["key"])).hexdigest() == a["sha256"] for a in manifest["artifacts"]
)
chunks_key = [a["key"] for a in manifest["artifacts"] if a["key"].endswith("chunks.jsonl")][0]
ids, norms = [], []
for line in read(chunks_key).splitlines():
    record = json.loads(line)
    ids.append(record["chunk_id"])
    norms += [float(np.linalg.norm(v)) for v in record["dense"].values()]
print(json.dumps({
    "status": manifest["status"], "chunks": manifest["counts"]["chunks"], "ids": len(ids),
    "distinct": len(set(ids)), "norm_min": min(norms), "norm_max": max(norms),
    "checksums_match": checksums_match,
}))
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
    assert result["checksums_match"] is True


def test_a_job_spread_over_two_worker_hosts(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_services()
    fleet.start_workers()
    corpus = small_corpus(tmp_path, 60)
    done = fleet.cli(
        "run", str(corpus), "--output", f"s3://{BUCKET}/spread", "--sparse-models", "bm25",
        "--batch-chunks", "8", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert_complete(fleet.check_output("spread"))
    # Both hosts did encode work, each under its own hostname.
    for host in fleet.workers:
        log = (tmp_path / f"{host.name}.log").read_text()
        assert f"{host.name}@{host.name}" in log
        assert "embed_fleet.dense.embed_batch" in log and "succeeded" in log


def test_a_worker_host_lost_mid_job(fleet: Fleet, tmp_path: Path) -> None:
    """Every process of one worker host dies mid-job; the other host takes its units
    back after the visibility timeout and the job completes with nothing lost."""
    fleet.start_services()
    doomed, survivor = fleet.workers
    fleet.start_worker(doomed)
    job = fleet.start_job("lost")
    job.wait_mid_job()
    doomed.lose()
    lost_at = time.monotonic()
    fleet.start_worker(survivor)
    recovered_s = job.finish() - lost_at
    assert "succeeded" in (tmp_path / f"{survivor.name}.log").read_text()
    print(f"host lost: job finished {recovered_s:.1f} s after the loss")


def test_a_worker_host_partitioned_then_healed(fleet: Fleet) -> None:
    """One worker host loses the network for 30 s mid-job and comes back: the job
    completes with nothing lost or duplicated (the other host carries on meanwhile)."""
    fleet.start_services()
    cut_off = fleet.workers[0]
    fleet.start_workers()
    job = fleet.start_job("partition")
    job.wait_mid_job()
    cut_off.partition()
    time.sleep(30)
    cut_off.heal()
    job.finish()


def test_redis_restarted_mid_job(fleet: Fleet) -> None:
    """Redis shut down with AOF mid-job and back 4 s later: workers and the producer
    ride it out (their calls and publishes retry over EMBED_FLEET_TRANSIENT_WINDOW), and
    the job completes with nothing lost or duplicated."""
    fleet.start_services()
    fleet.start_workers()
    job = fleet.start_job("restart")
    job.wait_mid_job()
    fleet.shutdown_redis()
    time.sleep(4)
    fleet.start_redis()
    job.finish()


def test_s3_down_then_back_mid_job(fleet: Fleet) -> None:
    """S3 stops for 60 s mid-job and comes back with its data: workers and the
    producer retry their S3 calls over EMBED_FLEET_TRANSIENT_WINDOW instead of spending
    the units' retries, and the job completes with nothing lost or duplicated."""
    fleet.start_services()
    fleet.start_workers()
    job = fleet.start_job("s3-outage")
    job.wait_mid_job()
    fleet.stop_s3()
    time.sleep(60)
    fleet.start_s3()
    job.finish()
