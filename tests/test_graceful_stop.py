"""Scaling down: a dense worker told to stop (SIGTERM, what an autoscaler sends) in the
middle of a unit either finishes it or hands it back to the queue, in seconds, and the
job completes with every chunk once, without waiting on the visibility timeout.

Real worker processes, the real model, a real Redis and SeaweedFS; the visibility
timeout is an hour, as in production, so a unit left unacknowledged would stall the
job far past this test's deadline.
"""

from __future__ import annotations

import json
import os
import signal
import time

import msgspec
import pytest
from artifacts import chunk_records, in_reading_order
from conftest import CRANFIELD, start_cli
from test_e2e import events, s3_getter

from producer.backlog import queue_counts, waiting_counts
from shared.control.leases import list_leases
from shared.control.ledger import JOBS_INDEX, JobLedger
from shared.records.schemas import ChunkBatch

pytestmark = pytest.mark.e2e

VISIBILITY_TIMEOUT_S = 3600
UNIT_CHUNKS = 64  # seconds of MiniLM per unit on two cores: a SIGTERM lands mid-unit
DOCUMENTS = 600


def dense_in_hand(client) -> int:
    return queue_counts(client)[1]["dense"]


def stop_mid_unit(worker, ledger: JobLedger, client, reports_before: int) -> dict[str, float]:
    """Wait for the worker to report a unit past ``reports_before`` (it is then into the
    next one), SIGTERM it, and time its exit."""
    deadline = time.monotonic() + 300
    while len(ledger.reports("dense")) <= reports_before and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    reports_at_term = len(ledger.reports("dense"))
    in_hand = dense_in_hand(client)
    sent = time.monotonic()
    os.kill(worker.proc.pid, signal.SIGTERM)  # the worker's main process, as `docker stop`
    worker.proc.wait(timeout=120)
    return {
        "exit_s": round(time.monotonic() - sent, 2),
        "reports_at_term": reports_at_term,
        "reports_at_exit": len(ledger.reports("dense")),
        "in_hand_at_term": in_hand,
        "in_hand_at_exit": dense_in_hand(client),
        "queued_at_exit": waiting_counts(client)["dense"],
    }


def test_sigterm_mid_unit_finishes_or_hands_back_and_the_job_completes(
    fleet_env, bucket, s3, redis_server, start_worker, tmp_path
) -> None:
    env = {**fleet_env, "EMBED_FLEET_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S)}
    start_worker("aggregate,prepare", env)
    # A stand-in GPU, run on the CPU: the lease must be given back on the hand-back path.
    stand_in = {"EMBED_FLEET_GPUS": "GPU-stand-in", "EMBED_FLEET_DEVICE": "cpu"}
    hands_back = start_worker("dense", {**env, "EMBED_FLEET_STOP_TIMEOUT": "0", **stand_in})
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:DOCUMENTS]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    cli = start_cli(
        *("run", str(tmp_path / "corpus.jsonl"), "--output", f"s3://{bucket}"),
        # One batch a message: the queue's length and the reports count the same units.
        *("--batch-chunks", str(UNIT_CHUNKS), "--unit-tokens", "0", "--keep-work", "--json"),
        env=env,
    )
    client = redis_server.client()
    deadline = time.monotonic() + 300
    while not client.zrange(JOBS_INDEX, 0, -1) and time.monotonic() < deadline:
        time.sleep(0.1)
    ledger = JobLedger(client, client.zrange(JOBS_INDEX, 0, -1)[-1].decode())

    # Every unit staged before the first stop, so the queue's length accounts for all.
    deadline = time.monotonic() + 300
    while ledger.progress().total_batches is None and time.monotonic() < deadline:
        time.sleep(0.1)
    units = ledger.progress().total_batches
    assert units is not None, "the job was never sealed"
    assert [lease.uuid for lease in list_leases(client)] == ["GPU-stand-in"]

    # 1. EMBED_FLEET_STOP_TIMEOUT=0: the unit in hand goes back to the queue at once.
    first = stop_mid_unit(hands_back, ledger, client, reports_before=1)
    log = hands_back.log_path.read_text()
    assert first["in_hand_at_term"] == 1, first  # it held a unit when told to stop
    assert "handing the unit in hand back to its queue" in log
    assert "Restoring 1 unacknowledged message(s)" in log
    assert first["reports_at_exit"] == first["reports_at_term"], first  # not finished...
    assert first["in_hand_at_exit"] == 0, first
    assert first["reports_at_exit"] + first["queued_at_exit"] == units, first  # ...but back
    assert first["exit_s"] < 15, first
    assert list_leases(client) == []  # its stand-in GPU given back on the way out
    # The unit handed back is no death of its worker's: the main process that terminated
    # its pool process said so (workers.runtime.deaths), before any worker took it again.
    deliveries = [ledger.deliveries("dense", batch) for batch in ledger.staged_batches()]
    assert sum(tries for tries, _ in deliveries) == first["reports_at_exit"] + 1
    assert [deaths for _, deaths in deliveries if deaths] == []

    # 2. The default (30 s): the unit in hand is finished, acknowledged, and nothing is
    #    handed back.
    finishes = start_worker("dense", env)
    second = stop_mid_unit(finishes, ledger, client, reports_before=first["reports_at_exit"] + 1)
    log = finishes.log_path.read_text()
    assert second["in_hand_at_term"] == 1, second
    assert second["reports_at_exit"] == second["reports_at_term"] + 1, second  # finished
    assert second["in_hand_at_exit"] == 0, second  # and acknowledged
    assert second["reports_at_exit"] + second["queued_at_exit"] == units, second
    assert "Restoring" not in log and "handing the unit in hand back" not in log
    assert second["exit_s"] < 30 + 10, second  # within the stop timeout, plus the exit

    # 3. A third worker takes the rest, the handed-back unit first.
    start_worker("dense", env)
    stdout, stderr = cli.communicate(timeout=900)
    wall = time.monotonic() - started
    assert cli.returncode == 0, stderr
    manifest = events(stdout, "summary")[-1]["manifest"]
    assert manifest["status"] == "complete"
    s3c = s3.client()
    exported = [r["chunk_id"] for r in chunk_records(manifest, s3_getter(s3c, bucket))]
    staged: list[str] = []
    for batch_id in ledger.staged_batches():
        key = f"corpus/{manifest['job_id']}/work/batches/{batch_id}.msgpack"
        raw = s3c.get_object(Bucket=bucket, Key=key)["Body"].read()
        staged += [c.chunk_id for c in msgspec.msgpack.decode(raw, type=ChunkBatch).chunks]
    assert len(exported) == len(set(exported)) == len(staged)  # nothing lost or doubled
    assert exported == in_reading_order(staged, lines)
    assert manifest["stages"]["dense"]["batches"] == units == len(ledger.staged_batches())
    # No unit waited for the visibility timeout: the handed-back one was on the queue at
    # once (the counts above), and the whole job took a fraction of that timeout.
    assert wall < VISIBILITY_TIMEOUT_S / 4
    measured = {"hand_back": first, "finish": second, "job_wall_s": round(wall, 1)}
    measured["units"] = units
    print(json.dumps(measured))  # what the closing note quotes (pytest -s)
