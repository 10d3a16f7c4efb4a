"""The job ledger against a real Redis: distinct batch ids, exactly-once phase change."""

from __future__ import annotations

import random
import threading
import time

import msgspec
import pytest

from shared.control.ledger import JobLedger, TryStart
from shared.records.schemas import (
    BatchFailure,
    BatchReport,
    JobRecord,
    JobSpec,
    LatencySummary,
    ModelInfo,
    ProducerReport,
)


def spec(job_id: str = "job-1") -> JobSpec:
    return JobSpec(
        job_id=job_id,
        collection="c",
        source="/x",
        output="/tmp/out",
        created_at=time.time(),
        dense_models=["m"],
        chunk_tokens=256,
        chunk_overlap=0,
        batch_chunks=4,
        max_batch_tokens=None,
        on_bad_record="fail",
    )


def report(batch_id: str, chunks: int = 4) -> BatchReport:
    now = time.time()
    return BatchReport(
        batch_id=batch_id,
        stage="dense",
        chunks=chunks,
        tokens=10,
        started_at=now,
        finished_at=now + 0.1,
        worker="w",
        device="cpu",
        batch_sizes=[chunks],
    )


def producer_report(batches: int) -> ProducerReport:
    return ProducerReport(
        documents=1,
        chunks=4 * batches,
        batches=batches,
        tokens=0,
        empty_documents=[],
        skipped_records=[],
        skipped_count=0,
        started_at=0,
        finished_at=1,
        latency=LatencySummary.from_samples([], 0, 0),
    )


@pytest.fixture
def ledger(redis_client) -> JobLedger:
    led = JobLedger(redis_client, "job-1")
    led.open(spec(), documents_total=1, bytes_total=10)
    for i in range(3):
        led.record_staged(f"b{i}", 4, 1, 10)
    return led


def test_redelivered_batch_counts_once(ledger) -> None:
    assert not ledger.record_done(report("b0"))
    assert not ledger.record_done(report("b0"))  # redelivered: same id, no second count
    assert not ledger.record_done(report("b1"))
    assert not ledger.seal(producer_report(3))  # b2 still missing
    progress = ledger.progress()
    assert progress.stages[0].batches_done == 2 and progress.stages[0].chunks_done == 8
    assert ledger.record_done(report("b2"))  # the last one starts the export ...
    assert not ledger.record_done(report("b0"))  # ... and no other unit does
    assert ledger.status() == "exporting"


def test_workers_finishing_before_the_seal(ledger) -> None:
    for i in range(3):
        assert not ledger.record_done(report(f"b{i}"))  # total unknown until sealed
    assert ledger.seal(producer_report(3))  # the producer's seal fires it


def test_failed_batch_counts_and_a_later_success_replaces_it(ledger) -> None:
    ledger.seal(producer_report(3))
    ledger.record_done(report("b0"))
    ledger.record_failed(BatchFailure(batch_id="b1", stage="dense", reason="boom"))
    assert [f.batch_id for f in ledger.failures("dense")] == ["b1"]
    ledger.record_done(report("b1"))  # the retry came through after all
    assert ledger.failures("dense") == []
    # a failure reported after the success does not resurrect it
    ledger.record_failed(BatchFailure(batch_id="b1", stage="dense", reason="late"))
    assert ledger.failures("dense") == []
    assert ledger.record_done(report("b2"))


def test_concurrent_finishers_fire_the_export_once(redis_client) -> None:
    led = JobLedger(redis_client, "job-2")
    led.open(spec("job-2"), documents_total=1, bytes_total=1)
    n = 40
    for i in range(n):
        led.record_staged(f"b{i:03d}", 1, 1, 1)
    fired: list[str] = []
    barrier = threading.Barrier(n + 1)

    def finish(i: int) -> None:
        mine = JobLedger(redis_client, "job-2")
        barrier.wait()
        for _ in range(2):  # every batch delivered twice
            if mine.record_done(report(f"b{i:03d}", 1)):
                fired.append(f"b{i}")

    def seal() -> None:
        barrier.wait()
        if led.seal(producer_report(n)):
            fired.append("seal")

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(n)]
    threads.append(threading.Thread(target=seal))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(fired)) == 1  # one winner (its own redelivery may fire again)
    assert led.progress().stages[0].batches_done == n


def test_finish_sets_expiry_and_unknown_jobs_explain_themselves(ledger, redis_client) -> None:
    ledger.seal(producer_report(3))
    ledger.finish("complete", ttl=60)
    assert 0 < redis_client.ttl(ledger.k_spec) <= 60
    from shared.records.errors import EmbedFleetError

    with pytest.raises(EmbedFleetError, match="no job 'nope'"):
        JobLedger(redis_client, "nope").spec()


def query_spec() -> JobSpec:
    from shared.records.schemas import RetrievalSpec

    job = spec("job-q")
    job.retrieval = RetrievalSpec(
        queries_source="/q", queries=3, query_batches=1, qrels_source=None, rerank_model="r"
    )
    return job


def unit(stage: str, unit_id: str, kind: str = "documents") -> BatchReport:
    done = report(unit_id, chunks=3)
    done.stage = stage
    done.kind = kind  # type: ignore[assignment]
    return done


def test_query_job_moves_through_every_phase_once(redis_client) -> None:
    led = JobLedger(redis_client, "job-q")
    led.open(query_spec(), documents_total=1, bytes_total=10)
    led.record_staged("b0", 4, 1, 10)
    led.record_staged_queries("q0", 3)
    # encode: a document batch and a query batch; the query batch counts queries
    assert not led.record_done(unit("dense", "q0", "queries"))
    # the producer reports 1 document batch; the ledger adds the query batch to the total
    sealed = producer_report(1)
    sealed.query_batches = 1
    assert not led.seal(sealed)
    assert led.record_done(unit("dense", "b0"))
    assert led.status() == "retrieving"
    assert led.record_done(unit("dense", "b0"))  # the winner redelivered: publishes again
    assert not led.record_done(unit("dense", "q0", "queries"))  # no other unit does
    progress = {s.stage: s for s in led.progress().stages}
    assert (progress["dense"].chunks_done, progress["dense"].queries_done) == (3, 3)
    # retrieve: two tasks, one redelivered, one failed
    assert not led.open_phase("retrieve", 2)
    assert not led.record_done(unit("retrieve", "dense-g00000", "queries"))
    assert not led.record_done(unit("retrieve", "dense-g00000", "queries"))
    assert led.record_failed(BatchFailure(batch_id="sparse-g00000", stage="retrieve", reason="x"))
    assert led.status() == "fusing"
    progress = {s.stage: s for s in led.progress().stages}
    assert (progress["retrieve"].batches_done, progress["retrieve"].total) == (1, 2)
    assert progress["rerank"].total is None
    # rerank: a phase without units is complete at once
    assert led.open_phase("rerank", 0)
    assert led.status() == "exporting"
    assert not led.check_phase("rerank")


def test_reopen_uncounts_lost_units_and_forgets_later_phases(ledger) -> None:
    """What a resume does to the ledger: a failed unit and a done unit whose output was
    lost are outstanding again (the done one uncounted), the phase can complete again,
    and the job's expiry is gone."""
    ledger.seal(producer_report(3))
    ledger.record_done(report("b0"))
    ledger.record_done(report("b1"))
    ledger.record_failed(BatchFailure(batch_id="b2", stage="dense", reason="boom"))
    assert ledger.status() == "exporting"  # every unit accounted for
    ledger.finish("partial", ttl=60)
    ledger.mark_resuming()
    assert ledger.status() == "resuming"
    assert ledger.client.ttl(ledger.k_state) == -1  # no expiry while it runs again
    ledger.reopen("encode", {"dense": ["b1", "b2"]}, later=[])
    assert ledger.status() == "running"
    dense, _export = ledger.progress().stages
    assert (dense.batches_done, dense.chunks_done, ledger.failures("dense")) == (1, 4, [])
    assert not ledger.record_done(report("b1"))
    assert ledger.record_done(report("b2"))  # the phase completes again, once
    assert ledger.status() == "exporting"


def deliver(ledger: JobLedger, unit_id: str, ends: bool, cause: str = "") -> bool:
    """One delivery of a dense unit as a worker makes it (limit 3): counted as it
    starts; then it ends by itself, or its worker dies (and its main process, given a
    ``cause``, says how). False if the ledger refused it (the unit is to be failed)."""
    start = ledger.start_try("dense", unit_id, 3)
    if start.counted and ends:
        ledger.end_try("dense", unit_id)
    elif start.counted and cause:
        ledger.record_death("dense", unit_id, cause)
    return start.counted


def test_a_unit_whose_worker_dies_three_times_in_a_row_is_refused_naming_the_last_cause(
    ledger,
) -> None:
    for cause in ("exit code 1", "signal 11 (SIGSEGV)", "signal 9 (SIGKILL)"):
        assert deliver(ledger, "b0", ends=False, cause=cause)
    assert ledger.deliveries("dense", "b0") == (3, 3)
    refused = ledger.start_try("dense", "b0", 3)
    assert refused == TryStart(deaths=3, last_death="signal 9 (SIGKILL)", counted=False)
    assert ledger.deliveries("dense", "b0") == (3, 3)  # a refused delivery is not counted
    assert ledger.start_try("dense", "b0", 4).counted  # a higher limit lets it run once more
    # Other units, stages and jobs count their own.
    assert ledger.start_try("dense", "b1", 3) == TryStart(0, "", True)
    assert ledger.start_try("sparse", "b0", 3) == TryStart(0, "", True)
    assert JobLedger(ledger.client, "job-2").start_try("dense", "b0", 3).deaths == 0


def test_deliveries_that_end_by_themselves_are_no_deaths(ledger) -> None:
    """Celery's retries (a new message each, the same task id), a redelivery of a
    finished try after a Redis restart, a unit handed back by a stopping worker: each
    delivery ends by itself, so none is a death, however many there are; and a delivery
    that ends by itself forgives the deaths before it (they were not in a row)."""
    for _ in range(10):
        assert deliver(ledger, "b0", ends=True)
    assert ledger.deliveries("dense", "b0") == (10, 0)
    assert deliver(ledger, "b0", ends=False, cause="signal 9 (SIGKILL)")
    assert deliver(ledger, "b0", ends=False, cause="signal 9 (SIGKILL)")
    assert deliver(ledger, "b0", ends=True)  # the third try ran to its end
    assert deliver(ledger, "b0", ends=False)
    assert deliver(ledger, "b0", ends=False)
    assert ledger.deliveries("dense", "b0") == (15, 2)
    # Two in a row, not four. This delivery dies too, and no main process saw it (the
    # whole worker was killed): the cause of an earlier death is not passed off as its.
    assert ledger.start_try("dense", "b0", 3).deaths == 2
    assert ledger.start_try("dense", "b0", 3) == TryStart(3, "", False)


def test_a_resume_and_a_split_count_deliveries_afresh_and_they_expire_with_the_job(
    ledger,
) -> None:
    """A unit failed because its worker kept dying runs again when `resume` sends it
    (``reopen``) or when its batches go again one by one (``forget_tries``); the
    aggregator steps' deliveries start again on any resume."""
    ledger.seal(producer_report(3))
    for unit_id in ("b1", "b2"):
        for _ in range(3):
            assert deliver(ledger, unit_id, ends=False, cause="signal 9 (SIGKILL)")
    assert ledger.start_try("", "plan_export", 3).counted  # a step that died once
    ledger.record_done(report("b0"))
    ledger.record_failed(BatchFailure(batch_id="b1", stage="dense", reason="died"))
    ledger.record_failed(BatchFailure(batch_id="b2", stage="dense", reason="died"))
    ledger.finish("partial", ttl=60)
    keys = [ledger.k_deliveries("dense"), ledger.k_deliveries("")]
    assert all(0 < ledger.client.ttl(key) <= 60 for key in keys)  # gone with the job
    ledger.mark_resuming()
    assert all(ledger.client.ttl(key) == -1 for key in keys)
    ledger.reopen("encode", {"dense": ["b1"]}, later=[])
    assert ledger.start_try("dense", "b1", 3) == TryStart(0, "", True)
    assert ledger.start_try("", "plan_export", 3) == TryStart(0, "", True)
    assert not ledger.start_try("dense", "b2", 3).counted  # not sent again: as it was
    ledger.forget_tries("dense", ["b2", "b3"])
    assert ledger.deliveries("dense", "b2") == (0, 0)
    assert ledger.start_try("dense", "b2", 3).counted


def test_the_watchdog_redrives_a_stalled_job_only_when_the_fleet_is_idle(
    ledger, redis_client, redis_server, monkeypatch
) -> None:
    import dataclasses

    from producer import backlog, watchdog
    from shared.control.celery_app import make_app
    from shared.control.settings import Settings

    monkeypatch.setattr(watchdog, "CHECK_EVERY_S", 0.0)
    app = make_app(dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url))
    said: list[str] = []
    dog = watchdog.Watchdog(ledger, app, stall_s=0.3, say=said.append)
    ledger.seal(producer_report(3))
    dog()  # first look: progress seen now
    redis_client.rpush("dense", b"a message someone will take")  # work is queued
    time.sleep(0.4)
    dog()
    assert said == [] and ledger.status() == "running"
    redis_client.delete("dense")
    redis_client.hset(backlog.UNACKED_KEY, "tag", b"held by a worker")  # work is held
    dog()
    assert said == []
    redis_client.delete(backlog.UNACKED_KEY)
    dog()  # idle, no progress for > 0.3 s: re-driven
    assert len(said) == 1 and "re-driving" in said[0]
    assert ledger.status() == "resuming"
    assert redis_client.llen("aggregate") == 1  # the resume step, for the aggregator


def test_a_batch_staged_again_counts_once(ledger) -> None:
    """A producer that stages again after a resume records each batch once."""
    ledger.record_staged("b1", 4, 2, 20, ["d#0", "d#1", "d#2", "d#3"])
    progress = ledger.progress()
    assert (progress.staged_batches, progress.staged_chunks) == (3, 12)
    assert progress.documents_read == 2 and ledger.staged_chunk_ids("b1")[-1] == "d#3"


def test_rebuild_writes_the_ledger_again_from_the_stores_record(redis_client) -> None:
    """What ``producer.recovery`` does after Redis lost a job: the spec, the staged
    batches with their items, the producer's report and the models come back; stale
    keys left from the old ledger go; units the resume step then finds done count once."""
    led = JobLedger(redis_client, "job-r")
    led.client.hset(led.k_done("dense"), "stale", b"x")  # written after the loss
    record = JobRecord(spec=spec("job-r"), documents_total=3, bytes_total=30)
    info = ModelInfo(name="m", source="/m", revision="", dim=4, dtype="fp32", device="cpu",
                     max_seq_length=256)  # fmt: skip
    led.rebuild(record, producer_report(2), {"b0": 4, "b1": 4}, {}, [info])
    assert led.spec() == record.spec and led.status() == "resuming"
    assert led.staged_items() == {"b0": 4, "b1": 4} and led.producer_report() is not None
    assert led.phase_opened("encode") and led.models() == [info]
    assert led.done_units("dense") == set()  # the stale record went
    progress = led.progress()
    assert (progress.staged_chunks, progress.total_batches, progress.documents_total) == (8, 2, 3)
    found = BatchReport.recovered_unit("dense", "b0", 4, "documents")
    led.record_recovered([found, found])
    assert led.progress().stages[0].chunks_done == 4
    assert led.record_done(report("b1"))  # the last unit completes the phase
    # Recovered units count, but add no figures (no times, no sizes).
    summary = LatencySummary.from_reports(led.reports("dense"))
    assert summary.items == 4 and summary.batch_size_max == 4


def test_the_guard_winner_redelivered_starts_the_next_phase_again(ledger) -> None:
    """The unit that completed the phase died before it published the next step: its
    message comes back, and recording it again says "start the next phase" once more;
    any other unit's record never does."""
    ledger.seal(producer_report(3))
    assert not ledger.record_done(report("b0")) and not ledger.record_done(report("b1"))
    assert ledger.record_done(report("b2"))  # the winner ...
    assert ledger.record_done(report("b2"))  # ... redelivered: it publishes the step
    assert not ledger.record_done(report("b1"))  # a redelivered non-winner does not
    assert not ledger.check_phase("encode")  # nor does a claimant with no name


def test_another_copy_of_the_winning_unit_does_not_start_the_next_phase_again(ledger) -> None:
    """Two copies of one unit can both run: a resume's and the rest of an encode unit
    that a worker sent again after Redis lost its data. The guard goes to the message's
    delivery (its task id), so only a redelivery of the winning message publishes the
    next step again; the other copy, finishing later (even after the job has moved
    on), does not run the next step a second time."""
    ledger.seal(producer_report(3))
    assert not ledger.record_done(report("b0"), claimant="task:t0")
    assert not ledger.record_done(report("b1"), claimant="task:t1")
    assert ledger.record_done(report("b2"), claimant="task:resumed-b2")  # the winner
    assert ledger.record_done(report("b2"), claimant="task:resumed-b2")  # redelivered
    assert not ledger.record_done(report("b2"), claimant="task:rest-b2")  # another copy
    assert not ledger.record_failed(
        BatchFailure(batch_id="b2", stage="dense", reason="x"), claimant="task:rest-b2"
    )


def test_live_figures_are_kept_as_units_finish_and_equal_the_reports(ledger) -> None:
    """The live view reads running sums and samples, not every report: the same figures
    as summing the reports (while they fit the sample), whatever order units arrive in,
    with a unit recorded twice counted once and a recovered unit adding nothing."""
    rng = random.Random(7)
    ledger.open(spec(), documents_total=1, bytes_total=1)
    reports = []
    for i in range(60):
        start = 1_000_000 + rng.uniform(0, 50)
        reports.append(
            BatchReport(
                batch_id=f"b{i:03d}",
                stage="dense",
                chunks=rng.randint(1, 64),
                tokens=rng.randint(10, 5000),
                started_at=start,
                finished_at=start + rng.uniform(0.01, 3),
                worker=f"host:w{i % 3}",
                device=f"cuda:{i % 2}",
                batch_sizes=[rng.randint(1, 32) for _ in range(rng.randint(1, 4))],
                peak_memory_bytes=rng.randint(0, 10**9),
                peak_memory_kind="gpu",
                oom_count=rng.randint(0, 1),
                budgets={"m": rng.randint(512, 8192)},
                items_missed=rng.randint(0, 1),
                items_reused=rng.randint(0, 64),
                model_loads=rng.randint(0, 1),
            )
        )
    for r in reports:
        ledger.record_done(r)
    ledger.record_done(reports[5])  # redelivered: counted once
    ledger.record_recovered([BatchReport.recovered_unit("dense", "b999", 4, "documents")])
    (dense, _export) = ledger.progress(detail=True).stages
    expected = LatencySummary.from_reports(ledger.reports("dense"))
    assert dense.summary is not None
    live = msgspec.to_builtins(dense.summary)
    for field, value in msgspec.to_builtins(expected).items():
        if isinstance(value, float):
            assert live[field] == pytest.approx(value, abs=2e-4), field
        else:
            assert live[field] == value, field
