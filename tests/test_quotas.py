"""A job's quota of units in flight (``run --max-in-flight``) against a real Redis: what
is admitted, what is parked and in which order it comes back, what an autoscaler counts,
and what an ended job leaves behind."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import msgspec
import pytest
from conftest import CRANFIELD, run_cli
from test_ledger import spec

from producer.backlog import read_backlog
from shared.control.ledger import PARKED_INDEX, JobLedger
from shared.control.quotas import PARKED_FIELD, JobQuota, ParkedUnit, parked_counts
from shared.records import serializer
from shared.records.schemas import EncodeBatch

DENSE_TASK = "embed_fleet.dense.embed_batch"


def parked(unit: str, level: int = 4) -> ParkedUnit:
    message = EncodeBatch(job_id="q", stage="dense", unit=unit, kind="documents")
    return ParkedUnit(task=DENSE_TASK, level=level, message=serializer.dumps(message))


def quota(client: object, limit: int, job: str = "q") -> JobQuota:
    return JobQuota(client, f"embed-fleet:job:{job}", PARKED_INDEX, limit)  # type: ignore[arg-type]


def test_a_quota_runs_n_units_of_a_stage_and_hands_back_the_rest_in_order(redis_client) -> None:
    q = quota(redis_client, 2)
    assert [q.admit("dense", u, parked(u, level=3 + i), 3600) for i, u in enumerate("abcd")] == [
        True,
        True,
        False,
        False,
    ]
    assert (q.running("dense"), q.parked("dense")) == (2, 2)
    # A redelivered unit (its worker died) is already one of the two: it runs.
    assert q.admit("dense", "a", parked("a"), 3600)
    # Another stage has a quota of its own.
    assert q.admit("sparse", "a", parked("a"), 3600)
    assert redis_client.hget("embed-fleet:job:q:state", PARKED_FIELD) == b"2"

    backlog = read_backlog(redis_client).queues["dense"]
    assert (backlog.waiting, backlog.parked, backlog.backlog) == (0, 2, 2)

    following = q.release("dense", "a")
    assert following is not None and following.level == 5
    message = msgspec.convert(serializer.loads(following.message), EncodeBatch)
    assert (message.unit, following.task) == ("c", DENSE_TASK)
    assert q.admit("dense", "c", following, 3600)  # a's place
    assert q.release("dense", "b").level == 6  # type: ignore[union-attr]
    assert q.release("dense", "c") is None
    assert (q.running("dense"), q.parked("dense")) == (0, 0)
    # A drained list is forgotten by the index the backlog reads.
    assert parked_counts(redis_client, PARKED_INDEX) == {}
    assert not redis_client.hlen(PARKED_INDEX)


def test_a_running_unit_whose_worker_died_stops_counting_after_the_visibility_timeout(
    redis_client,
) -> None:
    q = quota(redis_client, 1)
    assert q.admit("dense", "died", parked("died"), 3600)
    assert not q.admit("dense", "b", parked("b"), 3600)
    time.sleep(0.01)
    # Its entry is older than a visibility timeout of 0 s: the broker would hand the
    # unit out again by now, so its place is free.
    assert q.admit("dense", "c", parked("c"), 0)
    assert q.running("dense") == 1


def test_an_ended_jobs_parked_units_are_dropped_and_no_longer_counted(redis_client) -> None:
    job = msgspec.structs.replace(spec("capped"), max_in_flight=1)
    ledger = JobLedger(redis_client, "capped", job)
    ledger.open(job, documents_total=1, bytes_total=1)
    q = ledger.quota()
    assert q.limit == 1
    assert q.admit("dense", "a", parked("a"), 3600)
    assert not q.admit("dense", "b", parked("b"), 3600)
    other = quota(redis_client, 1, job="other")
    other.admit("dense", "x", parked("x"), 3600)
    other.admit("dense", "y", parked("y"), 3600)
    assert parked_counts(redis_client, PARKED_INDEX) == {"dense": 2}

    ledger.fail("cancelled", ttl=60)
    assert (q.running("dense"), q.parked("dense")) == (0, 0)
    assert parked_counts(redis_client, PARKED_INDEX) == {"dense": 1}  # the other job's


@pytest.mark.e2e
def test_a_job_capped_at_one_unit_runs_one_at_a_time_on_two_workers(
    fleet_env, bucket, redis_server, start_worker, tmp_path: Path
) -> None:
    """Two dense workers, a job run with ``--max-in-flight 1``: its dense units never
    overlap, the second worker's takes were parked and handed back (none lost: the job
    completes with every document), and nothing is left parked."""
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "docs.jsonl").write_text("".join(lines[:40]))
    dense = [start_worker("dense", fleet_env) for _ in range(2)]
    start_worker("prepare,aggregate", fleet_env)
    for worker in dense:
        worker.wait_ready()
    done = run_cli(
        "run", str(tmp_path / "docs.jsonl"), "--output", f"s3://{bucket}/capped",
        "--batch-chunks", "4", "--unit-tokens", "1", "--max-in-flight", "1", "--json",
        env=fleet_env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert events[-1]["manifest"]["counts"]["documents"] == 40
    client = redis_server.client()
    ledger = JobLedger(client, events[0]["job_id"])
    reports = sorted(ledger.reports("dense"), key=lambda r: r.started_at)
    assert len(reports) >= 8
    overlaps = [
        (a.batch_id, b.batch_id)
        for a, b in itertools.pairwise(reports)
        if b.started_at < a.finished_at
    ]
    assert not overlaps
    assert int(client.hget(ledger.k_state, PARKED_FIELD) or 0) > 0, "the cap never held a unit"
    assert len({r.worker for r in reports}) == 2  # both workers ran the job's units
    assert ledger.quota().parked("dense") == 0
    assert read_backlog(client).queues["dense"].backlog == 0
