"""Redis behind Sentinel: a primary, a replica and three Sentinels on loopback. A client
that a lagging Sentinel sends to a replica asks again. (The job-level failover runs,
mid-encode and mid-export, are bench/faults.py's sentinel-failover rows; their loopback
e2e test was taken out of the suite for flakiness under load, to be made reliable.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import SentinelRedis

from shared.control.ledger import connect

pytestmark = pytest.mark.e2e

PREFIX = "sentinel"


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    servers = SentinelRedis(tmp_path / "redis")
    servers.start()
    yield servers
    servers.stop()


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


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
