"""Redis behind Sentinel: a primary, replicas and three Sentinels on loopback, real
workers and the producer all given the ``sentinel://`` URL. The primary is killed (-9)
while the job encodes, and the new one while it exports; each time the Sentinels promote
a replica. The job completes with every chunk exactly once, its checksums and the
manifest's place last checked as the fault suite checks them. A client that a lagging
Sentinel sends to a replica asks again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CRANFIELD, REPO, base_env
from host_fleet import CHECKER, assert_complete
from servers import SeaweedS3, SentinelRedis, Worker

from shared.control.ledger import JOBS_INDEX, JobLedger, connect

pytestmark = pytest.mark.e2e

PREFIX = "sentinel"


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    servers = SentinelRedis(tmp_path / "redis")
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
def two_replicas(tmp_path: Path) -> Iterator[SentinelRedis]:
    """Two failovers in a row without waiting for a killed primary to come back (a
    restarted Redis is found by the Sentinels only at their next 10 s look at the
    primary, which under load ran past the test's bounds)."""
    servers = SentinelRedis(tmp_path / "redis", replicas=2)
    servers.start()
    yield servers
    servers.stop()


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_primary_lost_mid_encode_and_mid_export_fails_over_and_the_job_completes(
    two_replicas: SentinelRedis, s3: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    env = base_env(
        REDIS_URL=two_replicas.url,
        EMBED_FLEET_VISIBILITY_TIMEOUT="8",
        EMBED_FLEET_UNACKED_RESTORE_INTERVAL="1",
        EMBED_FLEET_MAX_RETRIES="1",
        # The encode phase must outlast a failover (12 s measured, most of it the
        # Sentinels learning the replicas): one core for the dense worker and 360
        # documents. With 240 on both cores the job ended within the first failover in
        # 3 runs of 4 once a worker's units got faster (its collector no longer walks
        # the libraries' objects).
        EMBED_FLEET_TORCH_THREADS="1",
        **s3.env,
    )
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(lines[:360]))
    workers = [
        Worker("prepare,aggregate", env, tmp_path / "worker-prepare.log"),
        Worker("dense", env, tmp_path / "worker-dense.log"),
    ]
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "run", str(source), "--output",
         f"s3://{bucket}/{PREFIX}", "--batch-chunks", "16", "--part-rows", "32", "--json"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = connect(two_replicas.url, 60)
        wait_until(lambda: client.zrange(JOBS_INDEX, 0, -1), 120, "no job")
        ledger = JobLedger(client, client.zrange(JOBS_INDEX, 0, -1)[-1].decode())

        def encoding() -> bool:
            return ledger.phase_opened("encode") and len(ledger.reports("dense")) >= 2

        wait_until(encoding, 300, "the job never encoded")
        two_replicas.fail_over()
        assert producer.poll() is None  # the producer follows the new primary

        def exporting() -> bool:
            return ledger.phase_opened("export") and len(ledger.reports("export")) >= 1

        wait_until(lambda: exporting() or producer.poll() is not None, 300, "no export")
        assert producer.poll() is None, "the job ended before its export could be hit"
        two_replicas.fail_over(rejoin=False)
        stdout, stderr = producer.communicate(timeout=300)
    finally:
        if producer.poll() is None:
            producer.kill()
        for worker in workers:
            worker.stop()
    assert producer.returncode == 0, stderr[-3000:]
    summary = [json.loads(x) for x in stdout.splitlines() if x.startswith('{"event":"summary"')]
    assert summary[-1]["manifest"]["counts"]["documents"] == 360
    checked = subprocess.run(
        [sys.executable, "-c", CHECKER.replace("PREFIX", PREFIX).replace("BUCKET", bucket)],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    assert_complete(result)
    assert result["chunks"] == summary[-1]["manifest"]["counts"]["chunks"]


def test_a_client_that_reaches_a_replica_asks_again(sentinel_redis: SentinelRedis) -> None:
    """What a Sentinel that has not yet heard of a failover would hand out: a connection
    to the replica is refused as a connection error (which the client's retry answers by
    asking the Sentinels again); to the primary it is set up as usual."""
    import redis

    from shared.control.redis_urls import primary_only

    primary = redis.Redis(port=sentinel_redis.primary.port, redis_connect_func=primary_only)
    assert primary.ping()
    replica = redis.Redis(port=sentinel_redis.replica.port, redis_connect_func=primary_only)
    with pytest.raises(redis.ConnectionError, match="is a slave, not the primary"):
        replica.ping()
    client = connect(sentinel_redis.url, 5)
    assert client.set("k", "v") and client.get("k") == b"v"


def test_a_command_under_way_when_the_primary_dies_follows_the_failover(
    sentinel_redis: SentinelRedis,
) -> None:
    """A blocking read under way when the primary is killed: the client's retry asks the
    Sentinels again and reads from the new primary. (redis-py alone reconnects such a
    command to the dead address until its retries run out: 120 s here.)"""
    import redis

    client = connect(sentinel_redis.url, 120)
    got: list[object] = []
    reader = threading.Thread(
        target=lambda: got.append(client.blpop(["q"], timeout=8)), daemon=True
    )
    reader.start()
    primary = redis.Redis(port=sentinel_redis.primary.port)
    wait_until(lambda: primary.info("clients")["blocked_clients"] >= 1, 10, "no blocked read")
    new = sentinel_redis.fail_over(rejoin=False)
    redis.Redis(port=new.port).rpush("q", "after")
    reader.join(timeout=30)
    assert got == [(b"q", b"after")]
