"""The backlog an autoscaler reads: ``embed-collections queues`` and its exporter."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from conftest import CRANFIELD, REPO, run_cli, start_cli
from prometheus_client.parser import text_string_to_metric_families

from producer.backlog import PRIORITY_SEPARATOR, UNACKED_KEY, prometheus_text, read_backlog


def unacked_entry(queue: str) -> str:
    """An ``unacked`` value as kombu's Redis transport writes it."""
    return json.dumps([{"body": "not read"}, queue, queue])


def test_backlog_counts_waiting_and_taken_messages_per_queue(redis_client) -> None:
    redis_client.rpush("dense", b"m1", b"m2")
    redis_client.rpush(f"dense{PRIORITY_SEPARATOR}3", b"m3")  # a priority list
    redis_client.rpush("sparse", b"m4")
    redis_client.hset(UNACKED_KEY, "tag-1", unacked_entry("dense"))
    redis_client.hset(UNACKED_KEY, "tag-2", unacked_entry("rerank"))
    redis_client.hset(UNACKED_KEY, "tag-3", b"not json")  # ignored, not fatal
    backlog = read_backlog(redis_client)
    dense, rerank, sparse = (backlog.queues[q] for q in ("dense", "rerank", "sparse"))
    assert (dense.waiting, dense.unacked, dense.backlog) == (3, 1, 4)
    assert (rerank.waiting, rerank.unacked, rerank.backlog) == (0, 1, 1)
    assert (sparse.waiting, sparse.unacked) == (1, 0)
    assert backlog.queues["prepare"].backlog == backlog.queues["aggregate"].backlog == 0
    assert backlog.workers_answered is None  # not asked
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(backlog))}
    samples = {(f.name, s.labels["queue"]): s.value for f in families.values() for s in f.samples}
    assert samples[("embed_fleet_queue_backlog", "dense")] == 4
    assert samples[("embed_fleet_queue_unacked", "rerank")] == 1
    assert samples[("embed_fleet_queue_waiting", "aggregate")] == 0
    assert {f.type for f in families.values()} == {"gauge"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        return str(response.read().decode())


@pytest.mark.e2e
def test_a_busy_workers_unit_is_backlog_while_llen_is_zero(
    fleet_env, bucket, redis_server, start_worker, tmp_path
) -> None:
    """A dense worker busy with the job's only unit (its first, so the model loads for
    seconds): the queue's list is empty, yet `queues` counts the unit, names the
    worker, and the exporter serves the same numbers."""
    start_worker("aggregate,prepare", fleet_env)
    dense = start_worker("dense", fleet_env)
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "queues", "--serve", f"127.0.0.1:{port}"],
        env=fleet_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:20]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    job = start_cli(
        "run", str(tmp_path / "corpus.jsonl"), "--output", f"s3://{bucket}", "--json", env=fleet_env
    )
    paused: list[psutil.Process] = []
    try:
        client = redis_server.client()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = read_backlog(client).queues["dense"]
            if counts.unacked == 1 and counts.waiting == 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the dense worker never took the unit")
        # Hold the unit where it is (its pool process paused) while the CLI reads.
        (pool,) = psutil.Process(dense.proc.pid).children()
        pool.suspend()
        paused.append(pool)
        shown = run_cli("queues", "--json", env=fleet_env)
        metrics = get(f"http://127.0.0.1:{port}/metrics")
        served = json.loads(get(f"http://127.0.0.1:{port}/queues"))
        llen = client.llen("dense")
        table = run_cli("queues", env={**fleet_env, "COLUMNS": "200"})
    finally:
        for process in paused:
            with contextlib.suppress(psutil.Error):
                process.resume()
        exporter.terminate()
        exporter.wait(timeout=30)
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)["queues"]["dense"]
    assert llen == 0 and row["waiting"] == 0
    assert row["unacked"] == 1 and row["backlog"] == 1
    assert [w.split("@")[0] for w in row["workers"]] == [dense.name]
    assert json.loads(shown.stdout)["workers_answered"] == 2
    assert 'embed_fleet_queue_backlog{queue="dense"} 1' in metrics
    assert 'embed_fleet_queue_waiting{queue="dense"} 0' in metrics
    assert 'embed_fleet_queue_workers{queue="dense"} 1' in metrics
    assert served["queues"]["dense"]["backlog"] == 1
    assert "dense" in table.stdout and dense.name in table.stdout
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    # The last step acknowledges just after the manifest the CLI waited for is written.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {n: q.backlog for n, q in read_backlog(client).queues.items() if q.backlog}
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"backlog left once the job was done: {left}"


def test_a_follower_names_an_unconsumed_queue_once_it_has_waited_not_at_its_next_ask(
    redis_server, redis_client
) -> None:
    """A real Redis and no worker at all; a message comes on `prepare` after the follow
    loop's watch has looked once and found nothing: the watch names the queue about
    ``wait_s`` after the message came (it looks every second), not ``wait_s`` after its
    next ask of the workers (every 5 s)."""
    import dataclasses

    from producer.consumers import ASK_EVERY_S, LOOK_EVERY_S, QueueWatch
    from shared.control.celery_app import make_app
    from shared.control.settings import Settings

    app = make_app(dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url))
    said: list[float] = []
    wait_s = 2.0
    say = lambda _: said.append(time.monotonic())  # noqa: E731
    watch = QueueWatch(redis_client, app, "job-1", ["prepare"], wait_s, say)
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # a look or two, with nothing waiting
        watch()
        time.sleep(0.05)
    redis_client.rpush("prepare", b"a unit nobody takes")
    pushed = time.monotonic()
    while not said and time.monotonic() - pushed < 3 * ASK_EVERY_S:
        watch()
        time.sleep(0.05)
    assert said, "never named"
    # Seen within a look (1 s), asked (the workers' answer: up to 1 s), named wait_s
    # later on a fresh answer (up to 1 s more).
    assert said[0] - pushed < LOOK_EVERY_S + wait_s + 2.0 < ASK_EVERY_S + wait_s
    assert len(said) == 1
