"""GPU stages take several staged batches a message: how they are gathered, how the
ledger still counts each batch, and how a unit that keeps failing is split so that one
bad batch fails alone (a real Redis; messages read back from its queues)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any, TypeVar

import msgspec
import pytest
from test_ledger import report, spec

from producer.backlog import PRIORITY_SEPARATOR
from shared.control import fairness
from shared.control.celery_app import EncodeUnits, fan_out, gathered_again, make_app
from shared.control.ledger import JobLedger
from shared.control.pipeline import RERANK_UNIT_GROUPS, UNIT_MAX_BATCHES
from shared.control.settings import Settings
from shared.records.schemas import (
    EncodeBatch,
    LatencySummary,
    ProducerReport,
    RerankGroup,
    RetrieveGroup,
    UnitMessage,
)
from workers.runtime.measure import UnitOutcome, UnitPart
from workers.runtime.middleware import _part_reports

Message = TypeVar("Message", bound=UnitMessage)


def queued(client: Any, queue: str, kind: type[Message] = EncodeBatch) -> list[Message]:  # type: ignore[assignment]
    """The messages waiting in a queue, in the order a worker takes them (its priority
    lists, highest first; each oldest first), decoded as a worker would."""
    out = []
    for level in range(fairness.LEVELS):
        key = f"{queue}{PRIORITY_SEPARATOR}{level}" if level else queue
        for raw in reversed(client.lrange(key, 0, -1)):
            body = base64.b64decode(json.loads(raw)["body"])
            args, _, _ = msgspec.msgpack.decode(body)
            out.append(msgspec.convert(args[0], kind))
    return out


@pytest.fixture
def app(redis_server: Any) -> Any:
    return make_app(dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url))


def test_gpu_messages_gather_batches_by_tokens_cpu_ones_take_one(
    app: Any, redis_client: Any
) -> None:
    job = msgspec.structs.replace(
        spec("units"), stages=["dense", "sparse"], sparse_models=["bm25"], unit_tokens=1000
    )
    with EncodeUnits(app, JobLedger(redis_client, job.job_id), job, "documents") as units:
        for i in range(10):
            units.add(f"b{i:02d}", 300)
    dense = queued(redis_client, "dense")
    # The first batch alone, then twice as many (2); then 300 tokens a batch fill the
    # unit at 4 (1,200 >= 1,000), though 4 would be allowed twice over; the last: the rest.
    assert [m.batches for m in dense] == [
        ["b00"],
        ["b01", "b02"],
        ["b03", "b04", "b05", "b06"],
        ["b07", "b08", "b09"],
    ]
    assert [m.unit for m in dense] == ["b00", "b01", "b03", "b07"]
    sparse = queued(redis_client, "sparse")  # SPLADE on the CPU: one batch a message
    assert [m.batches for m in sparse] == [[f"b{i:02d}"] for i in range(10)]
    assert all(m.batch_ids == [] for m in sparse)  # a one-batch message is as before


def test_messages_hold_a_bounded_number_of_batches(app: Any, redis_client: Any) -> None:
    job = msgspec.structs.replace(spec("queries"), unit_tokens=10**9)
    sizes = [2**k for k in range(7)]  # 1, 2, ..., 64: the first messages double
    assert sizes[-1] == UNIT_MAX_BATCHES
    with EncodeUnits(app, JobLedger(redis_client, job.job_id), job, "queries") as units:
        for i in range(sum(sizes) + UNIT_MAX_BATCHES + 3):
            units.add(f"q{i:03d}", 12)
    held = [len(m.batches) for m in queued(redis_client, "dense")]
    assert held == [*sizes, UNIT_MAX_BATCHES, 3]  # never more than UNIT_MAX_BATCHES
    assert {m.kind for m in queued(redis_client, "dense")} == {"queries"}


def test_nothing_gathered_is_sent_after_an_error(app: Any, redis_client: Any) -> None:
    """The unit that stages is retried and sends the same messages: a half-gathered one
    must not go out now."""
    job = msgspec.structs.replace(spec("error"), unit_tokens=1000)
    ledger = JobLedger(redis_client, job.job_id)
    with pytest.raises(RuntimeError), EncodeUnits(app, ledger, job, "documents") as units:
        units.add("b00", 600)  # sent: the range's first batch goes alone
        units.add("b01", 300)
        units.add("b02", 800)  # sent: 1,100 tokens
        units.add("b03", 300)
        raise RuntimeError("the range could not be read")
    assert [m.batches for m in queued(redis_client, "dense")] == [["b00"], ["b01", "b02"]]


def test_units_resumed_go_in_messages_as_their_stages_gather_them() -> None:
    """A resumed phase's units (resume_job) are not sent one a message: a GPU stage's
    missing batches are gathered by tokens (each at its chunks x chunk_tokens, at full
    size from the first message, never past UNIT_MAX_BATCHES), apart per kind; a CPU
    stage's go one a message; rerank groups RERANK_UNIT_GROUPS a message."""
    job = msgspec.structs.replace(
        spec("resumed"), stages=["dense", "sparse"], sparse_models=["bm25"], unit_tokens=4096
    )  # chunk_tokens 256: a batch of 4 chunks counts 1,024 tokens, a message holds 4
    docs = [f"b{i:03d}" for i in range(UNIT_MAX_BATCHES * 3)]
    chunks = {b: 4 for b in docs} | {"q00": 1, "q01": 1} | {"b001": 40}  # b001: 10,240
    missing: list[UnitMessage] = [
        EncodeBatch(job_id=job.job_id, stage="dense", unit=b, kind="documents") for b in docs
    ]
    missing += [
        EncodeBatch(job_id=job.job_id, stage="dense", unit=q, kind="queries")
        for q in ("q00", "q01")
    ]
    missing += [
        EncodeBatch(job_id=job.job_id, stage="sparse", unit=b, kind="documents") for b in docs[:3]
    ]
    groups = [f"q-g{i:05d}" for i in range(RERANK_UNIT_GROUPS + 2)]
    missing += [RerankGroup(job_id=job.job_id, stage="rerank", unit=g) for g in groups]
    sent = gathered_again(job, missing, chunks)
    dense = [m for m in sent if isinstance(m, EncodeBatch) and m.stage == "dense"]
    assert [m.batches for m in dense[:3]] == [["b000", "b001"], docs[2:6], docs[6:10]]
    assert [b for m in dense if m.kind == "documents" for b in m.batches] == docs
    assert [m.batches for m in dense if m.kind == "queries"] == [["q00", "q01"]]
    assert all(m.unit == m.batches[0] for m in dense)
    sparse = [m for m in sent if m.stage == "sparse"]
    assert [m.units for m in sparse] == [[b] for b in docs[:3]]
    rerank = [m for m in sent if m.stage == "rerank"]
    assert [m.units for m in rerank] == [groups[:RERANK_UNIT_GROUPS], groups[RERANK_UNIT_GROUPS:]]
    # With no token rule to stop it, a message still holds at most UNIT_MAX_BATCHES.
    unbounded = msgspec.structs.replace(job, chunk_tokens=0)
    held = [len(m.units) for m in gathered_again(unbounded, missing[: len(docs)], chunks)]
    assert held == [UNIT_MAX_BATCHES] * 3


def test_each_batch_of_a_message_is_recorded_once_with_the_units_figures_once(
    redis_client: Any,
) -> None:
    ledger = JobLedger(redis_client, "records")
    ledger.open(spec("records"), documents_total=1, bytes_total=1)
    ledger.seal(
        ProducerReport(
            documents=1, chunks=12, batches=3, tokens=0, empty_documents=[],
            skipped_records=[], skipped_count=0, started_at=0.0, finished_at=0.0,
            latency=LatencySummary.from_samples([], 0, 0.0),
        )
    )  # fmt: skip
    unit = report("b0", 12)
    unit.batch_sizes, unit.oom_count, unit.model_loads = [5, 7], 1, 1
    outcome = UnitOutcome(
        items=12,
        device="cpu",
        parts=[UnitPart("b0", 4, 40), UnitPart("b1", 4, 41), UnitPart("b2", 4, 42)],
    )
    reports = _part_reports(unit, outcome)
    assert [(r.batch_id, r.chunks, r.tokens) for r in reports] == [
        ("b0", 4, 40),
        ("b1", 4, 41),
        ("b2", 4, 42),
    ]
    assert [r.batch_sizes for r in reports] == [[5, 7], [], []]
    assert [r.oom_count for r in reports] == [1, 0, 0]
    assert ledger.record_done_many(reports)  # the three batches complete the phase
    assert not ledger.record_done_many(reports[1:])  # a redelivered copy counts nothing
    (dense,) = [s for s in ledger.progress(detail=True).stages if s.stage == "dense"]
    assert (dense.batches_done, dense.chunks_done) == (3, 12)
    assert dense.summary is not None
    assert dense.summary.batch_size_min == 5 and dense.summary.oom_count == 1
    assert dense.summary.tokens == 123 and dense.summary.model_loads == 1


def test_a_unit_that_keeps_failing_sends_its_batches_again_one_by_one(
    app: Any, redis_client: Any, redis_server: Any
) -> None:
    """What a worker does once a message's retries are spent: a unit of several batches
    is split (each alone, its own retries) instead of failing every batch; a unit of one
    is recorded failed."""
    from workers.runtime.context import WorkerBoot, attach_boot
    from workers.runtime.middleware import LedgerReporting

    job = spec("split")
    ledger = JobLedger(redis_client, job.job_id)
    ledger.open(job, documents_total=1, bytes_total=1)

    class Task:
        stage = "dense"
        name = "embed_fleet.dense.embed_batch"

    task = Task()
    task.app = app  # type: ignore[attr-defined]
    settings = dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url)
    attach_boot(app, WorkerBoot(settings=settings))
    payload = {"job_id": job.job_id, "stage": "dense", "unit": "b0", "batch_ids": ["b0", "b1"]}
    LedgerReporting().gave_up(task, payload, RuntimeError("one chunk is broken"))  # type: ignore[arg-type]
    assert [m.batches for m in queued(redis_client, "dense")] == [["b0"], ["b1"]]
    assert ledger.failures("dense") == []  # nothing failed yet
    LedgerReporting().gave_up(task, {**payload, "batch_ids": []}, RuntimeError("b0 is"))  # type: ignore[arg-type]
    (failure,) = ledger.failures("dense")
    assert failure.batch_id == "b0" and "b0 is" in failure.reason


def test_rerank_messages_hold_several_query_groups_and_the_phase_counts_each(
    app: Any, redis_client: Any
) -> None:
    """The rerank plan gathers its groups RERANK_UNIT_GROUPS a message, in order; the
    phase's total is still the groups, each recorded by its own id."""
    job = spec("rerank-units")
    ledger = JobLedger(redis_client, job.job_id)
    ledger.open(job, documents_total=1, bytes_total=1)
    groups = [f"q-g{i:05d}" for i in range(RERANK_UNIT_GROUPS + 4)]
    units = [RerankGroup(job_id=job.job_id, stage="rerank", unit=g) for g in groups]
    assert fan_out(app, ledger, job, "rerank", units) == len(groups)
    sent = queued(redis_client, "rerank", RerankGroup)
    assert [m.units for m in sent] == [groups[:RERANK_UNIT_GROUPS], groups[RERANK_UNIT_GROUPS:]]
    assert [m.unit for m in sent] == [groups[0], groups[RERANK_UNIT_GROUPS]]
    assert int(redis_client.hget(ledger.k_state, "total:rerank")) == len(groups)
    # Other planned stages keep one unit a message.
    retrieve = [
        RetrieveGroup(
            job_id=job.job_id, stage="retrieve", unit=f"dense-g{i}", retriever="dense",
            batch_ids=["b0", "b1"],
        )
        for i in range(3)
    ]  # fmt: skip
    fan_out(app, ledger, job, "retrieve", retrieve, variant=lambda unit: unit.retriever)
    assert queued(redis_client, "dense", RetrieveGroup) == retrieve


def test_a_rerank_message_that_keeps_failing_sends_its_groups_again_one_by_one(
    app: Any, redis_client: Any, redis_server: Any
) -> None:
    """As a unit of several staged batches: each query group alone, with its own retries;
    a retrieve group (whose batch_ids are the shards it searches, not units of its own)
    is recorded failed as it is."""
    from workers.runtime.context import WorkerBoot, attach_boot
    from workers.runtime.middleware import LedgerReporting

    job = spec("split-rerank")
    ledger = JobLedger(redis_client, job.job_id)
    ledger.open(job, documents_total=1, bytes_total=1)
    settings = dataclasses.replace(Settings.from_env({}), broker_url=redis_server.url)
    attach_boot(app, WorkerBoot(settings=settings))

    class Task:
        stage = "rerank"
        name = "embed_fleet.rerank.rerank_group"

    task = Task()
    task.app = app  # type: ignore[attr-defined]
    message = RerankGroup(
        job_id=job.job_id, stage="rerank", unit="q-g0", group_ids=["q-g0", "q-g1"]
    )
    payload = msgspec.to_builtins(message)
    LedgerReporting().gave_up(task, payload, RuntimeError("one group is broken"))  # type: ignore[arg-type]
    assert [m.units for m in queued(redis_client, "rerank", RerankGroup)] == [["q-g0"], ["q-g1"]]
    assert all(not m.group_ids for m in queued(redis_client, "rerank", RerankGroup))
    assert ledger.failures("rerank") == []
    task.stage, task.name = "retrieve", "embed_fleet.dense.retrieve"
    searched = RetrieveGroup(
        job_id=job.job_id, stage="retrieve", unit="dense-g0", retriever="dense",
        batch_ids=["b0", "b1"],
    )  # fmt: skip
    LedgerReporting().gave_up(task, msgspec.to_builtins(searched), RuntimeError("lost"))  # type: ignore[arg-type]
    (failure,) = ledger.failures("retrieve")
    assert failure.batch_id == "dense-g0" and "lost" in failure.reason


def test_a_worker_takes_what_it_encodes_in_its_unit_seconds() -> None:
    """Before it has a pace a worker takes one batch of a unit; then as many as its own
    seconds per batch fit in its target (UNIT_TARGET_S, or EMBED_FLEET_UNIT_SECONDS; at
    least one, at most the unit); a unit in which nothing was timed changes nothing."""
    from workers.runtime.pace import UNIT_TARGET_S, UnitPace

    pace = UnitPace()
    assert pace.take("dense", 13) == 1 and pace.take("dense", 0) == 0
    pace.record("dense", 1, 8.0)  # a CPU: 8 s a batch
    assert pace.take("dense", 13) == 1
    pace.record("sparse", 4, 0.02)  # a GPU: 5 ms a batch
    assert pace.take("sparse", 64) == 64
    assert pace.take("dense", 13) == 1  # stages keep their own pace
    pace.record("dense", 1, 0.5)  # faster now: the pace follows (half weight each)
    assert pace.seconds_per_batch["dense"] == pytest.approx(4.25)
    assert pace.take("dense", 13) == 1  # slower than the target: still one batch
    pace.record("dense", 1, 0.5)
    assert pace.seconds_per_batch["dense"] == pytest.approx(2.375)
    assert pace.take("dense", 13) == 1
    quick = UnitPace(target_s=10.0)  # EMBED_FLEET_UNIT_SECONDS=10
    quick.record("dense", 1, 2.375)
    assert quick.take("dense", 13) == int(10.0 / 2.375) == 4
    assert UnitPace().take("dense", 13) == 1 and UnitPace().target_s == UNIT_TARGET_S
    pace.record("dense", 0, 99.0)
    assert pace.seconds_per_batch["dense"] == pytest.approx(2.375)
    pace.seconds_per_batch["dense"] = 1.0
    assert pace.take("dense", 13) == int(UNIT_TARGET_S / 1.0) == 2
