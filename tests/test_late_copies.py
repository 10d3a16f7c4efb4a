"""A late copy of a finished job's work changes nothing.

Redis hands an unacknowledged message to another worker after the visibility timeout,
so the last unit of a phase can run twice (its first worker paused or slow, as a test
holding it with SIGSTOP does). A copy that completed after the job finished used to
hand on to the next phase again: the export re-ran over a deleted work/, failed, and
the complete job was marked failed. Now a complete job's units and steps are skipped,
and a copy that fails after the job ended does not touch its status."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
from conftest import CRANFIELD, run_cli
from servers import Worker

from producer.backlog import waiting_counts
from shared.control.celery_app import EncodeUnits, advance, make_app
from shared.control.ledger import JobLedger
from shared.control.settings import Settings

pytestmark = pytest.mark.e2e


def test_late_copies_of_a_complete_jobs_units_and_steps_change_nothing(
    fleet_env, bucket, redis_server, start_worker, tmp_path: Path
) -> None:
    aggregate = start_worker("aggregate,prepare", fleet_env)
    dense = start_worker("dense", fleet_env)
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:20]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(
        "run", str(tmp_path / "corpus.jsonl"), "--output", f"s3://{bucket}", "--json",
        env=fleet_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")][-1]
    job_id = summary["manifest"]["job_id"]
    client = redis_server.client()
    ledger = JobLedger(client, job_id)
    assert ledger.status() == "complete"
    spec = ledger.spec()
    app = make_app(dataclasses.replace(Settings.from_env(), broker_url=redis_server.url))

    def runs(worker: Worker, task: str, state: str = "succeeded") -> int:
        """How many runs of ``task`` the worker's log shows (Celery's own lines)."""
        text = worker.log_path.read_text()
        return len(re.findall(rf"Task embed_fleet\.{task}\[[^]]+\] {state}", text))

    before = {
        "encode": runs(dense, "dense.embed_batch", "received"),
        "plan_export": runs(aggregate, "aggregate.plan_export", "received"),
        "export_part": runs(aggregate, "aggregate.export_part", "received"),
    }
    # The last dense unit again, and the step that opens the export again.
    (batch,) = ledger.usable_batches()
    with EncodeUnits(app, ledger, spec, "documents") as units:
        units.add(batch, 0)
    advance(app, spec, "encode")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        taken = runs(dense, "dense.embed_batch", "received") > before["encode"] and (
            runs(aggregate, "aggregate.plan_export", "received") > before["plan_export"]
        )
        waiting = waiting_counts(client)
        busy = client.hlen("unacked") or waiting["dense"] or waiting["aggregate"]
        if taken and not busy:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the copies were not taken, or their work never ended")
    time.sleep(3)  # whatever the copies would have sent on has run by now
    assert ledger.status() == "complete", client.hget(ledger.k_state, "error")
    assert runs(aggregate, "aggregate.export_part", "received") == before["export_part"]
