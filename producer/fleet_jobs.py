"""The jobs a shared fleet is running, side by side: ``embed-collections jobs``.

Whoever shares a fleet wants to know what else is on it and how much of it each job
gets. A job's **share** is its part of the units the fleet's workers hold right now
(kombu's ``unacked`` hash: every message a worker has taken and not yet acknowledged,
whose body names its job), so it says what the job gets, not what it asked for. Its
**progress** is its current phase's, and its **ETA** the time that phase's rate so far
needs for the rest (a rough figure: the phases after it are not counted).
"""

from __future__ import annotations

import time

import msgspec
import redis

from producer.backlog import held_by_job
from producer.follow import FINISHED, counts_tasks
from shared.control.fairness import Priority
from shared.control.ledger import JobLedger, recent_jobs
from shared.records.schemas import JobProgress

# How many of the most recent jobs are looked at for the running ones.
RECENT = 200


class FleetJob(msgspec.Struct):
    """One running job, as ``jobs`` lists it.

    Attributes:
        job_id: The job.
        collection: Its collection's name.
        priority: ``run --priority``.
        status: The ledger's status (``validating`` ... ``exporting``).
        phase: The stage whose bar is its progress (``dense``, ``export``, ...).
        done: Units (or chunks, for an encode stage) of that stage done.
        total: Of how many (``None``: not known yet).
        in_flight: Its units the fleet's workers hold now.
        share: ``in_flight`` over every unit they hold (0 when they hold none).
        max_in_flight: ``run --max-in-flight``: the most of its units of a stage that
            run at once (0: no cap).
        eta_s: Seconds the rest of its phase needs at its rate so far (``None``: not
            known yet).
        age_s: Seconds since it was submitted.
    """

    job_id: str
    collection: str
    priority: Priority
    status: str
    phase: str
    done: int
    total: int | None
    in_flight: int
    share: float
    max_in_flight: int
    eta_s: float | None
    age_s: float


def running_jobs(client: redis.Redis, now: float | None = None) -> list[FleetJob]:
    """Every job of the fleet that has not ended, the most recent first."""
    now = time.time() if now is None else now
    held = held_by_job(client)
    every = sum(held.values())
    found = []
    for job_id in recent_jobs(client, RECENT):
        ledger = JobLedger(client, job_id)
        if not ledger.exists():
            continue
        snap = ledger.progress(detail=True)
        if snap.status in FINISHED:
            continue
        spec = ledger.spec()
        phase, done, total = _current(snap)
        age = max(0.0, now - spec.created_at)
        found.append(
            FleetJob(
                job_id=job_id,
                collection=spec.collection,
                priority=spec.priority,
                status=snap.status,
                phase=phase,
                done=done,
                total=total,
                in_flight=held[job_id],
                share=round(held[job_id] / every, 3) if every else 0.0,
                max_in_flight=spec.max_in_flight,
                eta_s=_eta(snap, phase, done, total),
                age_s=round(age, 1),
            )
        )
    return found


def _current(snap: JobProgress) -> tuple[str, int, int | None]:
    """The stage a job is in (the last that has started, else its first) and how far."""
    started = [s for s in snap.stages if s.batches_done or s.batches_failed] or snap.stages[:1]
    if not started:
        return "", 0, None
    stage = started[-1]
    if counts_tasks(stage.stage):
        return stage.stage, stage.batches_done, stage.total
    total = snap.staged_chunks if snap.total_batches is not None else None
    return stage.stage, stage.chunks_done, total


def _eta(snap: JobProgress, phase: str, done: int, total: int | None) -> float | None:
    """The rest of the phase at the rate of its units so far (from the first one's
    start to the last one's end)."""
    stage = next((s for s in snap.stages if s.stage == phase), None)
    summary = stage.summary if stage is not None else None
    if summary is None or total is None or not done or summary.items_per_s <= 0:
        return None
    if counts_tasks(phase):  # units: the span the figures cover, from items and their rate
        span = summary.items / summary.items_per_s
        rate = summary.batches / span if span > 0 else 0.0
    else:
        rate = summary.items_per_s  # chunks
    return round(max(0, total - done) / rate, 1) if rate > 0 else None
