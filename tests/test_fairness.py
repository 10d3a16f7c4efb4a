"""Jobs sharing a fleet take turns: a unit's priority level follows its place in its job
and the job's priority (shared.control.fairness); the broker hands units out in that
order, and real workers serve a small job's units ahead of a long job's queued ones."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
from conftest import CRANFIELD, run_cli, start_cli

from shared.control import fairness
from shared.control.celery_app import make_app, send_units
from shared.control.ledger import JOBS_INDEX, JobLedger
from shared.control.settings import Settings
from shared.records import serializer
from shared.records.schemas import EncodeBatch, JobSpec


def test_a_jobs_units_sink_through_its_band_and_a_new_job_starts_above_them() -> None:
    normal = [fairness.level("normal", n) for n in range(2000)]
    assert normal[:8] == [1, 2, 2, 3, 3, 3, 3, 4]
    assert normal == sorted(normal) and normal[-1] == 9  # never rises, bottoms out
    # A new job's first unit goes ahead of a job that has sent a few already.
    assert fairness.level("normal", 0) < fairness.level("normal", 3)
    # urgent: above every normal job's bulk, whatever its size.
    assert max(fairness.level("urgent", n) for n in range(10**6)) < normal[-1]
    assert fairness.level("urgent", 0) == 0 < fairness.level("normal", 0)
    # batch: behind a normal job's first units, in turn with its bulk (never starved).
    assert fairness.level("batch", 0) > fairness.level("normal", 1)
    assert fairness.level("batch", 10**6) == normal[-1]
    for priority in fairness.PRIORITIES:
        first, last = fairness.BANDS[priority]
        assert fairness.step_level(priority) == first
        assert 0 <= first <= last < fairness.LEVELS


def spec(job_id: str, priority: fairness.Priority = "normal") -> JobSpec:
    return JobSpec(
        job_id=job_id, collection="c", source="", output="", created_at=0.0,
        dense_models=["m"], chunk_tokens=256, chunk_overlap=0, batch_chunks=8,
        max_batch_tokens=None, on_bad_record="fail", priority=priority,
    )  # fmt: skip


def test_the_broker_hands_out_a_small_jobs_units_before_a_long_jobs_queued_ones(
    redis_server, redis_client
) -> None:
    """Units sent through the fleet's own app to a real Redis, read back the way a worker
    takes them (kombu's priority lists, highest first)."""
    app = make_app(dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url))
    jobs = {"long": spec("long"), "small": spec("small"), "rush": spec("rush", "urgent")}

    def send(job: str, first: int, count: int) -> None:
        ledger = JobLedger(redis_client, job)
        numbers = range(first, first + count)
        units = [EncodeBatch(job_id=job, stage="dense", unit=f"{job}-{n}") for n in numbers]
        send_units(app, ledger, jobs[job], units)

    send("long", 0, 20)
    send("small", 0, 3)  # submitted while the long job's units wait
    send("long", 20, 10)  # the long job's next range
    send("rush", 0, 2)
    serializer.register_serializer()
    taken = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("dense", no_ack=True)
        while True:
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                break
            taken.append(msgspec.json.decode(json.dumps(message.payload[0][0])).get("unit"))
        queue.close()
    assert len(taken) == 35
    order = {unit: position for position, unit in enumerate(taken)}
    assert taken[0] == "rush-0"  # urgent, level 0
    # The small job's three units before every long unit past its fourth.
    assert max(order[f"small-{n}"] for n in range(3)) < min(
        order[f"long-{n}"] for n in range(7, 30)
    )
    # Within a job, its own order is kept.
    assert [u for u in taken if u.startswith("long")] == [f"long-{n}" for n in range(30)]


@pytest.mark.e2e
def test_a_small_job_is_not_stuck_behind_a_long_one_on_real_workers(
    fleet_env, bucket, redis_server, start_worker, tmp_path: Path
) -> None:
    """One dense worker; a long job of about eighty dense units, then a 12-document
    job submitted while it encodes. Without turns the small job's units would run after
    every queued unit of the long one; with them, most of the long job runs after it."""
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "long.jsonl").write_text("".join(lines[:240]))
    (tmp_path / "small.jsonl").write_text("".join(lines[400:412]))
    start_worker("dense", fleet_env)
    start_worker("prepare,aggregate", fleet_env)
    common = ["--format", "jsonl", "--batch-chunks", "4", "--unit-tokens", "1", "--json"]
    long_job = start_cli(
        "run", str(tmp_path / "long.jsonl"), "--output", f"s3://{bucket}/long", *common,
        env=fleet_env,
    )  # fmt: skip
    client = redis_server.client()
    deadline = time.monotonic() + 300
    while True:  # until the long job encodes
        assert time.monotonic() < deadline, "the long job never encoded"
        jobs = client.zrange(JOBS_INDEX, 0, -1)
        if jobs and len(JobLedger(client, jobs[-1].decode()).reports("dense")) >= 3:
            break
        time.sleep(0.05)
    long_ledger = JobLedger(client, jobs[-1].decode())
    small = run_cli(
        "run", str(tmp_path / "small.jsonl"), "--output", f"s3://{bucket}/small", *common,
        env=fleet_env, timeout=600,
    )  # fmt: skip
    assert small.returncode == 0, small.stderr
    _, stderr = long_job.communicate(timeout=600)
    assert long_job.returncode == 0, stderr
    small_id = next(json.loads(x)["job_id"] for x in small.stdout.splitlines() if x.startswith("{"))
    small_done = max(r.finished_at for r in JobLedger(client, small_id).reports("dense"))
    long_reports = long_ledger.reports("dense")
    after = sum(r.started_at > small_done for r in long_reports)
    assert len(long_reports) > 50
    assert after >= len(long_reports) // 3, (after, len(long_reports))


@pytest.mark.e2e
def test_an_urgent_job_queued_after_a_normal_one_runs_first_on_a_real_worker(
    fleet_env, bucket, redis_server, start_worker, tmp_path: Path
) -> None:
    """Two jobs of one size, every dense unit of both queued before the dense worker
    starts: a normal one first, then an urgent one. Each urgent unit sits a level above
    the normal unit of the same place in its job, so the urgent job is done before the
    normal one's later units start. (At one priority the normal job's units, sent
    first, would go first at every level.)"""
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "first.jsonl").write_text("".join(lines[:20]))
    (tmp_path / "rush.jsonl").write_text("".join(lines[20:40]))
    start_worker("prepare,aggregate", fleet_env)
    common = ["--format", "jsonl", "--batch-chunks", "4", "--unit-tokens", "1", "--json"]
    client = redis_server.client()

    def queued(source: str, *extra: str) -> tuple[subprocess.Popen[str], JobLedger]:
        """A job started, once its dense units are all queued (its chunk phase done)."""
        before = set(client.zrange(JOBS_INDEX, 0, -1))
        cli = start_cli(
            "run", str(tmp_path / source), "--output", f"s3://{bucket}/{source}", *common,
            *extra, env=fleet_env,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline and cli.poll() is None, f"{source} never queued"
            new = set(client.zrange(JOBS_INDEX, 0, -1)) - before
            if new:
                ledger = JobLedger(client, new.pop().decode())
                if ledger.status() == "running":
                    return cli, ledger
            time.sleep(0.1)

    first, first_ledger = queued("first.jsonl")
    rush, rush_ledger = queued("rush.jsonl", "--priority", "urgent")
    start_worker("dense", fleet_env)
    for cli in (first, rush):
        _, stderr = cli.communicate(timeout=600)
        assert cli.returncode == 0, stderr
    rush_done = max(r.finished_at for r in rush_ledger.reports("dense"))
    first_reports = first_ledger.reports("dense")
    after = sum(r.started_at > rush_done for r in first_reports)
    assert len(first_reports) >= 6
    assert after >= 3, (after, len(first_reports))
