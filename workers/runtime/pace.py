"""How much of a message of several units (an encode stage's staged batches, the rerank
stage's query groups) a worker does before it hands the rest back to the queue: as much
as it does in about ``EMBED_FLEET_UNIT_SECONDS`` (:data:`UNIT_TARGET_S`, 2.5 s), by its
own pace, per stage. What follows says it of staged batches; a rerank message of up to
16 query groups (:data:`shared.control.pipeline.RERANK_UNIT_GROUPS`) goes the same way.

A GPU stage's message holds up to 64 staged batches (:data:`shared.control.pipeline.
GPU_UNIT_TOKENS`), so that a fast worker's fixed cost per message (the broker, the
ledger, the reads and writes) stays small beside its model's time. The producer cannot
know who will take a message, and a slow worker would hold such a unit for minutes: a
CPU encoding MiniLM at 15 chunks/s spent 113 s on the demo's one unit of 13 batches
while the live view stood at ``dense 0/1837``; a retry would have done it all again, and
at the end of a job a second worker would idle while the first held the last unit. So a
worker takes the batches it encodes in about the target by its own measured seconds per
batch (at least one), and once their shards are written it sends the rest back as one
message; each batch is still counted by its id, whoever encodes it. Before it has a
pace of its own (its first unit, or one in which a model was loaded) it takes one batch.

Why 2.5 s: a unit is how long a worker keeps other jobs waiting. A fleet shared by
several jobs takes turns unit by unit (``shared.control.fairness``), so an urgent job's
first unit waits for the unit in flight, and equal jobs finish at most a unit or two
apart. With 10 s, a 300-document urgent job behind a backfill took 1.47x its wall alone
on a 2-core CPU (four MiniLM batches of about 2.1 s a unit); with one batch a unit it
waits about one batch. A message's fixed cost is tens of milliseconds, about 1% of
2.5 s. A GPU worker is not held back: MiniLM on an H100 encodes a whole unit of 64
batches in well under a second, and a large model's batches of 50 ms still make
units of 50 batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.control.settings import Settings

# How long a unit should keep a worker by default (EMBED_FLEET_UNIT_SECONDS, whose
# default is this): long beside a message's fixed cost (tens of milliseconds), short
# beside another job's wait.
UNIT_TARGET_S: float = Settings.unit_seconds
# The weight of the latest unit in the pace (the rest: the pace so far).
LATEST_WEIGHT = 0.5


@dataclass
class UnitPace:
    """A worker process's seconds per staged batch, per encode stage.

    Attributes:
        target_s: How long a unit should keep the worker (``EMBED_FLEET_UNIT_SECONDS``).
        seconds_per_batch: Per stage, its pace so far.
    """

    target_s: float = UNIT_TARGET_S
    seconds_per_batch: dict[str, float] = field(default_factory=dict)

    def take(self, stage: str, batches: int) -> int:
        """How many of a unit's ``batches`` to encode now (the rest go back)."""
        pace = self.seconds_per_batch.get(stage)
        if pace is None:
            return min(1, batches)
        return max(1, min(batches, int(self.target_s / max(pace, 1e-6))))

    def record(self, stage: str, batches: int, seconds: float) -> None:
        """What ``batches`` took, wall time from reading them to their shards written."""
        if batches < 1:
            return
        latest = seconds / batches
        before = self.seconds_per_batch.get(stage)
        self.seconds_per_batch[stage] = (
            latest if before is None else LATEST_WEIGHT * latest + (1 - LATEST_WEIGHT) * before
        )
