"""The pipeline table: what follows each phase, and that every entry has its task."""

from __future__ import annotations

from test_ledger import spec as ledger_spec

from shared.control import pipeline
from shared.records.schemas import JobSpec, RetrievalSpec


def spec(queries: bool, rerank: bool = False, sparse: bool = False) -> JobSpec:
    job = ledger_spec("j")
    job.stages = ["dense", "sparse"] if sparse else ["dense"]
    if queries:
        job.retrieval = RetrievalSpec(
            queries_source="q",
            queries=1,
            query_batches=1,
            qrels_source=None,
            rerank_model="r" if rerank else None,
        )
    return job


def test_what_follows_each_phase() -> None:
    embed_only = spec(queries=False, sparse=True)
    assert pipeline.next_step(embed_only, "encode").name == "plan_export"
    assert pipeline.next_step(embed_only, "export").name == "finish"
    assert [s.name for s in pipeline.job_stages(embed_only)] == ["dense", "sparse", "export"]
    with_queries = spec(queries=True)
    assert pipeline.next_step(with_queries, "encode").name == "plan_retrieve"
    assert pipeline.next_step(with_queries, "retrieve").name == "plan_fuse"
    assert pipeline.next_step(with_queries, "fuse").name == "plan_rerank"
    assert pipeline.next_step(with_queries, "rerank").name == "plan_export"
    assert [s.name for s in pipeline.job_stages(with_queries)] == [
        "dense",
        "retrieve",
        "fuse",
        "export",
    ]
    reranked = spec(queries=True, rerank=True)
    assert [s.name for s in pipeline.job_stages(reranked, "rerank")] == ["rerank"]
    # the status a job takes when a phase completes is the next step's
    later = [p for p in pipeline.PHASES if p.name not in pipeline.PREPARE_PHASES]
    assert [pipeline.next_step(reranked, p.name).status for p in later] == [
        "retrieving",
        "fusing",
        "reranking",
        "exporting",
        "exporting",
    ]


def test_a_collection_the_fleet_prepares_goes_through_three_phases_before_encode() -> None:
    job = spec(queries=False)
    assert pipeline.job_stages(job, "validate") == []  # the producer prepared it
    job.prepare_on = "fleet"
    assert [s.name for s in pipeline.job_stages(job)][:4] == [
        "validate",
        "dedupe",
        "chunk",
        "dense",
    ]
    steps = [pipeline.next_step(job, p).name for p in pipeline.PREPARE_PHASES]
    assert steps == ["plan_dedupe", "plan_chunk", "seal"]
    assert {pipeline.stage(p).route().queue for p in pipeline.PREPARE_PHASES} == {"prepare"}
    assert pipeline.phase("encode").fed_early  # chunk units enqueue its batches


def test_every_entry_has_its_task_and_every_task_an_entry() -> None:
    from workers.app import app

    fleet_tasks = {name for name in app.tasks if name.startswith("embed_fleet.")}
    assert fleet_tasks == set(pipeline.routes())
    for stage in pipeline.STAGES:
        for route in stage.routes.values():
            assert app.tasks[route.task].stage == stage.name
            assert app.tasks[route.task].message_type is stage.message
    for step in pipeline.STEPS:
        assert app.tasks[step.route.task].stage == ""


def test_the_queues_a_job_waits_on() -> None:
    """What a follower asks the workers about: the queues of the job's stages and steps,
    a retriever's only where the job has the encode stage it searches."""
    import msgspec

    dense = msgspec.structs.replace(spec(queries=True), prepare_on="fleet")
    assert pipeline.job_queues(dense) == ["dense", "prepare", "aggregate"]
    everything = msgspec.structs.replace(
        spec(queries=True, rerank=True, sparse=True), prepare_on="producer"
    )
    assert pipeline.job_queues(everything) == ["dense", "rerank", "sparse", "aggregate"]
