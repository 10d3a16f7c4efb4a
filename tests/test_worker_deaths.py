"""Units that kill their worker: counted, named, failed after EMBED_FLEET_MAX_DELIVERIES
deaths in a row, while the fleet lives on; `resume` runs them again.

The end-to-end test runs real Celery worker processes (prefork, as deployed), a real
Redis and SeaweedFS and the real model; a unit's worker dies by the test hook
``EMBED_FLEET_SIMULATE_WORKER_DEATH`` (a real SIGKILL of the pool process).
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import Terminated, WorkerLostError
from conftest import CRANFIELD, start_cli
from servers import wait_for
from test_e2e import events
from test_ledger import spec

from producer.backlog import queue_counts
from shared.control.ledger import JobLedger
from shared.control.settings import Settings
from workers.runtime.context import WorkerBoot, attach_boot
from workers.runtime.deaths import lost_cause, note_lost_try, worker_died


def lost(status: str) -> ExceptionWithTraceback:
    """What a worker's main process gets for the task of a pool process that is gone
    (billiard's words), wrapped as billiard hands it on."""
    try:
        raise WorkerLostError(f"Worker exited prematurely: {status} Job: 3.")
    except WorkerLostError as exc:
        return ExceptionWithTraceback(exc, "")


def test_the_cause_of_a_death_is_what_the_main_process_saw() -> None:
    assert lost_cause(lost("signal 9 (SIGKILL)")) == "signal 9 (SIGKILL)"
    assert lost_cause(lost("signal 64")) == "signal 64"  # a signal without a name
    assert lost_cause(lost("exitcode 137")) == "exit code 137"
    assert lost_cause(WorkerLostError("something else")) == "unknown"
    assert lost_cause(SystemExit(3)) == "exit code 3"
    assert lost_cause(Terminated(15)) is None  # the main process stopped it: no death
    assert lost_cause(RuntimeError("boom")) is None  # the task raised: its process lives
    reason = str(worker_died("job-1", 3, ""))
    assert reason.startswith("its worker died 3 times (last: unknown). ")
    assert "embed-collections resume job-1" in reason  # the fix


class Request:
    """The fields of Celery's request that the main process's hook reads."""

    def __init__(self, app: Any, payload: dict[str, Any], stage: str = "dense") -> None:
        self.task = type("Task", (), {"app": app, "stage": stage})()
        self.args = [payload]
        self.worker_pid = 4242


def test_the_main_process_records_a_death_and_a_hand_back_is_none(
    redis_client: Any, redis_server: Any
) -> None:
    """The hook of the worker's main process, against a real Redis: a lost pool process
    is recorded with its cause for the unit's next delivery; one the main process
    terminated itself (a stopping worker hands its unit back) ends the delivery like a
    finished one; a task that raised leaves it to the pool process; and when Redis
    cannot be reached the hook says so and lets Celery requeue."""
    app = SimpleNamespace()  # what the hook reads of a Celery app: the boot on it
    job = spec("job-deaths")
    ledger = JobLedger(redis_client, job.job_id)
    ledger.open(job, documents_total=1, bytes_total=1)
    attach_boot(app, WorkerBoot(settings=Settings(broker_url=redis_server.url)))
    request = Request(app, {"job_id": job.job_id, "stage": "dense", "unit": "b0"})
    assert ledger.start_try("dense", "b0", 3).counted
    note_lost_try(request, lost("signal 9 (SIGKILL)"))
    assert ledger.start_try("dense", "b0", 3).last_death == "signal 9 (SIGKILL)"
    note_lost_try(request, ExceptionWithTraceback(Terminated(15), ""))
    assert ledger.deliveries("dense", "b0") == (2, 0)  # neither try is a death now
    assert ledger.start_try("dense", "b0", 3).counted
    note_lost_try(request, RuntimeError("the task raised"))
    assert ledger.deliveries("dense", "b0") == (3, 1)  # its pool process says when it ends
    step = Request(app, {"job_id": job.job_id, "step": "plan_export"}, stage="")
    assert ledger.start_try("", "plan_export", 3).counted
    note_lost_try(step, lost("exitcode 1"))
    assert ledger.start_try("", "plan_export", 3).last_death == "exit code 1"
    attach_boot(app, WorkerBoot(settings=Settings(broker_url="redis://127.0.0.1:1/0")))
    note_lost_try(request, lost("signal 9 (SIGKILL)"))  # no Redis there: it does not raise


DOOMED = "b000000"  # the first of the doomed job's two units (one batch each)


@pytest.mark.e2e
def test_a_unit_that_kills_its_worker_every_time_fails_alone_and_the_fleet_lives_on(
    fleet_env, bucket, redis_server, start_worker, tmp_path
) -> None:
    """One dense unit SIGKILLs its pool process on every delivery. It is delivered three
    times, each death named by the worker's main process, then recorded as failed and
    acknowledged: its job ends `partial` naming it and why, while another job on the
    same dense worker completes meanwhile. The workers' main processes are alive and
    idle at the end, each with one live pool process, none of the dead ones. (That
    `resume` sends such a unit again, counted from 0: ``test_ledger``, and the resume
    of a failed unit in ``test_e2e``.)"""
    # Nothing here waits for the visibility timeout: a killed pool process's message is
    # requeued at once by its main process (an hour, so a redelivery by timeout fails).
    env = {**fleet_env, "EMBED_FLEET_VISIBILITY_TIMEOUT": "3600"}
    doomed_unit = {"EMBED_FLEET_SIMULATE_WORKER_DEATH": f"doomed/*/dense/{DOOMED}"}
    dense = start_worker("dense", {**env, **doomed_unit})
    aggregate = start_worker("aggregate,prepare", env)
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()
    for name, documents in (("doomed", lines[:6]), ("fine", lines[6:12])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.jsonl").write_text("\n".join(documents) + "\n")
    options = ("--output", f"s3://{bucket}", "--batch-chunks", "4", "--unit-tokens", "0")
    options += ("--prepare-on", "producer", "--json")
    started = time.monotonic()
    doomed = start_cli("run", str(tmp_path / "doomed"), *options, env=env)
    fine = start_cli("run", str(tmp_path / "fine"), *options, env=env)
    fine_out, fine_err = fine.communicate(timeout=300)
    doomed_out, doomed_err = doomed.communicate(timeout=300)
    wall = time.monotonic() - started

    assert fine.returncode == 0, fine_err
    assert events(fine_out, "summary")[-1]["manifest"]["status"] == "complete"
    assert doomed.returncode == 1, doomed_err
    manifest = events(doomed_out, "summary")[-1]["manifest"]
    assert manifest["status"] == "partial"
    (missing,) = manifest["missing"]
    assert (missing["stage"], missing["batch_id"]) == ("dense", DOOMED)
    assert missing["reason"].startswith("its worker died 3 times (last: signal 9 (SIGKILL))")
    assert manifest["counts"]["failed_batches"] == 1 < manifest["counts"]["batches"]

    # Three pool processes died, each by the hook's SIGKILL, each recorded by the main
    # process with its pid and cause; then nothing more died.
    log = dense.log_path.read_text()
    dead = [int(pid) for pid in re.findall(r"pid:(\d+) exited with 'signal 9 \(SIGKILL\)'", log)]
    assert len(dead) == len(set(dead)) == 3, log[-3000:]
    assert log.count("exited with") == 3
    said = [json.loads(line) for line in log.splitlines() if "worker process died" in line]
    assert [(s["unit"], s["cause"]) for s in said] == [(DOOMED, "signal 9 (SIGKILL)")] * 3
    assert sorted(s["pid"] for s in said) == sorted(dead)
    client = redis_server.client()
    assert JobLedger(client, manifest["job_id"]).deliveries("dense", DOOMED) == (3, 3)

    # The fleet lives on: nothing is queued or in hand (the doomed message was
    # acknowledged, so no worker can die on it again; the wait: the CLI sees a job end
    # as its finish step records it, a moment before the step's message is
    # acknowledged), and each worker's main process is up with one live pool process,
    # none of the dead.
    def idle() -> bool:
        waiting, in_hand = queue_counts(client)
        return sum(waiting.values()) + sum(in_hand.values()) == 0

    wait_for(idle, 30, "an idle fleet")
    for worker in (dense, aggregate):
        assert worker.proc.poll() is None
        (child,) = psutil.Process(worker.proc.pid).children()
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        assert child.pid not in dead
    print(json.dumps({"two_jobs_wall_s": round(wall, 1)}))  # pytest -s
