"""``embed-collections jobs``: the jobs sharing a fleet, each with its priority, its share
of the units the workers hold, its progress and ETA; read from a real Redis, with
units sent and taken (not acknowledged) through kombu as workers take them."""

from __future__ import annotations

import dataclasses
import json
import time

import msgspec
from conftest import base_env, run_cli
from test_fairness import spec
from test_ledger import report

from producer.backlog import share_of
from producer.fleet_jobs import running_jobs
from producer.follow import progress_rows
from shared.control.celery_app import make_app, send_units
from shared.control.ledger import JobLedger
from shared.control.settings import Settings
from shared.records.schemas import EncodeBatch


def test_running_jobs_have_their_share_of_the_units_the_workers_hold(
    redis_server, redis_client
) -> None:
    app = make_app(dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url))
    now = time.time()
    jobs = {
        "backfill": msgspec.structs.replace(spec("backfill", "batch"), created_at=now - 600),
        "rush": msgspec.structs.replace(spec("rush", "urgent"), created_at=now - 30),
        "over": msgspec.structs.replace(spec("over"), created_at=now - 60),
    }
    for job_id, job in jobs.items():
        ledger = JobLedger(redis_client, job_id)
        ledger.open(job, 100, 1000)
        units = [EncodeBatch(job_id=job_id, stage="dense", unit=f"{job_id}-{n}") for n in range(6)]
        send_units(app, ledger, job, units)
    JobLedger(redis_client, "over").finish("complete", ttl=600)
    backfill = JobLedger(redis_client, "backfill")
    backfill.record_staged("b0", 40, 10, 100, [f"c{i}" for i in range(40)])
    backfill.record_done(report("b0", 40))
    with app.connection_for_read() as connection:  # three units taken, none acknowledged
        queue = connection.SimpleQueue("dense")
        taken = [queue.get(timeout=2) for _ in range(3)]
        held = [json.dumps(m.payload[0][0]) for m in taken]
        found = {job.job_id: job for job in running_jobs(redis_client, now)}
        assert set(found) == {"backfill", "rush"}  # a finished job is not listed
        rush, batch = found["rush"], found["backfill"]
        # The urgent job's units were taken first (levels 0, 1, 1), so all three are its.
        assert all('"rush"' in message for message in held), held
        assert (rush.in_flight, rush.share, rush.priority) == (3, 1.0, "urgent")
        assert (batch.in_flight, batch.share, batch.priority) == (0, 0.0, "batch")
        assert (batch.phase, batch.done) == ("dense", 40)
        assert batch.age_s >= 600 and rush.age_s < 60
        assert batch.total is None and batch.eta_s is None  # not known before the seal
        # The live view of each job says its part too.
        assert share_of(redis_client, "rush") == 1.0 and share_of(redis_client, "backfill") == 0
        snap = JobLedger(redis_client, "rush").progress()
        snap.fleet_share = share_of(redis_client, "rush")
        read = progress_rows(snap)[0].figures
        assert "100% of the fleet's units in hand" in read
        listed = run_cli("jobs", "--json", env=base_env(REDIS_URL=redis_server.url))
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["job_id"]: r["share"] for r in rows} == {"backfill": 0.0, "rush": 1.0}
        table = run_cli("jobs", env=base_env(REDIS_URL=redis_server.url, COLUMNS="200"))
        assert "rush" in table.stderr + table.stdout and "urgent" in table.stderr + table.stdout
        for message in taken:
            message.ack()
        queue.close()
