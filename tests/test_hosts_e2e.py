"""A fleet spread over hosts: a services host (Redis, SeaweedFS S3), two worker hosts
with hostnames of their own and a producer host, each a network namespace on a private
bridge (root only; CI runs as root). Every run is checked the same way: every input
chunk exactly once, unit-norm vectors, the manifest's checksums equal to the stored
objects (see ``host_fleet``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from host_fleet import BUCKET, S3_PORT, Fleet, assert_complete, small_corpus
from hosts import Network, namespaces_available

pytestmark = pytest.mark.e2e


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
    """S3 stops for 30 s mid-job (ten times what boto3's own three tries ride out) and
    comes back with its data: workers and the producer retry their S3 calls over
    EMBED_FLEET_TRANSIENT_WINDOW instead of spending the units' retries, and the job
    completes with nothing lost or duplicated."""
    fleet.start_services()
    fleet.start_workers()
    job = fleet.start_job("s3-outage")
    job.wait_mid_job()
    fleet.stop_s3()
    time.sleep(30)
    fleet.start_s3()
    job.finish()


def test_redis_lost_mid_job_then_resume(fleet: Fleet) -> None:
    """Redis dies mid-job and comes back empty (its AOF gone): the ledger and every
    queued message are lost, and the producer stops, saying how to go on. `resume
    --output` from the producer host rebuilds the ledger from the store and the job
    completes with nothing lost or duplicated."""
    fleet.start_services()
    fleet.start_workers()
    job = fleet.start_job("lost-redis")
    job.wait_mid_job()
    fleet.lose_redis()
    assert job.producer.wait(timeout=120) == 2
    said = job.progress.read_text()
    assert "rebuilds the job" in " ".join(said.split()), said[-1000:]
    job_id = next(json.loads(line) for line in said.splitlines() if line.startswith("{"))["job_id"]
    resumed = fleet.cli("resume", job_id, "--output", f"s3://{BUCKET}/lost-redis", "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_complete(fleet.check_output("lost-redis"))
