"""The aggregator's resume step: re-drive a job from what the object store holds.

The store is the record of what is done (a unit is done when its output object is
there); the ledger is progress that can be corrected. Resuming walks the job's phases
in pipeline order and stops at the first one that is not finished:

- a phase with units whose outputs are missing (failed, lost with a message, or never
  run): those units are taken out of the ledger's failed and done records and enqueued
  again (in messages as their stages gather them when first sent: a GPU stage's
  staged batches by tokens, a reranker's query groups), and every later phase is
  reset, to be planned again when this one completes;
- a phase never opened (its step was lost: a dead guard winner, a lost message): the
  step that opens it runs again;
- every phase complete: ``finish`` runs again.

A unit whose output is there but which the ledger does not count as done (the ledger
was rebuilt from the store after Redis lost it, or the worker died between its write
and its report) is recorded as done first: the store, not the ledger, says what is done.

Each re-driven step and unit is idempotent (deterministic keys, units counted once),
so a resume of a job that was in fact still running costs repeated work, never a wrong
or doubled result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from celery import Celery

from shared.control import pipeline
from shared.control.celery_app import advance, gathered_again, send_units
from shared.control.ledger import JobLedger
from shared.control.pipeline import PhaseName
from shared.records import ids
from shared.records.job_store import JobStore
from shared.records.schemas import (
    BatchKind,
    BatchReport,
    EncodeBatch,
    JobSpec,
    PrepareUnit,
    UnitMessage,
)
from workers.aggregate.fuse import fuse_messages, rerank_units
from workers.aggregate.plan import retrieve_units


@dataclass
class Resumed:
    """What a resume did: the phase it re-drove, and the units or step it enqueued."""

    phase: PhaseName | None
    units: dict[str, int] = field(default_factory=dict)  # stage -> units enqueued
    step: str = ""
    recovered: int = 0  # units found done in the store that the ledger did not count


def phase_units(
    ledger: JobLedger, store: JobStore, spec: JobSpec, phase: PhaseName
) -> list[tuple[UnitMessage, str]]:
    """Every unit of an opened phase, with its variant (the route within its stage)."""
    if phase in ("validate", "chunk"):
        ranges = store.read_plan().ranges
        return [
            (PrepareUnit(job_id=spec.job_id, stage=phase, unit=ids.range_id(r.index)), "")
            for r in ranges
        ]
    if phase == "dedupe":
        partitions = store.read_plan().partitions
        return [
            (PrepareUnit(job_id=spec.job_id, stage=phase, unit=ids.partition_id(p)), "")
            for p in range(partitions if partitions > 1 else 0)
        ]
    if phase == "encode":
        batches: list[tuple[str, BatchKind]] = [(b, "documents") for b in ledger.staged_batches()]
        batches += [(b, "queries") for b in ledger.staged_query_batches()]
        return [
            (EncodeBatch(job_id=spec.job_id, stage=stage.name, unit=batch, kind=kind), "")
            for stage in pipeline.job_stages(spec, "encode")
            for batch, kind in batches
        ]
    if phase == "retrieve":
        return [(unit, unit.retriever) for unit in retrieve_units(ledger, spec)]
    if phase == "fuse":
        return [(unit, "") for unit in fuse_messages(ledger, store, spec)]
    if phase == "export":
        return [(part, "") for part in store.export_plan().parts]
    return [(unit, "") for unit in rerank_units(ledger, store, spec)]


def output_key(store: JobStore, message: UnitMessage) -> str:
    """The object whose presence means the unit is done."""
    layout = store.layout
    outputs: dict[str, Callable[[str], str]] = {
        "validate": layout.validated,
        "dedupe": layout.duplicates,
        "chunk": layout.chunked,
        "retrieve": layout.retrieved,
        "fuse": layout.fuse_done,
        "rerank": layout.reranked,
        "export": layout.exported_part,
    }
    where = outputs.get(message.stage)
    return where(message.unit) if where else layout.shard(message.stage, message.unit)


def resume_job(ledger: JobLedger, store: JobStore, app: Celery) -> Resumed:
    """Re-drive the job from its first unfinished phase (see the module doc)."""
    spec = ledger.spec()
    store.delete_manifest()  # the export writes a new one, last, as always
    phases = [p.name for p in pipeline.PHASES if p.applies(spec)]
    recovered = 0
    for position, phase in enumerate(phases):
        if not ledger.phase_opened(phase):
            if position == 0:
                ledger.require_submitted()  # raises: the encode phase was never sealed
            # Its opening step never ran to the end: run it again.
            return _redo_step(ledger, app, spec, phases[position - 1], phases[position:], recovered)
        present: list[UnitMessage] = []
        missing: list[tuple[UnitMessage, str]] = []
        for message, variant in phase_units(ledger, store, spec, phase):
            if store.store.exists(output_key(store, message)):
                present.append(message)
            else:
                missing.append((message, variant))
        recovered += _record_recovered(ledger, present)
        if not missing:
            continue
        by_stage: dict[str, list[str]] = {}
        for message, _ in missing:
            by_stage.setdefault(message.stage, []).append(message.unit)
        ledger.reopen(phase, by_stage, later=phases[position + 1 :])
        if spec.max_in_flight:
            # Every unit not done goes again: a parked copy would be a second one.
            ledger.quota().clear(list(by_stage))
        chunks = ledger.staged_items() if phase == "encode" else {}
        messages = gathered_again(spec, [m for m, _ in missing], chunks)
        send_units(app, ledger, spec, messages, _variants(missing))
        units_sent = {s: len(u) for s, u in by_stage.items()}
        return Resumed(phase=phase, units=units_sent, recovered=recovered)
    return _redo_step(ledger, app, spec, phases[-1], [], recovered)


def _variants(sent: list[tuple[UnitMessage, str]]) -> Callable[[UnitMessage], str]:
    """Which of its stage's tasks each of these units goes to."""
    variants = {(message.stage, message.unit): variant for message, variant in sent}
    return lambda message: variants[(message.stage, message.unit)]


def _record_recovered(ledger: JobLedger, done: list[UnitMessage]) -> int:
    """Record as done the units whose outputs are there but the ledger does not count."""
    items = ledger.staged_items()
    recorded: dict[str, set[str]] = {}
    reports = []
    for message in done:
        if message.stage not in recorded:
            recorded[message.stage] = ledger.done_units(message.stage)
        if message.unit in recorded[message.stage]:
            continue
        kind: BatchKind = message.kind if isinstance(message, EncodeBatch) else "documents"
        count = items.get(message.unit, 0) if isinstance(message, EncodeBatch) else 0
        reports.append(BatchReport.recovered_unit(message.stage, message.unit, count, kind))
    ledger.record_recovered(reports)
    return len(reports)


def _redo_step(
    ledger: JobLedger,
    app: Celery,
    spec: JobSpec,
    after: PhaseName,
    later: list[PhaseName],
    recovered: int,
) -> Resumed:
    """Run again the step that follows the complete phase ``after``."""
    step = pipeline.next_step(spec, after)
    ledger.reopen(after, {}, later=later)
    ledger.set_status(step.status)
    advance(app, spec, after)
    return Resumed(phase=None, step=step.name, recovered=recovered)
